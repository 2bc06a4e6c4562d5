"""Regenerate workflows/*.json in the real ComfyUI frontend (optional; the JSON files are the product).

    COMFYUI_PATH=/opt/ComfyUI python tests/workflows/build_workflows.py [--check]

Starts ComfyUI on loopback with this pack, opens its frontend in headless Chromium (Playwright,
/usr/bin/chromium), builds every graph below with LiteGraph exactly as a user would (create nodes,
set widgets, connect, add groups), exports it the way the frontend's "Export" does
(``(await app.graphToPrompt()).workflow``), drops the ``null`` fields a freshly built graph carries
(the loader's zod schema rejects them), loads the result back with ``app.loadGraphData`` and fails
on any toast.  ``--check`` only compares with the files in workflows/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))


def _load(name, path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


h = _load("dti_workflow_harness", HERE / "harness.py")

# Colours of the frontend's palette (LGraphCanvas.node_colors).
GROUP_INPUT = "#3f789e"    # blue
GROUP_TRAIN = "#b58b2a"    # yellow
GROUP_RENDER = "#8A8"      # green
GROUP_BLEND = "#a1309b"    # purple
NOTE = {"color": "#432", "bgcolor": "#653"}

NEGATIVE = "blurry, low quality, watermark, text"


# The training photos of the train workflows: a folder under ComfyUI/input named in DTI Train's
# image_folder (each photo at its own size and aspect ratio; Batch Images would crop them to one size).
PHOTOS_TEXT = (
    f"Put 3-20 photos of your subject in the folder ComfyUI/input/{h.EXAMPLE_FOLDER} (create it; any sizes and "
    "aspect ratios: each photo trains at its own shape). To use another folder there, write its name in DTI "
    "Train's image_folder.\n\nA PNG with a transparent background trains on the subject only (opaque = "
    "subject). You can also connect an IMAGE batch (e.g. Load Image) to DTI Train's images, with an optional "
    "mask (Load Image's mask is 1 where transparent: put Invert Mask in between for a cut-out)."
)


def photos_note():
    return {"key": "photos", "type": "Note", "pos": [20, 40], "size": [540, 360], "title": "Your photos",
            "widgets": {"text": PHOTOS_TEXT}, **NOTE}


def note(key, pos, size, text, title="Note"):
    return {"key": key, "type": "Note", "pos": pos, "size": size, "title": title, "widgets": {"text": text}, **NOTE}


def train_graph(kind):
    """Photos folder (image_folder) -> DTI Train -> Replace('...{}...') -> CLIPTextEncode -> KSampler -> SaveImage."""
    xl = kind == "sdxl"
    ckpt = h.SDXL_CKPT if xl else h.SD15_CKPT
    name = "my-concept-xl" if xl else "my-concept"
    if xl:
        prompt = ("a watercolor painting of {} wearing a tiny red knitted scarf, sitting on a mossy rock beside "
                  "a misty mountain lake at sunrise, a paper boat floating nearby, soft golden light, "
                  "highly detailed")
        size, steps, cfg, sampler, scheduler = 1024, 30, 7.0, "dpmpp_2m", "karras"
    else:
        prompt = "a photo of {} on a wooden table in a sunny garden"
        size, steps, cfg, sampler, scheduler = 512, 30, 7.0, "euler", "normal"
    model_label = "SDXL" if xl else "SD1.5"
    readme = (
        f"DTI Train ({model_label}): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        f"2. On DTI Train set name (the file models/embeddings/NAME.safetensors) and initializer: a word "
        "close to your subject (dog, mug, teddy bear, ...).\n"
        "3. Queue. The DTI Train node draws the loss and the vector length against m* while it trains. "
        "The render group then uses the new word: Replace puts embedding:NAME where {} is.\n\n"
        "Later, write embedding:NAME in any prompt. Queueing the same inputs again reuses the file "
        "instead of training again; to retrain, change name or switch overwrite on."
    )
    recipe = (
        "Defaults are the paper's recipe: 400 steps, batch 4, learning rate 0.01 per image, "
        "kappa 1e-4 (pull toward the initializer), m* = mean vocabulary norm, resolution 0 = auto "
        f"({'768' if xl else '512'} px).\n\n"
        "Short of GPU memory? Lower batch_size or resolution, or turn gradient_checkpointing on.\n"
        "save_every > 0 also writes NAME-stepK files; resume_from continues from one."
    )
    nodes = [
        note("readme", [0, -330], [560, 300], readme, "Read me"),
        photos_note(),
        {"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [620, 40], "size": [360, 98],
         "widgets": {"ckpt_name": ckpt}},
        note("recipe", [620, 180], [360, 300], recipe, "Training settings"),
        {"key": "train", "type": "DTITrain", "pos": [1010, 40], "size": [420, 900],
         "widgets": {"name": name, "initializer": "dog", "steps": 400, "batch_size": 4, "learning_rate": 0.01,
                     "kappa": 0.0001, "magnitude": "mean", "templates": "object", "resolution": 0,
                     "horizontal_flip": False, "seed": 0, "save_every": 0, "resume_from": "(none)",
                     "overwrite": False, "num_vectors": 0, "gradient_checkpointing": False}},
        {"key": "prompt", "type": "StringReplace", "pos": [1490, 40], "size": [420, 220],
         "title": "Prompt ({} = the new word)",
         "widgets": {"string": prompt, "find": "{}", "replace": ""}},
        {"key": "pos", "type": "CLIPTextEncode", "pos": [1490, 300], "size": [420, 100],
         "title": "CLIP Text Encode (Positive)", "widgets": {"text": ""}},
        {"key": "neg", "type": "CLIPTextEncode", "pos": [1490, 440], "size": [420, 140],
         "title": "CLIP Text Encode (Negative)", "widgets": {"text": NEGATIVE}},
        {"key": "latent", "type": "EmptyLatentImage", "pos": [1490, 620], "size": [420, 106],
         "widgets": {"width": size, "height": size, "batch_size": 1}},
        {"key": "ksampler", "type": "KSampler", "pos": [1960, 40], "size": [320, 262],
         "widgets": {"seed": 42, "control_after_generate": "fixed", "steps": steps, "cfg": cfg,
                     "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
        {"key": "decode", "type": "VAEDecode", "pos": [1960, 350], "size": [320, 46]},
        {"key": "save", "type": "SaveImage", "pos": [2320, 40], "size": [520, 580],
         "widgets": {"filename_prefix": f"DTI/{name}"}},
    ]
    links = [
        ("ckpt", 0, "train", "model"), ("ckpt", 1, "train", "clip"), ("ckpt", 2, "train", "vae"),
        ("train", 0, "prompt", "replace"),
        ("prompt", 0, "pos", "text"),
        ("ckpt", 1, "pos", "clip"), ("ckpt", 1, "neg", "clip"),
        ("ckpt", 0, "ksampler", "model"), ("pos", 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"),
        ("ksampler", 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"),
        ("decode", 0, "save", "images"),
    ]
    groups = [
        {"title": "1. Photos of your subject", "bounding": [0, -30, 580, 450], "color": GROUP_INPUT},
        {"title": f"2. Train the new word ({model_label})", "bounding": [600, -30, 850, 990], "color": GROUP_TRAIN},
        {"title": "3. Render it", "bounding": [1470, -30, 1390, 780], "color": GROUP_RENDER},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


def _embedding_loaders(y0=40):
    return [
        {"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [20, y0], "size": [360, 98],
         "widgets": {"ckpt_name": h.SD15_CKPT}},
        {"key": "emb_a", "type": "DTILoadEmbedding", "pos": [20, y0 + 150], "size": [360, 80],
         "title": "DTI Load Embedding (A)", "widgets": {"embedding": h.CONCEPT_A}},
        {"key": "emb_b", "type": "DTILoadEmbedding", "pos": [20, y0 + 270], "size": [360, 80],
         "title": "DTI Load Embedding (B)", "widgets": {"embedding": h.CONCEPT_B}},
    ]


def _render_nodes(x, prefix, size=512, batch=1, positive=True):
    nodes = []
    if positive:
        nodes.append({"key": "pos", "type": "CLIPTextEncode", "pos": [x, 300], "size": [420, 100],
                      "title": "CLIP Text Encode (Positive)", "widgets": {"text": ""}})
    nodes += [
        {"key": "neg", "type": "CLIPTextEncode", "pos": [x, 440], "size": [420, 140],
         "title": "CLIP Text Encode (Negative)", "widgets": {"text": NEGATIVE}},
        {"key": "latent", "type": "EmptyLatentImage", "pos": [x, 620], "size": [420, 106],
         "widgets": {"width": size, "height": size, "batch_size": batch}},
        {"key": "ksampler", "type": "KSampler", "pos": [x + 470, 40], "size": [320, 262],
         "widgets": {"seed": 42, "control_after_generate": "fixed", "steps": 30, "cfg": 7.0,
                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        {"key": "decode", "type": "VAEDecode", "pos": [x + 470, 350], "size": [320, 46]},
        {"key": "save", "type": "SaveImage", "pos": [x + 830, 40], "size": [520 if batch == 1 else 900, 580],
         "widgets": {"filename_prefix": prefix}},
    ]
    return nodes


def _render_links(positive_from):
    return [
        ("ckpt", 1, "neg", "clip"),
        ("ckpt", 0, "ksampler", "model"), (positive_from, 0, "ksampler", "positive"),
        ("neg", 0, "ksampler", "negative"), ("latent", 0, "ksampler", "latent_image"),
        ("ksampler", 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"),
        ("decode", 0, "save", "images"),
    ]


def slerp_graph():
    readme = (
        "Slerp Concepts (DTI): blend two learned words into a new one\n\n"
        "DTI keeps every learned vector at the vocabulary's length and learns only its direction, so two "
        "concepts can be blended along the sphere (slerp) and the blend stays a normal-looking word.\n\n"
        "1. Pick two embeddings trained for this checkpoint (here concept_a / concept_b from models/embeddings).\n"
        "2. t = 0 gives A, t = 1 gives B, 0.5 halfway.\n"
        "3. Queue: the blend is saved as models/embeddings/NAME.safetensors and rendered; DTI Inspect shows "
        "that its length stays at m*.\n\n"
        "Trying another t? Change name (e.g. blend-0.3) or switch overwrite on: an existing file is never "
        "replaced silently. Works the same with SDXL embeddings and an SDXL checkpoint."
    )
    x = 980
    nodes = [note("readme", [0, -330], [560, 300], readme, "Read me")] + _embedding_loaders() + [
        {"key": "slerp", "type": "DTISlerpConcepts", "pos": [440, 40], "size": [360, 160],
         "widgets": {"t": 0.5, "name": "blend", "overwrite": False}},
        {"key": "inspect", "type": "DTIInspect", "pos": [440, 440], "size": [480, 180],
         "widgets": {"top_k": 5, "initializer": ""}},
        {"key": "chart", "type": "PreviewImage", "pos": [440, 660], "size": [480, 300], "title": "Norm chart"},
        {"key": "prompt", "type": "StringReplace", "pos": [x, 40], "size": [420, 220],
         "title": "Prompt ({} = the blend)",
         "widgets": {"string": "a photo of {} on a beach", "find": "{}", "replace": ""}},
    ] + _render_nodes(x, "DTI/blend")
    links = [
        ("ckpt", 1, "emb_a", "clip"), ("ckpt", 1, "emb_b", "clip"),
        ("emb_a", 1, "slerp", "embedding_a"), ("emb_b", 1, "slerp", "embedding_b"),
        ("slerp", 1, "inspect", "embedding"), ("ckpt", 1, "inspect", "clip"),
        ("inspect", 1, "chart", "images"),
        ("slerp", 0, "prompt", "replace"), ("prompt", 0, "pos", "text"), ("ckpt", 1, "pos", "clip"),
    ] + _render_links("pos")
    groups = [
        {"title": "1. Two learned concepts", "bounding": [0, -30, 400, 440], "color": GROUP_INPUT},
        {"title": "2. Blend them (slerp)", "bounding": [420, -30, 520, 1010], "color": GROUP_BLEND},
        {"title": "3. Render the blend", "bounding": [x - 20, -30, 1390, 780], "color": GROUP_RENDER},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


def strip_graph():
    readme = (
        "DTI Interpolation Strip: morph from concept A to concept B in one queue\n\n"
        "DTI Interpolation Strip encodes the prompt K times with the concept slerped from A (t = 0) to B "
        "(t = 1) and gives one CONDITIONING batch of K. One KSampler over an Empty Latent Image batch of K "
        "renders the whole strip.\n\n"
        "Keep count (K) and the latent batch_size equal (the strip is linked to the latent and refuses a "
        "mismatch). Write {} in the prompt where the concept goes. "
        "Each image gets its own noise from the seed (a latent batch), so the layout can change along "
        "the strip as well. Works the same with SDXL embeddings and an SDXL checkpoint."
    )
    x = 460
    nodes = [note("readme", [0, -330], [560, 300], readme, "Read me")] + _embedding_loaders() + [
        {"key": "strip", "type": "DTIInterpolationStrip", "pos": [x, 40], "size": [420, 220],
         "widgets": {"text": "a photo of {} on a beach", "count": 5}},
        {"key": "tvalues", "type": "PreviewAny", "pos": [20, 450], "size": [360, 150], "title": "t of each image"},
    ] + _render_nodes(x, "DTI/strip", batch=5, positive=False)
    links = [
        ("ckpt", 1, "emb_a", "clip"), ("ckpt", 1, "emb_b", "clip"),
        ("ckpt", 1, "strip", "clip"), ("emb_a", 1, "strip", "embedding_a"), ("emb_b", 1, "strip", "embedding_b"),
        ("strip", 1, "tvalues", "source"),
        ("latent", 0, "strip", "latent"),  # the strip checks count against the batch it is sampled with
    ] + _render_links("strip")
    groups = [
        {"title": "1. Two learned concepts", "bounding": [0, -30, 400, 660], "color": GROUP_INPUT},
        {"title": "2. A -> B in K steps, rendered as one batch", "bounding": [x - 20, -30, 2190, 780],
         "color": GROUP_BLEND},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


DIT_TRAIN_DEFAULTS = {"name": "", "initializer": "dog", "steps": 400, "batch_size": 4, "learning_rate": 0.01,
                      "kappa": 0.0001, "magnitude": "mean", "templates": "object", "resolution": 0,
                      "horizontal_flip": False, "seed": 0, "save_every": 0, "resume_from": "(none)",
                      "overwrite": False, "num_vectors": 0, "gradient_checkpointing": False, "guidance": 3.5,
                      "train_encoders": "all"}
RENDER_X = 1490


def _column(nodes, x=RENDER_X, y=300, gap=40):
    """Stack nodes (dicts with a size, no pos) from y down at x, each at least gap below the last,
    on a 20 px grid; returns where a next one would go."""
    for n in nodes:
        n["pos"] = [x, y]
        y = -(-(y + n["size"][1] + gap) // 20) * 20
    return y


def dit_train_graph(*, label, name, readme, loaders, model, clip, vae, prompt, sampler, train=None, text_clip=None,
                    before_text=(), positive=None, negative=("CLIP Text Encode (Negative)", NEGATIVE, 140),
                    extra_links=(), height=1050, latent="EmptySD3LatentImage", latent_widgets=None, render_model=None):
    """One DiT train workflow: photos note + loader nodes -> DTI Train -> Replace('...{}...') -> [before_text]
    -> CLIPTextEncode (+ negative) -> [positive] -> KSampler (EmptySD3LatentImage) -> VAEDecode -> SaveImage.

    ``model`` / ``clip`` / ``vae``: (loader key, output slot).  ``text_clip``: the CLIP the render's
    encoders read (default ``clip``).  ``render_model``: the MODEL the sampler reads (default ``model``).
    ``before_text``: nodes stacked above the positive encoder (DTI Enable Embeddings, a sampling shift);
    ``positive``: a node between the positive encoder and the sampler
    (FluxGuidance), reading ``conditioning``.  ``negative``: (title, text, height); text None: a
    ConditioningZeroOut of the positive instead of a second encode (cfg 1 never reads the negative, and
    an encode of "" through T5-XXL or Qwen3 costs as much as the prompt's).
    ``sampler``: KSampler's steps, cfg, sampler_name, scheduler."""
    text_clip = text_clip or clip
    render_model = render_model or model
    neg_title, neg_text, neg_height = negative
    column = list(before_text) + [
        {"key": "pos", "type": "CLIPTextEncode", "size": [420, 100], "title": "CLIP Text Encode (Positive)",
         "widgets": {"text": ""}},
    ] + ([positive] if positive else []) + [
        {"key": "neg", "type": "ConditioningZeroOut", "size": [420, neg_height], "title": neg_title}
        if neg_text is None else
        {"key": "neg", "type": "CLIPTextEncode", "size": [420, neg_height], "title": neg_title,
         "widgets": {"text": neg_text}},
        {"key": "latent", "type": latent, "size": [420, 106],
         "widgets": latent_widgets or {"width": 1024, "height": 1024, "batch_size": 1}},
    ]
    bottom = _column(column)
    nodes = [
        note("readme", [0, -330], [560, 300], readme, "Read me"),
        photos_note(),
        *loaders,
        {"key": "train", "type": "DTITrain", "pos": [1010, 40], "size": [420, 960],
         "widgets": {**DIT_TRAIN_DEFAULTS, "name": name, **(train or {})}},
        {"key": "prompt", "type": "StringReplace", "pos": [RENDER_X, 40], "size": [420, 220],
         "title": "Prompt ({} = the new word)", "widgets": {"string": prompt, "find": "{}", "replace": ""}},
        *column,
        {"key": "ksampler", "type": "KSampler", "pos": [1960, 40], "size": [320, 262],
         "widgets": {"seed": 42, "control_after_generate": "fixed", "denoise": 1.0, **sampler}},
        {"key": "decode", "type": "VAEDecode", "pos": [1960, 350], "size": [320, 46]},
        {"key": "save", "type": "SaveImage", "pos": [2320, 40], "size": [520, 580],
         "widgets": {"filename_prefix": f"DTI/{name}"}},
    ]
    pos_out = positive["key"] if positive else "pos"
    links = [
        (*model, "train", "model"), (*clip, "train", "clip"), (*vae, "train", "vae"),
        ("train", 0, "prompt", "replace"),
        *extra_links,
        ("prompt", 0, "pos", "text"), (*text_clip, "pos", "clip"),
        ("pos", 0, "neg", "conditioning") if neg_text is None else (*text_clip, "neg", "clip"),
        *([("pos", 0, positive["key"], "conditioning")] if positive else []),
        (*render_model, "ksampler", "model"), (pos_out, 0, "ksampler", "positive"), ("neg", 0, "ksampler", "negative"),
        ("latent", 0, "ksampler", "latent_image"),
        ("ksampler", 0, "decode", "samples"), (*vae, "decode", "vae"),
        ("decode", 0, "save", "images"),
    ]
    groups = [
        {"title": "1. Photos of your subject", "bounding": [0, -30, 580, 450], "color": GROUP_INPUT},
        {"title": f"2. Train the new word ({label})", "bounding": [600, -30, 850, height], "color": GROUP_TRAIN},
        {"title": "3. Render it", "bounding": [RENDER_X - 20, -30, 1390, bottom], "color": GROUP_RENDER},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


def _unet(name):
    return {"key": "unet", "type": "UNETLoader", "pos": [620, 40], "size": [360, 82],
            "widgets": {"unet_name": name, "weight_dtype": "default"}}


def _clip_loader(name, clip_type):
    return {"key": "clip", "type": "CLIPLoader", "pos": [620, 170], "size": [360, 106],
            "widgets": {"clip_name": name, "type": clip_type, "device": "default"}}


def _vae(name=None):
    return {"key": "vae", "type": "VAELoader", "pos": [620, 340], "size": [360, 58],
            "widgets": {"vae_name": name or h.FLUX_VAE}}


PIER = "a photo of {} sitting on a wooden pier at a mountain lake, morning mist"


def flux_graph():
    """Flux.1 dev from its three files: UNETLoader + DualCLIPLoader (flux) + VAELoader -> DTI Train ->
    Replace -> CLIPTextEncode -> FluxGuidance -> KSampler (cfg 1) -> SaveImage."""
    readme = (
        "DTI Train (Flux.1 dev): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load Flux.1 dev the usual way: flux1-dev in models/diffusion_models, clip_l and t5xxl in "
        "models/text_encoders, ae in models/vae (fp8 files work: the weights are cast per layer, and "
        "training never keeps a second copy).\n"
        "3. On DTI Train set name and initializer. It learns a CLIP-L and a T5-XXL vector for the word, "
        "each at its own vocabulary's length m*, at the guidance you render with (3.5).\n"
        "4. Queue. The render uses FluxGuidance 3.5 and cfg 1, as Flux dev is meant to run.\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution (512 by default) or batch_size."
    )
    return dit_train_graph(
        label="Flux.1 dev", name="my-concept-flux", readme=readme,
        loaders=[_unet(h.FLUX_DIT),
                 {"key": "clip", "type": "DualCLIPLoader", "pos": [620, 170], "size": [360, 130],
                  "widgets": {"clip_name1": h.FLUX_CLIP_L, "clip_name2": h.FLUX_T5, "type": "flux",
                              "device": "default"}},
                 _vae()],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), prompt=PIER,
        positive={"key": "guid", "type": "FluxGuidance", "size": [420, 58], "widgets": {"guidance": 3.5}},
        negative=("Negative (zeroed: cfg 1 does not read it)", None, 46),
        sampler={"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"})


LUMINA2_SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of "
                  "image-text alignment based on textual prompts or user prompts. <Prompt Start> ")


