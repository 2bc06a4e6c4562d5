"""Peak memory of a whole DTI Train run, with its breakdown, one configuration per fresh process.

Runs the node itself (``DTITrain.run`` under ``torch.inference_mode()``, models loaded the way
CheckpointLoaderSimple loads them) on the thin test models or the real-size random-weight layouts,
and reports the process's resident memory (sampled every 20 ms; on a GPU also
``torch.cuda.max_memory_allocated``) at each phase:

  load      after the checkpoint is loaded (the weights)
  latents   peak while the VAE encodes the training images
  step      peak during the training steps (weights + activations kept for backward)
  retained  resident after the run returned (what the run left behind)

  COMFYUI_PATH=/opt/ComfyUI python bench/bench_memory.py                      # the table below, thin models
  COMFYUI_PATH=/opt/ComfyUI python bench/bench_memory.py --one sdxl 768 4 0    # one run: kind res batch grad_ckpt
  ... --full   # real-size layouts (needs the memory: a GPU, or a big host)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The shipped settings (workflows/: batch 4; resolution auto = 512 SD1.5, 768 SDXL), then the
# small-card options.
CONFIGS = [("sd15", 512, 4, 0), ("sd15", 512, 4, 1), ("sdxl", 768, 4, 0), ("sdxl", 768, 4, 1)]


def one(kind: str, res: int, bs: int, grad_ckpt: bool, full: bool, steps: int) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train_step import load_by_path

    ck = load_by_path("dti_bench_checkpoints", ROOT / "tests" / "host" / "checkpoints.py")
    ck.setup_comfy(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"), cpu=not torch.cuda.is_available())
    import comfy.sd
    import folder_paths

    proc = psutil.Process()
    peak = [0]
    stop = []

    def watch():
        while not stop:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    emb_dir = tempfile.mkdtemp(prefix="dti-bench-mem-")
    folder_paths.add_model_folder_path("embeddings", emb_dir, is_default=True)
    load_by_path("ComfyUI_DTI_bench", ROOT / "__init__.py")
    tn = importlib.import_module("ComfyUI_DTI_bench.nodes.train_node")
    ct = importlib.import_module("ComfyUI_DTI_bench.comfy_host")
    for sub in ("images", "latents", "step", "text", "autograd"):
        importlib.import_module(f"ComfyUI_DTI_bench.comfy_host.{sub}")
    cuda = torch.cuda.is_available()
    gib = 2**30
    report = {"model": kind + ("-full" if full else "-thin"), "res": res, "bs": bs, "grad_ckpt": bool(grad_ckpt),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    # DTI_TEST_CACHE (as in the tests) keeps generated checkpoints; else a temporary folder.
    with tempfile.TemporaryDirectory() as tmp:
        path = ck.ensure_checkpoint(kind + ("-full" if full else ""), os.environ.get("DTI_TEST_CACHE") or tmp)
        model, clip, vae = ck.load_checkpoint(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))[0]
    report["load_gib"] = proc.memory_info().rss / gib

    def phase(name, fn):
        def wrapped(*args, **kwargs):
            peak[0] = proc.memory_info().rss
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            report[name + "_gib"] = max(report.get(name + "_gib", 0.0), peak[0] / gib)
            if cuda:
                report[name + "_cuda_gib"] = max(report.get(name + "_cuda_gib", 0.0), torch.cuda.max_memory_allocated() / gib)
            return out
        return wrapped

    ct.latents.encode_buckets = phase("latents", ct.latents.encode_buckets)
    ct.step.DiffusionStep.__call__ = phase("step", ct.step.DiffusionStep.__call__)
    images = torch.rand(4, res, res, 3)
    t0 = time.perf_counter()
    with torch.inference_mode():
        tn.DTITrain().run(model, clip, vae, images=images, name="bench-memory", initializer="dog", steps=steps,
                          batch_size=bs, learning_rate=0.01, kappa=1e-4, magnitude="mean", magnitude_value=0.4,
                          templates="object", custom_templates="", resolution=res, horizontal_flip=False, seed=0,
                          save_every=0, resume_from="(none)", overwrite=True, gradient_checkpointing=bool(grad_ckpt))
    report["run_s"] = time.perf_counter() - t0
    report["retained_gib"] = proc.memory_info().rss / gib
    stop.append(1)
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", nargs=4, metavar=("KIND", "RES", "BS", "GRAD_CKPT"))
    p.add_argument("--full", action="store_true", help="real-size layouts instead of the thin test models")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    if a.one:
        kind, res, bs, gc = a.one
        print("REPORT " + json.dumps(one(kind, int(res), int(bs), gc == "1", a.full, a.steps)), flush=True)
        return
    print("| model | res x batch | grad ckpt | load GiB | latents GiB | step peak GiB | retained GiB | run s |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, res, bs, gc in CONFIGS:
        cmd = [sys.executable, __file__, "--one", kind, str(res), str(bs), str(gc), "--steps", str(a.steps)]
        cmd += ["--full"] if a.full else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("REPORT ")), None)
        if line is None:
            print(f"| {kind} | {res}x{bs} | {gc} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(line[len("REPORT "):])
        cuda = f" (CUDA {r['step_cuda_gib']:.2f})" if "step_cuda_gib" in r else ""
        print(f"| {r['model']} | {res}x{bs} | {'on' if gc else 'off'} | {r['load_gib']:.2f} | {r['latents_gib']:.2f} | "
              f"{r['step_gib']:.2f}{cuda} | {r['retained_gib']:.2f} | {r['run_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
