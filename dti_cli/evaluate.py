"""``python -m dti_cli evaluate``: DTI Evaluate's scores for a folder of generated images, headless.

    python -m dti_cli evaluate --generated OUT_DIR --references PHOTOS_DIR --image-model dinov2-large.safetensors \\
        [--text-encoder clip_l.safetensors --text-vision clip-vit-large-patch14.safetensors --prompts "a photo of {}"] \\
        --out SCORES_DIR

The vision and text models load through ComfyUI's own loaders (CLIPVisionLoader's and CLIPLoader's calls)
and the numbers come from the DTI Evaluate node itself, so they are the node's. Writes ``scores.csv``
(one row per generated image) and ``scores.png`` (the node's chart) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

from .main import UsageError, _safetensors, _write_png, find_comfyui, setup_comfyui, write_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dti_cli evaluate",
                                description="Score generated images as DTI Evaluate does (image score, text score).")
    p.add_argument("--generated", required=True, help="Folder of generated images (scored in file-name order).")
    p.add_argument("--references", required=True,
                   help="Folder of the subject's photos (a PNG's transparency is its mask: opaque = subject).")
    p.add_argument("--image-model", required=True,
                   help="CLIP vision or DINOv2 .safetensors for the image score (as CLIPVisionLoader loads it).")
    p.add_argument("--text-encoder", help="CLIP text encoder .safetensors for the text score (e.g. clip_l).")
    p.add_argument("--clip-type", default="stable_diffusion", help="CLIPLoader type of --text-encoder.")
    p.add_argument("--text-vision", help="The CLIP vision .safetensors that pairs with --text-encoder.")
    p.add_argument("--prompts", help="The prompts, one per line (one per image, per equal group, or one for all).")
    p.add_argument("--prompts-file", help="A text file with the prompts, one per line.")
    p.add_argument("--out", required=True, help="Folder for scores.csv and scores.png.")
    g = p.add_argument_group("render first (into --generated, which must be empty or new)")
    g.add_argument("--checkpoint", help="The checkpoint to render with (as CheckpointLoaderSimple loads it).")
    g.add_argument("--embedding", help="The learned word's .safetensors file: each prompt's {} is this word.")
    g.add_argument("--prompt-set", default="simple",
                   help="simple (DreamBooth's prompts), complex (the authors' COMPLEX_LV1), or a text file of "
                        "prompts with {} (one per line). Default: simple.")
    g.add_argument("--limit", type=int, default=0, help="Only the first N prompts of the set (0 = all).")
    g.add_argument("--seeds", default="0-3", help="Seeds per prompt: a range '0-3' (the paper's) or a list '0,5'.")
    g.add_argument("--size", type=int, default=512, help="Image size in pixels (default 512).")
    g.add_argument("--steps", type=int, default=30, help="Sampler steps (euler, simple; default 30).")
    g.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default 7).")
    p.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH, else the ComfyUI this pack sits in).")
    p.add_argument("--cpu", action="store_true", help="Run on the CPU, as ComfyUI's --cpu.")
    return p


def _render_plan(args) -> list[str] | None:
    """The prompts to render (each ``{}`` the word), one per image, prompts x seeds; None without --embedding."""
    if not (args.embedding or args.checkpoint):
        return None
    if not (args.embedding and args.checkpoint):
        raise UsageError("rendering needs --checkpoint and --embedding together")
    if args.prompts or args.prompts_file:
        raise UsageError("with --embedding the prompts come from --prompt-set; leave --prompts out")
    _safetensors(args.checkpoint, "--checkpoint")
    _safetensors(args.embedding, "--embedding")
    sets = _prompt_sets_module()  # (pure data, read before ComfyUI is set up)
    PROMPT_SETS, parse_seeds = sets.PROMPT_SETS, sets.parse_seeds
    if args.prompt_set in PROMPT_SETS:
        prompts = list(PROMPT_SETS[args.prompt_set])
    else:
        try:
            prompts = [p.strip() for p in Path(args.prompt_set).read_text(encoding="utf-8").splitlines() if p.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-set {args.prompt_set}: not simple or complex, and not a readable file ({e})") from None
        bad = [p for p in prompts if "{}" not in p]
        if not prompts or bad:
            raise UsageError(f"--prompt-set {args.prompt_set}: every line needs {{}} for the word"
                             + (f" (not: {bad[0]!r})" if bad else " (the file is empty)"))
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    if args.limit:
        prompts = prompts[:args.limit]
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (64 <= args.size <= 4096 and args.size % 8 == 0) or not (1 <= args.steps <= 1000) or not (0 < args.cfg <= 100):
        raise UsageError("--size must be a multiple of 8 from 64 to 4096, --steps 1-1000, --cfg above 0 up to 100")
    gen = Path(args.generated)
    if gen.exists() and (not gen.is_dir() or any(gen.iterdir())):
        raise UsageError(f"--generated {gen} must be a new or empty folder when rendering (nothing is overwritten)")
    args.seed_list = seeds
    return [p for p in prompts for _ in seeds]


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    render = _render_plan(args)
    want_text = bool(args.text_encoder or args.text_vision)
    given_prompts = bool(args.prompts or args.prompts_file)
    if (want_text and not (args.text_encoder and args.text_vision)) or (render is None and want_text != given_prompts):
        raise UsageError("the text score needs --text-encoder, --text-vision and --prompts (or --prompts-file) "
                         "together; leave all out for the image score alone")
    if args.prompts and args.prompts_file:
        raise UsageError("give --prompts or --prompts-file, not both")
    for folder, what in ([] if render else [(args.generated, "--generated")]) + [(args.references, "--references")]:
        if not Path(folder).is_dir():
            raise UsageError(f"{what} {folder}: no such folder")
    for path, what in ((args.image_model, "--image-model"), (args.text_encoder, "--text-encoder"),
                       (args.text_vision, "--text-vision")):
        if path:
            _safetensors(path, what)
    prompts = ""
    if args.prompts_file:
        try:
            prompts = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts-file {args.prompts_file}: {e}") from None
    elif args.prompts:
        prompts = args.prompts.replace("\\n", "\n")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is not a folder")

    comfy_path = find_comfyui(args.comfyui)
    print(f"dti_cli: ComfyUI at {comfy_path}", file=sys.stderr)
    pack = setup_comfyui(comfy_path, cpu=args.cpu)
    import importlib

    import torch
    host_images = importlib.import_module(f"{pack.__name__}.comfy_host.images")
    loaders = importlib.import_module(f"{pack.__name__}.comfy_host.loaders")
    node_mod = importlib.import_module(f"{pack.__name__}.nodes.evaluate_node")
    previews = importlib.import_module(f"{pack.__name__}.nodes.previews")

    if render is not None:
        prompts = "\n".join(render)
        _render(pack, args, render)
    names = host_images.image_files(str(args.generated))
    if not names:
        raise UsageError(f"no images in {args.generated}")
    try:
        images = [host_images.read_image(os.path.join(args.generated, n))[0] for n in names]
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        image_vision = loaders.load_clip_vision(args.image_model)
        clip = text_vision = None
        if args.text_encoder:
            clip = loaders.load_text_encoder(args.text_encoder, args.clip_type)
            text_vision = loaders.load_clip_vision(args.text_vision)
    except ValueError as e:
        raise UsageError(str(e)) from None

    # The node's own numbers: one call for a folder of one size, else one per image (scores are per image).
    same = len({tuple(t.shape) for t in images}) == 1
    batches = [torch.stack(images)] if same else [t[None] for t in images]
    try:
        lines = node_mod.prompt_lines(prompts, len(images)) if prompts.strip() else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    # (the references folder is read by the node as its reference_folder, under its input directory)
    ref = Path(args.references).resolve()
    host_paths = importlib.import_module(f"{pack.__name__}.comfy_host.paths")
    host_paths.set_input_directory(str(ref.parent))
    image_scores, text_scores, start = [], [], 0
    try:
        for batch in batches:
            part = "\n".join(lines[start:start + batch.shape[0]]) if lines and want_text else ""
            with torch.inference_mode():
                out = node_mod.DTIEvaluate().evaluate(batch, image_vision, reference_folder=ref.name, clip=clip,
                                                      text_vision=text_vision, prompts=part)
            image_scores += out["result"][2]
            text_scores += out["result"][3]
            start += batch.shape[0]
    except ValueError as e:
        raise UsageError(str(e)) from None
    report = out["result"][4] if same else None

    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "prompt", "image_score", "text_score"])
    for i, name in enumerate(names):
        w.writerow([name, lines[i] if lines else "", f"{image_scores[i]:.6f}",
                    f"{text_scores[i]:.6f}" if text_scores else ""])
    mean_image = sum(image_scores) / len(image_scores)
    mean_text = sum(text_scores) / len(text_scores) if text_scores else None
    w.writerow(["mean", "", f"{mean_image:.6f}", f"{mean_text:.6f}" if mean_text is not None else ""])
    _write_text(buf.getvalue(), out_dir / "scores.csv")
    chart = node_mod.score_chart(image_scores, text_scores)
    _write_png(previews.to_pil(chart), str(out_dir / "scores.png"))
    print(report or f"image score {mean_image:.4f}" + (f"; text score {mean_text:.4f}" if mean_text is not None else ""))
    print(f"-> {out_dir / 'scores.csv'}\n-> {out_dir / 'scores.png'}")
    return 0


def _write_text(text: str, path: Path) -> None:
    write_atomic(str(path), lambda f: f.write(text.encode("utf-8")))

def _prompt_sets_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dti_cli_prompt_sets",
                                                  Path(__file__).resolve().parent.parent / "dti_core" / "prompt_sets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _render(pack, args, prompts: list[str]) -> None:
    """Each prompt at each seed, with the word's vectors where ``{}`` is (the rows ``embedding:NAME`` gives),
    through ComfyUI's sampler (euler, simple), into ``--generated`` as NNN.png in prompt-major order."""
    import importlib

    import torch
    loaders = importlib.import_module(f"{pack.__name__}.comfy_host.loaders")
    sampling = importlib.import_module(f"{pack.__name__}.comfy_host.sampling")
    files = importlib.import_module(f"{pack.__name__}.dti_core.embedding_file")
    previews = importlib.import_module(f"{pack.__name__}.nodes.previews")
    try:
        emb = files.load_embedding(args.embedding)
        model, clip, vae = loaders.load_model({"checkpoint": args.checkpoint})
    except ValueError as e:
        raise UsageError(str(e)) from None
    gen = Path(args.generated)
    gen.mkdir(parents=True, exist_ok=True)
    seeds = args.seed_list
    for i, prompt in enumerate(prompts):
        seed = seeds[i % len(seeds)]
        print(f"dti_cli evaluate: render {i + 1}/{len(prompts)}: {prompt!r} seed {seed}", file=sys.stderr)
        try:
            with torch.inference_mode():
                image = sampling.render(model, clip, vae, emb.vectors, prompt, seed, args.size, args.steps, cfg=args.cfg)
        except ValueError as e:
            raise UsageError(str(e)) from None
        _write_png(previews.to_pil(image), str(gen / f"{i:03d}.png"))