def lumina2_graph():
    """Lumina 2 from its three files: UNETLoader + CLIPLoader (lumina2) + VAELoader -> DTI Train ->
    Replace -> DTI Enable Embeddings -> CLIPTextEncode (with the system prompt) -> KSampler -> SaveImage."""
    readme = (
        "DTI Train (Lumina 2 / Neta Lumina): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load Lumina 2 the usual way: the model in models/diffusion_models, gemma_2_2b in "
        "models/text_encoders (CLIPLoader type lumina2), ae in models/vae.\n"
        "3. DTI Train learns Gemma-2 vectors at Gemma's mean vocabulary length m*, on prompts that start "
        "with Lumina's system prompt (as CLIP Text Encode for Lumina2 adds it). Settings from the authors' "
        "Gemma-2 (SANA) recipe: kappa 5e-5, 500 steps, batch 4, 1024 px (resolution 0 = auto).\n"
        "4. ComfyUI's Gemma tokenizer ignores embedding:NAME: the prompt goes through DTI Enable "
        "Embeddings first, then a stock CLIP Text Encode reads the word.\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution or batch_size."
    )
    return dit_train_graph(
        label="Lumina 2", name="my-concept-lumina", readme=readme,
        loaders=[_unet(h.LUMINA2_DIT),
                 _clip_loader(h.LUMINA2_GEMMA, "lumina2"),
                 _vae()],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), train={"steps": 500, "kappa": 0.00005},
        prompt=LUMINA2_SYSTEM + PIER,
        before_text=[{"key": "enable", "type": "DTIEnableEmbeddings", "size": [420, 80]}],
        extra_links=[("clip", 0, "enable", "clip")], text_clip=("enable", 0),
        negative=("CLIP Text Encode (Negative)", LUMINA2_SYSTEM + NEGATIVE, 140),
        sampler={"steps": 25, "cfg": 4.0, "sampler_name": "res_multistep", "scheduler": "simple"})


