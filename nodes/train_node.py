"""DTI Train: learn a directional embedding from an image batch inside ComfyUI."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import torch

from ..comfy_host import images as host_images
from ..comfy_host import latents as host_latents
from ..comfy_host import kernels, memory, paths, ui
from ..comfy_host import text as host_text
from ..comfy_host.autograd import differentiable
from ..comfy_host.families import family_of, supported_text, trained_encoders
from ..comfy_host import step as host_step
from ..dti_core import __version__
from ..dti_core.embedding_file import Embedding, EmbeddingFileError, dti_metadata, load_embedding, save_embedding
from ..dti_core.names import check_name
from ..dti_core.sphere import normalize
from ..dti_core.templates import parse_captions, resolve_templates
from ..dti_core.training import METHODS, TI_WEIGHT_DECAY, NonFiniteError, TrainConfig, train
from . import previews
from .common import (CATEGORY, EMBEDDING_TYPE, HISTORY_TYPE, WritesEmbeddingFile, embeddings_root, existing_result,
                     log, send_to_client, target_path, train_summary)

NONE = "(none)"
MAGNITUDES = ["mean", "max", "min", "number"]
TEMPLATES = ["object", "style", "custom"]


def _resume_choices() -> list[str]:
    return [NONE] + paths.embedding_files()


class DTITrain(WritesEmbeddingFile):
    DESCRIPTION = (
        "Learn a new word for your subject from a batch of its images with Directional Textual Inversion. "
        "The learned vectors keep the vocabulary's typical length (m*) and only their direction is trained, "
        "so prompts stay faithful. Writes embeddings/NAME.safetensors; use it in any prompt as embedding:NAME."
    )
    SEARCH_ALIASES = ["textual inversion", "embedding", "TI", "train word", "train embedding", "personalize", "DTI"]
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", EMBEDDING_TYPE, HISTORY_TYPE, "IMAGE")
    RETURN_NAMES = ("prompt_text", "embedding", "history", "preview")
    OUTPUT_TOOLTIPS = (
        "'embedding:NAME': paste or connect it into a CLIPTextEncode prompt.",
        "The trained embedding, for DTI Slerp Concepts / DTI Inspect.",
        "Loss and vector norms per step, for plotting.",
        "The last preview (preview_every > 0): preview_prompt rendered with the final vectors. A black 64x64 image when previews are off.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": f"The diffusion model from your checkpoint or UNet loader ({supported_text()})."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) from the same checkpoint. Training goes through the exact path CLIPTextEncode uses."}),
                "vae": ("VAE", {"tooltip": "The VAE from the same checkpoint; images are encoded once and cached."}),
                "name": ("STRING", {"default": "my-concept", "tooltip": "File name in models/embeddings (subfolders with '/'). Letters, digits, '_', '-', '.'. Use it as embedding:NAME."}),
                "initializer": ("STRING", {"default": "object", "tooltip": "A word close to your subject (e.g. 'dog', 'mug'). Its tokens set the number of vectors, their start and the prior direction that kappa pulls toward."}),
                "steps": ("INT", {"default": 400, "min": 1, "max": 100000, "tooltip": "Optimisation steps. The paper uses 400 for SDXL."}),
                "batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Images per step (drawn at random from the batch). Memory grows with it."}),
                "learning_rate": ("FLOAT", {"default": 0.01, "min": 0.0001, "max": 1.0, "step": 0.0001, "tooltip": "Per-image learning rate; it is multiplied by the batch size as the reference does (0.01 x 4 = 0.04 per step). With DTI each step turns each vector by about this angle (radians)."}),
                "kappa": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0, "step": 0.00001, "tooltip": "Strength of the von Mises-Fisher prior that pulls the direction toward the initializer word. 1e-4 is the paper's SDXL value, 5e-5 its Gemma-2 (SANA) value and the authors' FLUX.2 klein and Wan value: use it for Lumina 2, Z-Image, FLUX.2 klein and Wan; 0 turns the prior off."}),
                "magnitude": (MAGNITUDES, {"default": "mean", "tooltip": "The fixed vector length m*: the mean (paper default), max or min norm of the vocabulary, or the number below."}),
                "magnitude_value": ("FLOAT", {"default": 0.4, "min": 0.001, "max": 100.0, "step": 0.001, "tooltip": "Vector length used when magnitude is 'number'."}),
                "templates": (TEMPLATES, {"default": "object", "tooltip": "Training prompts: 'object' ('a photo of a {}', ...), 'style' ('a painting in the style of {}', ...) or your own lines below."}),
                "custom_templates": ("STRING", {"default": "a photo of {}\na close-up photo of {}", "multiline": True, "tooltip": "Used when templates is 'custom': one prompt per line, each with {} where the learned word goes."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "Training resolution in pixels (multiple of 8). 0 = auto: 512 for SD1.x, Flux.1, Chroma and Wan, 768 for SD2.x, SDXL (the paper's SDXL setting) and SD3, 1024 for Lumina 2, Z-Image and FLUX.2 klein, 1328 for Qwen-Image."}),
                "horizontal_flip": ("BOOLEAN", {"default": False, "tooltip": "Also train on mirrored images (each drawn with probability 0.5). Off by default, as in the paper's recipe; leave off for text or asymmetric subjects."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False, "tooltip": "Same seed and inputs give the same embedding."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Also save NAME-stepK every this many steps (0 = only the final file). A cancelled run can resume from them."}),
                "resume_from": (_resume_choices(), {"default": NONE, "tooltip": "Continue from an embedding: a NAME-stepK checkpoint resumes at step K with the same settings; any other file only sets the starting directions."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing NAME file. Off: an existing file is never touched (re-queueing identical inputs reuses it)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "3-20 images of your subject (or leave it unconnected and name an image_folder) (one IMAGE batch is one size; for photos of different sizes use image_folder too). Each image trains at its own aspect ratio: it is resized (antialiased) to cover the nearest of SDXL's bucket sizes scaled to the training resolution, and each step trains a fresh random crop of that size. Alpha is dropped (use the mask input), grayscale is expanded to RGB."}),
                "num_vectors": ("INT", {"default": 0, "min": 0, "max": 16, "tooltip": "Number of vectors; 0 = one per initializer token. A different count starts every vector at the initializer's mean direction."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute the diffusion model's activations block by block, and the text encoders' layer by layer, in the backward pass: much less memory (most for language-model encoders: Gemma-2, Qwen3, T5), about 30-60% slower per step."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Guidance-distilled models (Flux.1 dev): train at the guidance you render with (FluxGuidance; 3.5 by default). Ignored by other models."}),
                "train_encoders": ("STRING", {"default": "all", "tooltip": "Which text encoders learn vectors: 'all' (the model's: clip_l, clip_g, t5xxl as it has them) or a comma-separated list, e.g. 't5xxl'. The others keep the initializer's vectors in the file."}),
                "mask": ("MASK", {"tooltip": "Optional: where the subject is. 1 (white) = subject, the loss counts there; 0 (black) = ignored (background, other objects). One mask for every image or one per image; resized to the images. Careful: LoadImage's MASK is 1 where the PNG is TRANSPARENT, so for a cut-out subject on a transparent background put InvertMask in between (a mask painted over the subject in the mask editor is right as it is)."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Optional: a folder inside ComfyUI's input directory (e.g. 'my-dog'). All its images (png, jpg, webp, ...) train too, each at its own size and aspect ratio, after the images batch, in file-name order. A PNG's transparency is its mask: opaque = subject."}),
                "captions": ("STRING", {"default": "", "multiline": True, "tooltip": "Optional, instead of the templates: one caption per image, in order (the images batch first, then the folder's files by name), each with {} where the learned word goes, e.g. 'a photo of {} on a beach'. Empty = use the templates."}),
                "preview_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Every this many steps (and at the end) render preview_prompt with the current vectors through ComfyUI's sampler and show it on this node; the last one is the preview output. 0 = off. Does not change what is learned; each preview costs a few sampler steps."}),
                "preview_prompt": ("STRING", {"default": "a photo of {}", "tooltip": "The preview's prompt; {} is the word being trained."}),
                "preview_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False, "tooltip": "Noise seed of every preview (fixed, so successive previews show only what the vectors changed)."}),
                "preview_steps": ("INT", {"default": 12, "min": 1, "max": 100, "tooltip": "Sampler steps per preview (euler). Previews are at most 512 px (the training resolution if smaller)."}),
                "method": (list(METHODS), {"default": "dti", "tooltip": "dti: Directional Textual Inversion (the vectors stay at the vocabulary's length m*, only their direction learns, pulled toward the initializer by kappa). ti: the plain textual-inversion baseline the paper compares with (the authors' launchers: free vectors from the initializer's rows, AdamW with weight decay 1e-2, no prior; kappa and magnitude are not used). For the authors' TI setting set learning_rate 0.005 (x batch 4 = 0.02). The file records the method."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, model, clip, vae, name, initializer, steps, batch_size, learning_rate, kappa,
            magnitude, magnitude_value, templates, custom_templates, resolution, horizontal_flip, seed,
            save_every, resume_from, overwrite, images=None, num_vectors=0, gradient_checkpointing=False, guidance=3.5,
            train_encoders="all", mask=None, image_folder="", captions="", preview_every=0,
            preview_prompt="a photo of {}", preview_seed=0, preview_steps=12, method="dti", unique_id=None):
        name = check_name(name)
        _check_numbers(steps=steps, batch_size=batch_size, learning_rate=learning_rate, kappa=kappa,
                       magnitude_value=magnitude_value, resolution=resolution, save_every=save_every,
                       num_vectors=num_vectors, guidance=guidance)
        _check_numbers(preview_every=preview_every, preview_seed=preview_seed, preview_steps=preview_steps)
        if preview_every:
            previews.check_prompt(preview_prompt)
        family = family_of(model, clip)  # refuses unsupported models and mismatched CLIPs early
        if family.enable_embeddings:
            # (Gemma's ComfyUI tokenizer never has an embeddings folder; the input CLIP is untouched)
            clip = host_text.with_embeddings_folder(clip, paths.embedding_folders())[0]
        learn = trained_encoders(family, train_encoders)
        items = host_images.load_training_images(images, mask, image_folder or "")
        per_image = bool(captions and captions.strip())
        prompts_text = (parse_captions(captions, len(items)) if per_image
                        else resolve_templates(templates, custom_templates))
        if resolution == 0:
            resolution = family.resolution
        pixels = [t for it in items for t in ((it.pixels,) if it.mask is None else (it.pixels, it.mask))]
        mag = float(magnitude_value) if magnitude == "number" else magnitude
        settings = dict(initializer=initializer, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                        kappa=kappa, magnitude=mag, templates=prompts_text, resolution=resolution,
                        horizontal_flip=bool(horizontal_flip), seed=seed, num_vectors=num_vectors,
                        resume_from=resume_from)
        if per_image:
            settings["captions"] = True
        if any(it.mask is not None for it in items):
            settings["masked"] = [it.mask is not None for it in items]
        if family.guidance:
            settings["guidance"] = float(guidance)
        if learn != family.encoders:
            settings["train_encoders"] = list(learn)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        ti = method == "ti"
        if ti:  # (only then: the fingerprints of DTI runs stay what they were)
            settings["method"] = method
        fingerprint = _fingerprint(settings, pixels, model, clip)
        path = target_path(name)

        def preview(vectors):
            # Previews never touch training's random streams (see previews.py); every encoder's
            # vectors go in, the frozen ones included, as the saved file will hold them.
            return previews.render(model, clip, vae, vectors, preview_prompt, int(preview_seed),
                                   previews.preview_size(resolution), int(preview_steps),
                                   cfg=1.0 if family.guidance else 4.0,
                                   guidance=float(guidance) if family.guidance else None, prefix=family.prompt_prefix)

        existing = None if overwrite else existing_result(path, name, fingerprint)
        if existing is not None:
            log.info("DTI Train: %s already holds the result of these exact inputs; reusing it", path)
            send_to_client("dti.done", {"node": unique_id, "name": name, "reused": True, "path": path})
            image = preview(existing.vectors) if preview_every else previews.blank()
            return _outputs(name, existing, None, f"Reused {name}: it was trained from these exact inputs. "
                            "Delete the file or enable overwrite to train again.", image)

        rate = float(learning_rate) * int(batch_size)  # the reference's scale_lr
        config = TrainConfig(steps=int(steps), lr=rate, kappa=float(kappa), seed=int(seed), checkpoint_every=int(save_every),
                             method=method)
        config.validate()

        init, mu, m_star = host_text.initial_vectors(clip, initializer, int(num_vectors), mag, keys=family.encoders)
        if ti:  # plain TI starts at the initializer's rows themselves, their norms included
            init = host_text.initializer_rows(clip, initializer, int(num_vectors), family.encoders)
        start_step, opt_state = 0, None
        if resume_from and resume_from != NONE:
            init, start_step, opt_state = _resume(resume_from, init, int(steps))
            if ti:
                start_step, opt_state = 0, None  # AdamW's moments are not saved: the file sets the start
        # Encoders left out of train_encoders keep their starting vectors (DTI: on the sphere of radius m*).
        frozen = {k: (init[k] if ti else m_star[k] * init[k]).float() for k in init if k not in learn}
        learn_init = {k: init[k] for k in learn}

        base_meta = dict(method=method, m_star=m_star, kappa=None if ti else float(kappa),
                         weight_decay=TI_WEIGHT_DECAY if ti else None, lr=rate, lr_per_image=float(learning_rate),
                         batch_size=int(batch_size), steps=int(steps), initializer=initializer, seed=int(seed),
                         model_family=family.name, resolution=resolution, version=__version__, fingerprint=fingerprint,
                         templates=templates, magnitude=str(mag), name=name,
                         guidance=float(guidance) if family.guidance else None, trained_encoders=",".join(learn))

        pbar = ui.progress_bar(int(steps), node_id=unique_id)
        pbar.update_absolute(start_step, int(steps))
        counts = {k: v.shape[0] for k, v in init.items()}
        send_to_client("dti.start", {"node": unique_id, "name": name, "steps": int(steps), "start": start_step,
                                     "m_star": m_star})

        def on_step(step, loss, norms):
            pbar.update_absolute(step, int(steps))
            send_to_client("dti.progress", {"node": unique_id, "step": step, "steps": int(steps), "loss": loss,
                                            "norms": {k: sum(v) / len(v) for k, v in norms.items()}})
            memory.check_interrupted()

        last_preview = [previews.blank()]

        def on_vectors(step, vectors):
            if not preview_every or (step % int(preview_every) and step != int(steps)):
                return
            image = preview({**fixed, **vectors})
            last_preview[0] = image
            pbar.update_absolute(step, int(steps), preview=("JPEG", previews.to_pil(image), previews.MAX_SIZE))
            # Sampling and decoding may have moved models; training needs the UNet and encoders loaded.
            memory.load_for_training(model, clip)

        def on_checkpoint(step, result):
            meta = dti_metadata(**base_meta, step=step, checkpoint_of=name,
                                ema_sq_norm={k: json.dumps(v) for k, v in result.optimizer_state.items()})
            _save_checkpoint(name, step, {**frozen, **result.vectors}, meta)

        device = memory.torch_device()
        step_fn = None
        weights = ""
        try:
            # Latents first: the VAE's own load may evict other models, and the UNet and
            # text encoders must then stay fully loaded for the whole run.
            # A dynamic-VRAM model (0.33) trains as a classic one: see memory.trainable.
            was_dynamic = memory.any_dynamic(model, clip)
            memory.start_peak(device)
            model, clip = memory.trainable(model, clip)
            latents = host_latents.encode_buckets(vae, model, items, resolution, bool(horizontal_flip))
            # Fully loaded unless the user launched with --lowvram/--novram: then ComfyUI keeps part
            # of the weights off the GPU and casts them per layer, which training follows (the
            # cast layers recast in backward, see differentiable.py).
            memory.load_for_training(model, clip)
            weights = memory.resident(model, clip)
            prompts = host_text.tokenize_templates(clip, [family.prompt_prefix + t for t in prompts_text], counts)
            with torch.inference_mode(False), torch.enable_grad():
                # normal tensors (the VAE ran under ComfyUI's inference mode)
                latents = [tl.cloned() for tl in latents]
                with differentiable(model, clip, bool(gradient_checkpointing)):
                    step_fn = host_step.DiffusionStep(model, clip, prompts, latents, None, int(batch_size),
                                                    int(seed), resolution, device,
                                                    guidance=float(guidance) if family.guidance else None,
                                                    per_image_prompts=per_image, text_mask=family.text_mask)
                    fixed = {k: v.to(device) for k, v in frozen.items()}
                    # A host op without a backward (0.36+'s kitchen RoPE has a stand-in; a later one may
                    # not) is one clear error at the first step, before anything is trained or written.
                    start = {k: (learn_init[k] if ti else m_star[k] * normalize(learn_init[k].float())) for k in learn}
                    check = step_fn.first_step_check({**fixed, **{k: v.to(device) for k, v in start.items()}}, learn)
                    result = train(learn_init, {k: mu[k] for k in learn}, {k: m_star[k] for k in learn},
                                   lambda embeds, step: step_fn({**fixed, **embeds}, step), config, device=device,
                                   start_step=start_step, optimizer_state=opt_state, on_step=on_step,
                                   on_checkpoint=on_checkpoint, on_vectors=on_vectors,
                                   loss_scale=lambda: step_fn.loss_scale, first_step_check=check)
        except NonFiniteError as e:
            raise RuntimeError(f"DTI Train stopped: {e}. Lower the learning rate or check the images.") from None
        except Exception as e:
            if not memory.is_oom(e):
                clear = kernels.diffusion_error(e)
                if clear is not None:
                    raise clear from None
                raise
            # `finally` below drops the step and frees the memory before this propagates.
            raise memory.oom_error(
                "DTI Train ran out of GPU memory. Lower batch_size or resolution, or enable "
                "gradient_checkpointing; nothing was written."
            ) from None
        finally:
            step_fn = None
            memory.release()

        line = memory.peak_line(device, was_dynamic, weights)
        if line:
            logging.info(line)
        meta = dti_metadata(**base_meta, step=int(steps))
        vectors = {**frozen, **result.vectors}
        saved = save_embedding(embeddings_root(), name, vectors, meta, overwrite=bool(overwrite))
        emb = Embedding(vectors=vectors, metadata=meta, path=saved)
        history = dict(result.history.as_dict(), m_star=m_star)
        summary = train_summary(name, counts, m_star, initializer, num_vectors=int(num_vectors),
                                final_loss=result.history.loss[-1] if result.history.loss else None, learned=learn,
                                norms={k: v.norm(dim=-1).tolist() for k, v in result.vectors.items()} if ti else None)
        send_to_client("dti.done", {"node": unique_id, "name": name, "path": saved, "reused": False,
                                    "m_star": m_star, "final_loss": result.history.loss[-1] if result.history.loss else None})
        return _outputs(name, emb, history, summary, last_preview[0])


def _outputs(name: str, emb: Embedding, history, summary: str, preview_image: torch.Tensor):
    return {"ui": {"text": [summary]}, "result": (f"embedding:{name}", emb, history or {}, preview_image)}


def _check_numbers(**values) -> None:
    ranges = {
        "steps": (1, 100000), "batch_size": (1, 64), "learning_rate": (1e-6, 1.0), "kappa": (0.0, 1.0),
        "magnitude_value": (1e-3, 100.0), "resolution": (0, 4096), "save_every": (0, 100000), "num_vectors": (0, 16),
        "guidance": (0.0, 100.0), "preview_every": (0, 100000), "preview_seed": (0, 0xFFFFFFFFFFFFFFFF),
        "preview_steps": (1, 100),
    }
    for key, value in values.items():
        lo, hi = ranges[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"{key} must be between {lo} and {hi}; got {value!r}")
    if values.get("resolution") and (values["resolution"] < 64 or values["resolution"] % 8):
        raise ValueError(f"resolution must be 0 (auto) or a multiple of 8 from 64 to 4096; got {values['resolution']}")


def _fingerprint(settings: dict, pixels, model, clip) -> str:
    """Identifies a training run's inputs, to recognise a file this exact run already wrote.
    ``pixels``: a tensor or a list of them (each image and its mask, as given)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in (pixels if isinstance(pixels, (list, tuple)) else [pixels]):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(type(model.model.model_config).__name__.encode())
    for patcher in (model, clip.patcher):
        for key in sorted(patcher.patches):
            h.update(f"{key}:{[(p[0], p[2]) for p in patcher.patches[key]]}".encode())
    with torch.inference_mode(False):
        for _, _, encoder in host_text.text_encoders(clip).values():
            h.update(host_text.vocabulary(encoder)[:4].detach().float().cpu().numpy().tobytes())
        first = next(model.model.diffusion_model.parameters())
        h.update(first.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _try_load(path: str) -> Embedding | None:
    try:
        return load_embedding(path)
    except EmbeddingFileError:
        return None


def _resume(filename: str, init: dict, steps: int):
    emb = paths.load_listed(filename)
    missing = set(init) - set(emb.vectors)
    if missing:
        raise ValueError(f"resume_from {filename}: it has no vectors for {', '.join(sorted(missing))}")
    for key, rows in init.items():
        if emb.vectors[key].shape != rows.shape:
            raise ValueError(
                f"resume_from {filename}: {key} has {emb.vectors[key].shape[0]} vector(s), this run has {rows.shape[0]}"
            )
    start = 0
    opt_state = None
    step_text = emb.metadata.get("dti.step")
    if emb.is_dti and step_text is not None and step_text.isdigit() and 0 < int(step_text) < steps:
        start = int(step_text)
        opt_state = {}
        for key in init:
            raw = emb.metadata.get(f"dti.ema_sq_norm.{key}")
            if raw:
                opt_state[key] = json.loads(raw)
    return {k: emb.vectors[k].clone() for k in init}, start, opt_state


def _save_checkpoint(name: str, step: int, vectors: dict, meta: dict) -> None:
    ck_name = f"{name}-step{step}"
    path = target_path(ck_name)
    if os.path.exists(path):
        old = _try_load(path)
        # Only our own earlier checkpoint of this name may be replaced; never a user's file.
        if old is None or old.metadata.get("dti.checkpoint_of") != name:
            raise FileExistsError(f"embeddings/{ck_name}.safetensors exists and is not a DTI checkpoint of {name}; rename one of them")
    save_embedding(embeddings_root(), ck_name, vectors, meta, overwrite=True)
