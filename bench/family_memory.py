"""What one DTI training step holds, per model family, on the thin test models (CPU is fine).

For each family: the weights as loaded (diffusion model, text encoders) and the bytes autograd keeps for
the backward pass of one DiffusionStep (batch 1, 64 px, "a photo of a {}"), without and with gradient
checkpointing (weights, which autograd references and does not copy, not counted). A step's peak is
about weights + kept activations + one layer's transient; on the thin models the text encoders are
shallow (2-3 layers) and the DiTs one block, so the kept bytes are per-layer figures, not full-size ones.

  COMFYUI_PATH=.hosts/0.33.0 DTI_TEST_CACHE=/tmp/dti-cache python bench/family_memory.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "host"))


def loaders(ck, folder, emb):
    """``{name: () -> (model, clip, vae)}`` for the families this host has."""
    import comfy.supported_models as sm
    out = {
        "SD1.5": lambda: ck.load_checkpoint(ck.ensure_checkpoint("sd15", folder), embedding_directory=emb)[0],
        "SDXL": lambda: ck.load_checkpoint(ck.ensure_checkpoint("sdxl", folder), embedding_directory=emb)[0],
        "Flux.1 dev": lambda: ck.load_family("flux-dev", folder, embedding_directory=emb).out,
        "Chroma": lambda: ck.load_family("chroma", folder, embedding_directory=emb).out,
        "SD3.5 medium": lambda: ck.load_family("sd3", folder, embedding_directory=emb).out,
        "Lumina 2": lambda: ck.load_lumina2(folder, embedding_directory=emb).out,
        "Wan 2.1": lambda: ck.load_wan(folder, embedding_directory=emb).out,
        "Qwen-Image": lambda: ck.load_qwen_image(folder, embedding_directory=emb).out,
    }
    if hasattr(sm, "ZImage"):
        out["Z-Image"] = lambda: ck.load_zimage(folder, embedding_directory=emb).out
    if hasattr(sm, "Flux2"):
        out["FLUX.2 klein"] = lambda: ck.load_flux2_klein(folder, embedding_directory=emb).out
    return out


def measure(pack, model, clip, vae) -> dict:
    import torch
    ct = pack.comfy_host
    fam = ct.families.family_of(model, clip)
    if fam.enable_embeddings:
        clip = ct.text.with_embeddings_folder(clip, ct.paths.embedding_folders())[0]
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, [fam.prompt_prefix + "a photo of a {}"],
                                             {k: v.shape[0] for k, v in init.items()})
        latents = ct.latents.encode_latents(vae, model, torch.rand(1, 64, 64, 3), hflip=False)
    vectors = {k: m_star[k] * init[k] for k in init}

    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    row = {"family": fam.name, "dit_weights": nbytes(model.model.diffusion_model),
           "text_weights": sum(nbytes(enc) for _, _, enc in ct.text.text_encoders(clip).values())}
    for gc in (False, True):
        with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip, gc):
            weights = {p.data_ptr() for p in model.model.parameters()}
            weights |= {p.data_ptr() for _, _, enc in ct.text.text_encoders(clip).values() for p in enc.parameters()}
            kept = [0]

            def pack_hook(t):
                if t.data_ptr() not in weights:
                    kept[0] += t.numel() * t.element_size()
                return t

            step = ct.step.DiffusionStep(model, clip, prompts, latents.cloned(), None, 1, 11, 64, "cpu",
                                         guidance=3.5 if fam.guidance else None, text_mask=fam.text_mask)
            leaves = {k: v.detach().clone().requires_grad_(True) for k, v in vectors.items()}
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
                loss = step(leaves, 0)
            loss.backward()
            row["kept_ckpt" if gc else "kept"] = kept[0]
            row["step_s_ckpt" if gc else "step_s"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", help="a family name (repeatable)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    import checkpoints as ck
    comfy_path = os.environ["COMFYUI_PATH"]
    ck.setup_comfy(comfy_path, cpu=True)
    import importlib.util
    import gc

    import folder_paths
    spec = importlib.util.spec_from_file_location("dti_bench_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["dti_bench_pack"] = pack
    spec.loader.exec_module(pack)
    for sub in ("comfy_host.families", "comfy_host.text", "comfy_host.step", "comfy_host.latents",
                "comfy_host.autograd", "comfy_host.paths"):
        importlib.import_module(f"dti_bench_pack.{sub}")
    folder = Path(os.environ.get("DTI_TEST_CACHE", "/tmp/dti-cache")) / f"comfyui-{Path(comfy_path).name}"
    folder.mkdir(parents=True, exist_ok=True)
    emb = folder_paths.get_folder_paths("embeddings")
    rows = []
    for name, load in loaders(ck, folder, emb).items():
        if args.only and name not in args.only:
            continue
        model, clip, vae = load()
        row = measure(pack, model, clip, vae)
        rows.append(row)
        mib = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
        print(f"{name:14s} DiT {mib(row['dit_weights'])} MiB  text {mib(row['text_weights'])} MiB  kept "
              f"{mib(row['kept'])} MiB -> {mib(row['kept_ckpt'])} MiB with checkpointing  "
              f"({row['step_s']} s / {row['step_s_ckpt']} s)", flush=True)
        del model, clip, vae
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