def z_image_graph():
    """Z-Image as ComfyUI's Z-Image template loads it: UNETLoader + CLIPLoader (lumina2, Qwen3-4B) + VAELoader
    -> DTI Train -> Replace -> CLIPTextEncode (the stock one reads embedding:NAME) -> KSampler -> SaveImage."""
    readme = (
        "DTI Train (Z-Image): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load Z-Image as ComfyUI's Z-Image template does: z_image_turbo in models/diffusion_models, "
        "qwen_3_4b in models/text_encoders (CLIPLoader type lumina2), ae in models/vae. Needs ComfyUI 0.33 or newer.\n"
        "3. DTI Train learns a Qwen3-4B vector for the word at Qwen3's mean vocabulary length m*; ComfyUI's "
        "tokenizer wraps every prompt in Qwen's chat template, in training as in the render. kappa 5e-5 (the "
        "authors' value for language-model encoders), 500 steps, batch 4, 1024 px (resolution 0 = auto).\n"
        "4. Queue. The stock CLIP Text Encode reads embedding:NAME; the render uses Z-Image Turbo's settings "
        "(9 steps, cfg 1, res_multistep).\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution or batch_size."
    )
    return dit_train_graph(
        label="Z-Image", name="my-concept-zimage", readme=readme,
        loaders=[_unet(h.ZIMAGE_DIT), _clip_loader(h.ZIMAGE_QWEN3, "lumina2"), _vae()],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), train={"steps": 500, "kappa": 0.00005},
        prompt=PIER, negative=("Negative (zeroed: cfg 1 does not read it)", None, 46),
        sampler={"steps": 9, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple"})


def flux2_klein_graph():
    """FLUX.2 klein as ComfyUI's klein templates load it: UNETLoader + CLIPLoader (flux2, Qwen3-4B) + VAELoader
    -> DTI Train (the authors' klein config) -> Replace -> CLIPTextEncode -> KSampler (EmptyFlux2LatentImage)."""
    readme = (
        "DTI Train (FLUX.2 klein): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load FLUX.2 klein as ComfyUI's klein templates do: the klein model in models/diffusion_models, "
        "qwen_3_4b in models/text_encoders (CLIPLoader type flux2; qwen_3_8b for klein 9B), flux2-vae in "
        "models/vae. Needs ComfyUI 0.33 or newer.\n"
        "3. DTI Train learns a Qwen3 vector for the word at Qwen3's mean vocabulary length m*, through klein's "
        "own encoder (three Qwen3 layers, 512 tokens). The authors' klein config: kappa 5e-5, 1000 steps, "
        "batch 4, 1024 px (resolution 0 = auto).\n"
        "4. Queue. The stock CLIP Text Encode reads embedding:NAME; the render uses the klein base model at "
        "cfg 4 (the authors' guidance). With the distilled klein, set steps 4 and cfg 1.\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution or batch_size."
    )
    return dit_train_graph(
        label="FLUX.2 klein", name="my-concept-klein", readme=readme,
        loaders=[_unet(h.FLUX2_KLEIN_DIT), _clip_loader(h.FLUX2_QWEN3, "flux2"), _vae(h.FLUX2_VAE)],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), train={"steps": 1000, "kappa": 0.00005},
        prompt=PIER, latent="EmptyFlux2LatentImage",
        sampler={"steps": 28, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple"})


def wan_graph():
    """Wan 2.1 text-to-video as ComfyUI's Wan template loads it: UNETLoader + CLIPLoader (wan, UMT5-XXL) +
    VAELoader -> DTI Train (the authors' Wan launcher, on still photos) -> Replace -> DTI Enable Embeddings
    -> CLIPTextEncode -> KSampler (EmptyHunyuanLatentVideo, 33 frames) -> VAEDecode -> SaveImage (frames)."""
    readme = (
        "DTI Train (Wan 2.1 / 2.2 text-to-video): teach the video model a new word from photos\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load Wan as ComfyUI's Wan template does: wan2.1_t2v_1.3B in models/diffusion_models (or a Wan 2.2 "
        "A14B expert), umt5_xxl in models/text_encoders (CLIPLoader type wan), wan_2.1_vae in models/vae.\n"
        "3. DTI Train learns a UMT5-XXL vector for the word from still photos, each a one-frame video, as the "
        "authors' Wan launcher: kappa 5e-5, 500 steps, 512 px.\n"
        "4. ComfyUI's UMT5 tokenizer ignores embedding:NAME: the prompt goes through DTI Enable Embeddings "
        "first, then a stock CLIP Text Encode reads the word. The render is a 33-frame video (saved as frames), "
        "cfg 5 (the authors' guidance), uni_pc.\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution or batch_size."
    )
    return dit_train_graph(
        label="Wan", name="my-concept-wan", readme=readme,
        loaders=[_unet(h.WAN_DIT), _clip_loader(h.WAN_UMT5, "wan"), _vae(h.WAN_VAE)],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), train={"steps": 500, "kappa": 0.00005},
        prompt=PIER,
        before_text=[{"key": "enable", "type": "DTIEnableEmbeddings", "size": [420, 80]}],
        extra_links=[("clip", 0, "enable", "clip")], text_clip=("enable", 0),
        latent="EmptyHunyuanLatentVideo", latent_widgets={"width": 832, "height": 480, "length": 33, "batch_size": 1},
        sampler={"steps": 30, "cfg": 5.0, "sampler_name": "uni_pc", "scheduler": "simple"})


def qwen_image_graph():
    """Qwen-Image as ComfyUI's Qwen-Image template loads it: UNETLoader + CLIPLoader (qwen_image, Qwen2.5-VL-7B)
    + VAELoader -> DTI Train -> Replace -> DTI Enable Embeddings -> CLIPTextEncode -> KSampler on the model
    through ModelSamplingAuraFlow (shift 3.1, the template's) -> VAEDecode -> SaveImage."""
    readme = (
        "DTI Train (Qwen-Image): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load Qwen-Image as ComfyUI's Qwen-Image template does: qwen_image in models/diffusion_models, "
        "qwen_2.5_vl_7b in models/text_encoders (CLIPLoader type qwen_image), qwen_image_vae in models/vae.\n"
        "3. DTI Train learns a Qwen2.5 vector for the word at its mean vocabulary length m*; 1328 px "
        "(resolution 0 = auto, the template's size), kappa 5e-5, 500 steps (the authors published no "
        "Qwen-Image recipe: these are their language-model settings).\n"
        "4. ComfyUI's Qwen-Image tokenizer ignores embedding:NAME and breaks on a learned word: the prompt goes "
        "through DTI Enable Embeddings first, then a stock CLIP Text Encode reads the word. The render is the "
        "template's: shift 3.1, 20 steps, cfg 2.5, euler.\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution or batch_size."
    )
    return dit_train_graph(
        label="Qwen-Image", name="my-concept-qwen-image", readme=readme,
        loaders=[_unet(h.QWEN_IMAGE_DIT), _clip_loader(h.QWEN_IMAGE_TE, "qwen_image"), _vae(h.QWEN_IMAGE_VAE)],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), train={"steps": 500, "kappa": 0.00005},
        prompt=PIER,
        before_text=[{"key": "enable", "type": "DTIEnableEmbeddings", "size": [420, 80]},
                     {"key": "shift", "type": "ModelSamplingAuraFlow", "size": [420, 60], "widgets": {"shift": 3.1}}],
        extra_links=[("clip", 0, "enable", "clip"), ("unet", 0, "shift", "model")], text_clip=("enable", 0),
        render_model=("shift", 0), latent_widgets={"width": 1328, "height": 1328, "batch_size": 1},
        sampler={"steps": 20, "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple"})


