"""The model families DTI Train supports: what ComfyUI cannot tell the trainer by itself.

ComfyUI already knows, per model, how conditioning is built (``model.model.extra_conds``, used
by its sampler) and what the model predicts (``model_sampling``); the training step reads both
from the model. A family here only says which text encoders carry learned vectors, the default
training resolution, and the conditioning inputs a user chooses (Flux's distilled guidance).
Adding a family is one entry in ``FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import memory
from .contracts import UnsupportedModelError
from .text import text_encoders


@dataclass(frozen=True)
class Family:
    name: str
    model_classes: tuple[str, ...]  # comfy.model_base class names
    encoders: tuple[str, ...]  # embedding keys that learn vectors (all must be in the CLIP)
    resolution: int  # default training resolution, px
    guidance: bool = False  # guidance-distilled: trains at the guidance the user renders with
    # Text put before every training prompt, as the family's own encode node adds it (Lumina 2).
    prompt_prefix: str = ""
    # The DiT reads the prompt length from the text encoder's attention mask (Lumina 2's num_tokens).
    text_mask: bool = False
    # ComfyUI always builds this family's tokenizer without an embeddings folder (Gemma-2): training
    # places the word through a copy that has one (DTI Enable Embeddings does the same for prompts).
    enable_embeddings: bool = False
    # comfy.supported_models class names (the model's config) where the model class alone is shared
    # by other families: 0.33's Z-Image is supported_models.ZImage(Lumina2) on model_base.Lumina2.
    configs: tuple[str, ...] = ()


# CLIPTextEncodeLumina2's default ("superior") system prompt and separator
# (comfy_extras/nodes_lumina2.py): Lumina 2 was trained on prompts that start with it.
LUMINA2_SYSTEM_PROMPT = ("You are an assistant designed to generate superior images with the superior degree of "
                         "image-text alignment based on textual prompts or user prompts.")
LUMINA2_PREFIX = f"{LUMINA2_SYSTEM_PROMPT} <Prompt Start> "


FAMILIES = (
    Family("SD1.x", ("BaseModel",), ("clip_l",), 512),
    Family("SD2.x", ("BaseModel",), ("clip_h",), 768),
    Family("SDXL", ("SDXL",), ("clip_l", "clip_g"), 768),  # the paper's SDXL setting
    Family("Flux.1", ("Flux",), ("clip_l", "t5xxl"), 512, guidance=True),
    Family("Chroma", ("Chroma",), ("t5xxl",), 512),
    Family("SD3 / SD3.5", ("SD3",), ("clip_l", "clip_g", "t5xxl"), 768),
    # SD3.5 single files "incl. clips" carry no T5; the word then lives in CLIP-L/G only.
    Family("SD3 / SD3.5 (no T5)", ("SD3",), ("clip_l", "clip_g"), 768),
    # Lumina 2 / Neta Lumina: Gemma-2-2B, 1024 px as the authors' SANA (Gemma-2) recipe.
    Family("Lumina 2", ("Lumina2",), ("gemma2_2b",), 1024, prompt_prefix=LUMINA2_PREFIX, text_mask=True,
           enable_embeddings=True, configs=("Lumina2",)),
    # Z-Image (0.33: supported_models.ZImage(Lumina2), the same NextDiT class, Qwen3-4B): its tokenizer
    # wraps every prompt in Qwen's chat template itself and reads the embeddings folder; 1024 px as
    # the family renders.
    Family("Z-Image", ("Lumina2",), ("qwen3_4b",), 1024, text_mask=True, configs=("ZImage",)),
    # FLUX.2 klein (0.33: supported_models.Flux2): Qwen3-4B (klein 4B) or Qwen3-8B (klein 9B); the
    # encoder stacks three of its hidden layers (9, 18, 27) into one 3-wide token, its tokenizer pads
    # every prompt to 512 tokens inside Qwen's chat template. No distilled guidance input (klein's
    # DiT has none); 1024 px as the authors' klein config.
    Family("FLUX.2 klein", ("Flux2",), ("qwen3_4b",), 1024, configs=("Flux2",)),
    Family("FLUX.2 klein", ("Flux2",), ("qwen3_8b",), 1024, configs=("Flux2",)),  # klein 9B
    # Wan 2.1 text-to-video (1.3B, 14B) and Wan 2.2's A14B experts (the same WAN21_T2V configuration):
    # UMT5-XXL, whose ComfyUI tokenizer is built without an embeddings folder (as Gemma's); trained
    # on still images as one-frame videos, 512 px, as the authors' Wan launcher.
    Family("Wan 2.1 / 2.2", ("WAN21",), ("umt5xxl",), 512, enable_embeddings=True, configs=("WAN21_T2V",)),
    # Qwen-Image (supported_models.QwenImage): Qwen2.5-VL-7B's language model, whose ComfyUI tokenizer
    # is built without an embeddings folder and whose template code reads tokens as ints (text.py,
    # INT_TOKENS_ONLY: DTI Enable Embeddings mends both on its copy); 3-D latents of the Wan 2.1 VAE;
    # 1328 px, the size ComfyUI's Qwen-Image template renders (the authors published no Qwen-Image recipe).
    Family("Qwen-Image", ("QwenImage",), ("qwen25_7b",), 1328, enable_embeddings=True, configs=("QwenImage",)),
)

# Text encoders of families that DTI Train does not train yet, where the model config is shared with
# one it does (FLUX.2 dev's Mistral-3 24B on the same Flux2 config as klein).
ENCODERS_NOT_YET = {"mistral3_24b": "FLUX.2 dev (its Mistral-3 24B text encoder)"}

# Model configs of current ComfyUI that DTI Train does not train yet, by the name users know them by.
NOT_YET = {"ZImagePixelSpace": "Z-Image pixel-space", "WAN22_T2V": "Wan 2.2 TI2V 5B",
           "WAN21_I2V": "Wan image-to-video", "HiDream": "HiDream"}


def supported_text() -> str:
    return ", ".join(dict.fromkeys(f.name.replace(" (no T5)", "") for f in FAMILIES))


def family_of(model, clip) -> Family:
    """The family of this MODEL + CLIP pair, or a clear refusal naming what is supported."""
    model_class = type(model.model).__name__
    config = type(getattr(model.model, "model_config", None)).__name__
    if config in NOT_YET:
        raise UnsupportedModelError(
            f"DTI Train does not train {NOT_YET[config]} models yet (this MODEL is {model_class} with the "
            f"{config} configuration); "
            f"it supports {supported_text()}")
    try:
        available = set(text_encoders(clip))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"DTI Train supports {supported_text()}; {e}") from None
    for key, what in ENCODERS_NOT_YET.items():
        if key in available:
            # The memory a run would need, before anything runs: the encoder's weights as loaded, run
            # forward and backward every step (activations on top), beside the diffusion model's.
            te, dm = memory.weights_gib(clip.patcher), memory.weights_gib(model)
            raise UnsupportedModelError(
                f"DTI Train does not train {what} yet (this MODEL is {model_class}). Training would run its "
                f"text encoders ({te:.1f} GiB of weights as loaded) forward and backward at every step beside "
                f"the diffusion model ({dm:.1f} GiB): more than {te + dm:.0f} GiB before activations. "
                f"It supports {supported_text()}")
    candidates = [f for f in FAMILIES if model_class in f.model_classes and (not f.configs or config in f.configs)]
    for fam in candidates:
        if set(fam.encoders) == available:
            return fam
    if candidates:
        wanted = " or ".join("+".join(f.encoders) for f in candidates)
        names = " / ".join(dict.fromkeys(f.name.replace(" (no T5)", "") for f in candidates))
        raise UnsupportedModelError(
            f"this CLIP does not fit the {names} model ({model_class}): it needs the text encoders {wanted}, the CLIP has "
            f"{', '.join(sorted(available)) or 'none'}. Load the text encoders that belong to this model.")
    raise UnsupportedModelError(
        f"DTI Train supports {supported_text()}; this MODEL is {model_class} ({config})")


def trained_encoders(family: Family, choice: str) -> tuple[str, ...]:
    """The encoders that learn vectors: ``"all"`` (the family's), or a comma-separated subset."""
    text = (choice or "all").strip().lower()
    if text in ("", "all"):
        return family.encoders
    keys = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in keys if k not in family.encoders]
    if unknown or not keys:
        raise ValueError(f"train_encoders {choice!r}: {family.name} has the text encoders "
                         f"{', '.join(family.encoders)}; write 'all' or a comma-separated list of them")
    return keys
