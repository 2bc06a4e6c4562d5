"""Time the pack's own DTI training step inside ComfyUI, on real-size random-weight models.

Builds an SD1.5 or SDXL checkpoint with the published layer sizes and random weights through
ComfyUI's own classes (tests/host/checkpoints.py; with DTI_TEST_CACHE set, once, as a file there that
later runs reuse), loads it with ComfyUI's loader under
torch.inference_mode() as the executor does, then runs exactly what DTI Train runs:
``comfy_host.latents.encode_buckets`` then ``DiffusionStep`` inside ``dti_core.training.train``. Prints s/step, peak GPU
memory and the UNet's achieved TFLOP/s; writes a JSON report.

Run beside ../shared/bench/reference_recipe_sdxl.py in the same call on the GPU machine
(see bench/gpu_check.sh) and quote the ratio of step times.

  COMFYUI_PATH=/opt/ComfyUI python bench/bench_train_step.py --model sdxl --res 768 --bs 4
  ... --thin --res 64 --bs 1 --steps 2 --warmup 1   # CPU smoke run on the thin test models
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[str(path.parent)] if path.name == "__init__.py" else None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["sd15", "sdxl"], default="sdxl")
    p.add_argument("--thin", action="store_true", help="the small test layout instead of the real sizes")
    p.add_argument("--res", type=int, default=768)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--out", default="bench_pack.json")
    a = p.parse_args()

    comfy_path = os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")
    ck = load_by_path("dti_bench_checkpoints", ROOT / "tests" / "host" / "checkpoints.py")
    ck.setup_comfy(comfy_path, cpu=a.cpu or not torch.cuda.is_available())
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths

    emb_dir = tempfile.mkdtemp(prefix="dti-bench-emb-")
    folder_paths.add_model_folder_path("embeddings", emb_dir, is_default=True)
    load_by_path("ComfyUI_DTI_bench", ROOT / "__init__.py")  # the pack as ComfyUI imports it
    import importlib

    ct = importlib.import_module("ComfyUI_DTI_bench.comfy_host")
    for sub in ("images", "latents", "step", "text", "autograd"):
        importlib.import_module(f"ComfyUI_DTI_bench.comfy_host.{sub}")
    training = importlib.import_module("ComfyUI_DTI_bench.dti_core.training")
    templates = importlib.import_module("ComfyUI_DTI_bench.dti_core.templates")

    kind = a.model if a.thin else a.model + "-full"
    report = {"model": kind, "res": a.res, "bs": a.bs, "grad_ckpt": a.grad_ckpt, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not a.cpu else "cpu"}
    t0 = time.perf_counter()
    cache = os.environ.get("DTI_TEST_CACHE")
    if cache:
        # the checkpoint file, generated once per cache folder (bench/gpu_check.sh makes it before the
        # benches: a real-size SDXL takes the CPU's random generator tens of seconds), loaded as
        # CheckpointLoaderSimple loads it
        path = ck.ensure_checkpoint(kind, cache)
        report["checkpoint"] = str(path)
        (model, clip, vae), _ = ck.load_checkpoint(path, embedding_directory=[emb_dir])
        report["params"] = {"unet": ck.param_count(model.model.diffusion_model),
                            "clip": ck.param_count(clip.cond_stage_model), "vae": ck.param_count(vae.first_stage_model)}
    else:
        sd, info = ck.build_state_dict(kind, dtype=torch.float16)
        report["params"] = info["params"]
        with torch.inference_mode():
            model, clip, vae = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True,
                                                                     embedding_directory=[emb_dir])[:3]
        del sd
    report["build_load_s"] = time.perf_counter() - t0
    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    images = torch.rand(max(4, a.bs), a.res, a.res, 3)
    with torch.inference_mode():
        t0 = time.perf_counter()
        mm.load_models_gpu([model, clip.patcher], force_full_load=True)
        # as DTI Train feeds the step: per-bucket latents, flip off (the paper's and the node's default)
        latents = ct.latents.encode_buckets(vae, model, ct.images.load_training_images(images), a.res, False)
        sync()
        report["latent_cache_s"] = time.perf_counter() - t0
        init, mu, m_star = ct.text.initial_vectors(clip, "dog", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, templates.OBJECT, next(iter(init.values())).shape[0])
    stamps = []

    def on_step(step, loss, norms):
        sync()
        stamps.append(time.perf_counter())

    with torch.inference_mode(False), torch.enable_grad():
        latents = [tl.cloned() for tl in latents]  # normal tensors (the VAE ran under inference mode)
        with ct.autograd.differentiable(model, clip, a.grad_ckpt):
            step_fn = ct.step.DiffusionStep(model, clip, prompts, latents, None, a.bs, 0, a.res, dev)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            training.train(init, mu, m_star, step_fn, training.TrainConfig(steps=a.warmup + a.steps), device=dev,
                           on_step=on_step, loss_scale=lambda: step_fn.loss_scale)  # (as DTI Train)
            timed = stamps[a.warmup:]
            first = stamps[a.warmup - 1] if a.warmup else start
            report["s_per_step"] = (timed[-1] - first) / len(timed)
            report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            try:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as fc:
                    # clone: the initializer rows were read under inference mode (a leaf must be a normal tensor)
                    embeds = {k: m_star[k] * v.to(dev).clone().requires_grad_() for k, v in init.items()}
                    step_fn(embeds, 0).backward()
                total = fc.get_total_flops()
                report["step_tflop"] = total / 1e12
                report["achieved_tflops"] = total / report["s_per_step"] / 1e12
            except Exception as e:  # flop counting is a report extra; never fail the timing on it
                report["flop_count_error"] = repr(e)
    print(f"{kind} {a.res}px x{a.bs} grad_ckpt={a.grad_ckpt}: {report['s_per_step'] * 1000:.1f} ms/step, "
          f"peak {report['peak_gib']:.2f} GiB, {report.get('achieved_tflops', float('nan')):.0f} TFLOP/s "
          f"(step {report.get('step_tflop', float('nan')):.1f} TFLOP), latent cache {report['latent_cache_s']:.2f} s",
          flush=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