# The paper's evaluation prompts: a simple one and a long one (its Japanese-street validation prompt).
EVAL_PROMPTS = ("a photo of {}", "a {} with Japanese modern city street in the background, cherry blossoms, "
                "evening light, detailed")


def dti_vs_ti_graph():
    """SD1.5: one photo folder -> DTI Train (dti) and DTI Train (ti) -> for each: 2 prompts x the same seeds
    -> ImageBatch -> DTI Evaluate (DINOv2 image score; CLIP-T with clip_l + CLIP ViT-L/14) -> ImageStitch of
    the two render batches (side by side) -> SaveImage; the two charts stitched -> PreviewImage."""
    readme = (
        "DTI vs plain TI on your subject, scored as the paper scores them\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Models: v1-5-pruned-emaonly (models/checkpoints) trains and renders. For the scores: "
        "dinov2-large (models/clip_vision: facebook/dinov2-large, the image score), clip-vit-large-patch14 "
        "(models/clip_vision, CLIP ViT-L/14) with clip_l (models/text_encoders, the one Flux and SD3 use: it "
        "carries the text projection) for the text score.\n"
        "3. Queue. Both words train on the same photos (DTI: the paper's recipe; TI: the authors' baseline, "
        "AdamW, lr 0.005 x 4). Each renders a simple and a long prompt at the same seeds; DTI Evaluate shows "
        "image score (looks like the photos) and text score (follows the prompt without the word).\n\n"
        "The paper's claim: at a similar image score, DTI keeps the text score where TI loses it, since TI's "
        "vector grows far beyond the vocabulary's length. The saved grid has DTI on the left, TI on the right."
    )
    nodes = [note("readme", [0, -330], [560, 300], readme, "Read me"), photos_note(),
             {"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [620, 40], "size": [360, 98],
              "widgets": {"ckpt_name": h.SD15_CKPT}},
             {"key": "dino", "type": "CLIPVisionLoader", "pos": [620, 180], "size": [360, 60],
              "title": "Image score model (DINOv2)", "widgets": {"clip_name": h.DINOV2_LARGE}},
             {"key": "vitl", "type": "CLIPVisionLoader", "pos": [620, 280], "size": [360, 60],
              "title": "Text score: vision (CLIP ViT-L/14)", "widgets": {"clip_name": h.CLIP_VISION_VITL}},
             {"key": "clipl", "type": "CLIPLoader", "pos": [620, 380], "size": [360, 82],
              "title": "Text score: text (clip_l)", "widgets": {"clip_name": h.FLUX_CLIP_L, "type": "stable_diffusion"}},
             {"key": "neg", "type": "CLIPTextEncode", "pos": [620, 520], "size": [360, 100],
              "title": "CLIP Text Encode (Negative)", "widgets": {"text": NEGATIVE}},
             {"key": "latent", "type": "EmptyLatentImage", "pos": [620, 660], "size": [360, 106],
              "title": "Seeds: the batch (same for both)", "widgets": {"width": 512, "height": 512, "batch_size": 4}}]
    links = [("ckpt", 1, "neg", "clip")]
    lines = "\n".join(EVAL_PROMPTS)
    for row, (method, lr, label) in enumerate((("dti", 0.01, "DTI"), ("ti", 0.005, "plain TI"))):
        y = 40 + row * 1000
        train = f"train_{method}"
        nodes.append({"key": train, "type": "DTITrain", "pos": [1010, y], "size": [420, 940],
                      "title": f"DTI Train ({label})",
                      "widgets": {**DIT_TRAIN_DEFAULTS, "name": f"my-concept-{method}", "learning_rate": lr,
                                  "method": method}})
        links += [("ckpt", 0, train, "model"), ("ckpt", 1, train, "clip"), ("ckpt", 2, train, "vae")]
        for k, text in enumerate(EVAL_PROMPTS):
            x = RENDER_X + k * 460
            rep, pos, ks, dec = (f"{t}_{method}_{k}" for t in ("prompt", "pos", "ks", "dec"))
            nodes += [{"key": rep, "type": "StringReplace", "pos": [x, y], "size": [420, 180],
                       "title": f"{label}: prompt {k + 1}", "widgets": {"string": text, "find": "{}", "replace": ""}},
                      {"key": pos, "type": "CLIPTextEncode", "pos": [x, y + 220], "size": [420, 100],
                       "widgets": {"text": ""}},
                      {"key": ks, "type": "KSampler", "pos": [x, y + 360], "size": [420, 262],
                       "widgets": {"seed": 0, "control_after_generate": "fixed", "steps": 30, "cfg": 7.0,
                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
                      {"key": dec, "type": "VAEDecode", "pos": [x, y + 660], "size": [420, 46]}]
            links += [(train, 0, rep, "replace"), (rep, 0, pos, "text"), ("ckpt", 1, pos, "clip"),
                      ("ckpt", 0, ks, "model"), (pos, 0, ks, "positive"), ("neg", 0, ks, "negative"),
                      ("latent", 0, ks, "latent_image"), (ks, 0, dec, "samples"), ("ckpt", 2, dec, "vae")]
        batch, ev = f"batch_{method}", f"eval_{method}"
        nodes += [{"key": batch, "type": "ImageBatch", "pos": [RENDER_X + 920, y], "size": [300, 46],
                   "title": f"{label}: both prompts"},
                  {"key": ev, "type": "DTIEvaluate", "pos": [RENDER_X + 920, y + 100], "size": [460, 520],
                   "title": f"DTI Evaluate ({label})",
                   "widgets": {"reference_folder": h.EXAMPLE_FOLDER, "prompts": lines}}]
        links += [(f"dec_{method}_0", 0, batch, "image1"), (f"dec_{method}_1", 0, batch, "image2"),
                  (batch, 0, ev, "generated"), ("dino", 0, ev, "image_vision"), ("clipl", 0, ev, "clip"),
                  ("vitl", 0, ev, "text_vision")]
    out_x = RENDER_X + 1420
    nodes += [{"key": "grid", "type": "ImageStitch", "pos": [out_x, 40], "size": [320, 150],
               "title": "DTI (left) | TI (right)", "widgets": {"direction": "right", "match_image_size": True,
                                                            "spacing_width": 16, "spacing_color": "white"}},
              {"key": "save", "type": "SaveImage", "pos": [out_x, 240], "size": [520, 580],
               "widgets": {"filename_prefix": "DTI/dti-vs-ti"}},
              {"key": "charts", "type": "ImageStitch", "pos": [out_x, 1040], "size": [320, 150],
               "title": "Scores: DTI (top) | TI (bottom)", "widgets": {"direction": "down", "match_image_size": False,
                                                                       "spacing_width": 8, "spacing_color": "black"}},
              {"key": "chart_view", "type": "PreviewImage", "pos": [out_x, 1240], "size": [520, 420]}]
    links += [("batch_dti", 0, "grid", "image1"), ("batch_ti", 0, "grid", "image2"), ("grid", 0, "save", "images"),
              ("eval_dti", 5, "charts", "image1"), ("eval_ti", 5, "charts", "image2"),
              ("charts", 0, "chart_view", "images")]
    groups = [
        {"title": "1. Photos of your subject", "bounding": [0, -30, 580, 450], "color": GROUP_INPUT},
        {"title": "2. Models", "bounding": [600, -30, 400, 820], "color": GROUP_INPUT},
        {"title": "3. DTI: train, render, score", "bounding": [1000, -30, 2400, 990], "color": GROUP_TRAIN},
        {"title": "4. Plain TI: train, render, score", "bounding": [1000, 970, 2400, 990], "color": GROUP_BLEND},
        {"title": "5. Side by side", "bounding": [out_x - 20, -30, 580, 1720], "color": GROUP_RENDER},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


def sd35_graph():
    """SD3.5 as ComfyUI's SD3.5 examples load it: CheckpointLoaderSimple (MMDiT + VAE) + TripleCLIPLoader
    (clip_l, clip_g, t5xxl) -> DTI Train (all three encoders) -> Replace -> CLIPTextEncode -> KSampler -> SaveImage."""
    readme = (
        "DTI Train (SD3.5): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load SD3.5 as ComfyUI's SD3.5 examples do: sd3.5_medium (or sd3.5_large) in models/checkpoints "
        "for the model and VAE; clip_l, clip_g and t5xxl in models/text_encoders (Triple CLIP Loader).\n"
        "3. On DTI Train set name and initializer. It learns a CLIP-L, a CLIP-G and a T5-XXL vector for "
        "the word, each at its own vocabulary's length m* (train_encoders picks fewer).\n"
        "4. Queue. The render uses SD3.5's usual settings: cfg 4, euler, sgm_uniform.\n\n"
        "A single file with the CLIPs built in (no T5) also trains, from Load Checkpoint alone: the word "
        "then lives in CLIP-L/G only.\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution (768 by default) or batch_size."
    )
    return dit_train_graph(
        label="SD3.5", name="my-concept-sd35", readme=readme,
        loaders=[{"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [620, 40], "size": [360, 98],
                  "widgets": {"ckpt_name": h.SD35_MEDIUM_CKPT}},
                 {"key": "clip", "type": "TripleCLIPLoader", "pos": [620, 180], "size": [360, 130],
                  "widgets": {"clip_name1": h.FLUX_CLIP_L, "clip_name2": h.SD35_CLIP_G, "clip_name3": h.FLUX_T5}}],
        model=("ckpt", 0), clip=("clip", 0), vae=("ckpt", 2), prompt=PIER,
        sampler={"steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "sgm_uniform"})


# Chroma reads natural sentences, negative prompt included (as in ComfyUI's Chroma template).
CHROMA_NEGATIVE = ("This low quality image is blurry and unfinished, with artifacts, oversaturated colors, "
                   "bold outlines and a watermark.")


def chroma_graph():
    """Chroma from its three files: UNETLoader + CLIPLoader (chroma, T5-XXL) + VAELoader -> DTI Train ->
    Replace -> CLIPTextEncode + negative -> KSampler (real cfg) -> SaveImage."""
    readme = (
        "DTI Train (Chroma): teach the model a new word for your subject\n\n"
        f"1. Put 3-20 photos of your subject in ComfyUI/input/{h.EXAMPLE_FOLDER} (see Your photos).\n"
        "2. Load Chroma as ComfyUI's Chroma template does: Chroma1-HD in models/diffusion_models, t5xxl in "
        "models/text_encoders (Load CLIP, type chroma), ae in models/vae (fp8 files work).\n"
        "3. On DTI Train set name and initializer. It learns a T5-XXL vector for the word at T5's mean "
        "vocabulary length m*.\n"
        "4. Queue. Chroma is not guidance-distilled: the render uses real cfg (3.5) with a negative prompt, "
        "26 steps, euler, beta, as ComfyUI's Chroma template.\n\n"
        "Short of memory? Turn gradient_checkpointing on, lower resolution (512 by default) or batch_size."
    )
    return dit_train_graph(
        label="Chroma", name="my-concept-chroma", readme=readme,
        loaders=[_unet(h.CHROMA_DIT),
                 _clip_loader(h.FLUX_T5, "chroma"),
                 _vae()],
        model=("unet", 0), clip=("clip", 0), vae=("vae", 0), prompt=PIER,
        negative=("CLIP Text Encode (Negative)", CHROMA_NEGATIVE, 140),
        sampler={"steps": 26, "cfg": 3.5, "sampler_name": "euler", "scheduler": "beta"})


GRAPHS = {
    "dti_train_sd15.json": lambda: train_graph("sd15"),
    "dti_train_sdxl.json": lambda: train_graph("sdxl"),
    "dti_slerp_concepts.json": slerp_graph,
    "dti_interpolation_strip.json": strip_graph,
    "dti_train_flux_dev.json": flux_graph,
    "dti_train_lumina2.json": lumina2_graph,
    "dti_train_sd35.json": sd35_graph,
    "dti_train_chroma.json": chroma_graph,
    "dti_train_z_image.json": z_image_graph,
    "dti_train_flux2_klein.json": flux2_klein_graph,
    "dti_train_wan.json": wan_graph,
    "dti_train_qwen_image.json": qwen_image_graph,
    "dti_vs_ti.json": dti_vs_ti_graph,
}


BUILD_JS = r"""
async (spec) => {
  app.graph.clear();
  const byKey = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${n.type}`);
    app.graph.add(node);
    node.pos = n.pos;
    if (n.title) node.title = n.title;
    for (const [name, value] of Object.entries(n.widgets || {})) {
      const w = (node.widgets || []).find((w) => w.name === name);
      if (!w) throw new Error(`${n.type} has no widget ${name}: ${(node.widgets || []).map((w) => w.name)}`);
      w.value = value;
    }
    if (n.size) node.size = [Math.max(n.size[0], node.size[0]), Math.max(n.size[1], node.computeSize()[1])];
    if (n.color) node.color = n.color;
    if (n.bgcolor) node.bgcolor = n.bgcolor;
    byKey[n.key] = node;
  }
  for (const [a, slot, b, input] of spec.links) {
    const target = byKey[b];
    const idx = target.inputs.findIndex((i) => i.name === input);
    if (idx < 0) throw new Error(`${target.type} has no input ${input}`);
    if (!byKey[a].connect(slot, target, idx)) throw new Error(`cannot connect ${a}.${slot} -> ${b}.${input}`);
  }
  spec.groups.forEach((g, i) => {
    const group = new LiteGraph.LGraphGroup(g.title);
    group.configure({ id: i + 1, title: g.title, bounding: g.bounding, color: g.color, font_size: 24, flags: {} });
    app.graph.add(group);
  });
  app.canvas.ds.offset = [40, 360];
  app.canvas.ds.scale = 0.6;
  const p = await app.graphToPrompt();
  return p.workflow;
}
"""


def drop_nulls(obj, path=""):
    """Remove keys whose value is null (the frontend's own serializer leaves them on fresh nodes and the
    loader's zod schema rejects several); keep nulls inside widgets_values."""
    if isinstance(obj, dict):
        return {k: (v if k == "widgets_values" else drop_nulls(v, f"{path}.{k}")) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_nulls(v, path) for v in obj]
    return obj


def tidy(workflow):
    wf = drop_nulls(workflow)
    wf["id"] = "00000000-0000-0000-0000-000000000000"
    wf.setdefault("extra", {}).setdefault("ds", {"scale": 0.6, "offset": [40, 360]})
    return wf


def _with_photo_folder(graph):
    for node in graph["nodes"]:
        if node["type"] == "DTITrain":
            node.setdefault("widgets", {})["image_folder"] = h.EXAMPLE_FOLDER
    return graph


def build_all(page, only=None):
    out = {}
    for filename, make in GRAPHS.items():
        if only and filename not in only:
            continue
        wf = tidy(page.evaluate(BUILD_JS, _with_photo_folder(make())))
        out[filename] = wf
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare with workflows/*.json")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "/opt/ComfyUI"))
    ap.add_argument("--only", action="append", help="build only this workflow file (repeatable): a workflow "
                    "that needs a newer ComfyUI is built there without rewriting the others")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="dti-build-") as tmp:
        server = h.ComfyServer(args.comfyui, tmp)
        server.prepare()
        # Only the names matter while building (nothing runs): empty placeholder files.
        for name in (h.SD15_CKPT, h.SDXL_CKPT, h.SD35_MEDIUM_CKPT):
            (server.checkpoints / name).write_bytes(b"")
        for folder, name in (("diffusion_models", h.FLUX_DIT), ("text_encoders", h.FLUX_CLIP_L),
                             ("text_encoders", h.FLUX_T5), ("vae", h.FLUX_VAE),
                             ("diffusion_models", h.LUMINA2_DIT), ("text_encoders", h.LUMINA2_GEMMA),
                             ("text_encoders", h.SD35_CLIP_G), ("diffusion_models", h.CHROMA_DIT),
                             ("diffusion_models", h.ZIMAGE_DIT), ("text_encoders", h.ZIMAGE_QWEN3),
                             ("diffusion_models", h.FLUX2_KLEIN_DIT), ("vae", h.FLUX2_VAE),
                             ("diffusion_models", h.WAN_DIT), ("text_encoders", h.WAN_UMT5), ("vae", h.WAN_VAE)):
            (server.folder("models", folder) / name).write_bytes(b"")
        h.write_example_images(server.input)
        h.write_concept_embeddings(server.embeddings)
        server.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=h.BROWSER_ARGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(server.url + "/", timeout=60000)
                page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=60000)
                page.keyboard.press("Escape")
                built = build_all(page, args.only)
                problems = []
                for filename, wf in built.items():
                    target = h.WORKFLOWS_DIR / filename
                    text = json.dumps(wf, indent=2, ensure_ascii=False) + "\n"
                    if args.check:
                        if not target.exists() or target.read_text() != text:
                            problems.append(f"{filename} differs from what the builder makes")
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_text(text)
                        print(f"wrote {target.relative_to(REPO)} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)")
                browser.close()
        finally:
            server.stop()
    if problems:
        print("\n".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
