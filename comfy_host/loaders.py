"""Loading a model as ComfyUI's loader nodes do (for the command line, which runs without a server)."""

from __future__ import annotations

import torch

import comfy.sd
import comfy.utils

from .paths import embedding_folders


def load_model(model: dict):
    """``(MODEL, CLIP, VAE)`` through the calls ComfyUI's loader nodes make, under inference mode
    as ComfyUI's executor runs them."""
    embeddings = embedding_folders()
    with torch.inference_mode():
        if model.get("checkpoint"):
            out = comfy.sd.load_checkpoint_guess_config(model["checkpoint"], output_vae=True, output_clip=True,
                                                        embedding_directory=embeddings)
            m, clip, vae = out[:3]
            if clip is None or vae is None:
                raise ValueError(f"{model['checkpoint']} has no text encoder or no VAE; give --diffusion-model, "
                                 f"--text-encoder and --vae instead")
            return m, clip, vae
        encoders = model["text_encoders"] if isinstance(model["text_encoders"], list) else [model["text_encoders"]]
        type_name = model.get("clip_type") or ("stable_diffusion" if len(encoders) == 1 else "flux")
        clip_type = getattr(comfy.sd.CLIPType, str(type_name).upper(), None)
        if clip_type is None:
            raise ValueError(f"unknown --clip-type {type_name!r}; one of "
                             f"{', '.join(t.name.lower() for t in comfy.sd.CLIPType)}")
        m = comfy.sd.load_diffusion_model(model["diffusion_model"], model_options={})
        clip = comfy.sd.load_clip(ckpt_paths=list(encoders), embedding_directory=embeddings, clip_type=clip_type,
                                  model_options={})
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(model["vae"]))
        vae.throw_exception_if_invalid()
        return m, clip, vae


def load_clip_vision(path: str):
    """A CLIP_VISION as CLIPVisionLoader loads it (``comfy.clip_vision.load``)."""
    import comfy.clip_vision
    with torch.inference_mode():
        cv = comfy.clip_vision.load(path)
    if cv is None:
        raise ValueError(f"{path}: ComfyUI's CLIPVisionLoader does not recognise this vision model")
    return cv


def load_text_encoder(path: str, clip_type: str = "stable_diffusion"):
    """A CLIP from one text-encoder file, as CLIPLoader loads it."""
    ct = getattr(comfy.sd.CLIPType, str(clip_type).upper(), None)
    if ct is None:
        raise ValueError(f"unknown --clip-type {clip_type!r}; one of {', '.join(t.name.lower() for t in comfy.sd.CLIPType)}")
    with torch.inference_mode():
        return comfy.sd.load_clip(ckpt_paths=[path], embedding_directory=embedding_folders(), clip_type=ct,
                                  model_options={})
