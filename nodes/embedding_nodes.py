"""Working with directional embeddings: load, slerp two concepts, render an interpolation strip."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..dti_core import __version__
from ..dti_core.embedding_file import Embedding, check_fits, save_embedding
from ..dti_core.interpolate import T_MAX, T_MIN, check_t, slerp_embeddings
from ..dti_core.names import check_name
from ..comfy_host import paths
from ..comfy_host import text as host_text
from .common import (CATEGORY, EMBEDDING_TYPE, WritesEmbeddingFile, embeddings_root, existing_result, file_state,
                     load_listed, log, prompt_name, target_path)


class DTILoadEmbedding:
    DESCRIPTION = ("Load an embedding from models/embeddings (ours, A1111 .pt/.safetensors, kohya, diffusers) "
                   "for the other DTI nodes. Connect a CLIP to check it fits that model before sampling.")
    SEARCH_ALIASES = ["load embedding", "textual inversion"]
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("STRING", EMBEDDING_TYPE)
    RETURN_NAMES = ("prompt_text", "embedding")
    OUTPUT_TOOLTIPS = ("'embedding:NAME' for a CLIPTextEncode prompt.", "The loaded embedding.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding": (paths.embedding_files(),
                              {"tooltip": "A file from models/embeddings (subfolders included). Pickled .pt/.bin files are read with torch.load(weights_only=True): code inside them is refused, never run."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional: check that the file has vectors of the right width for every text encoder of this CLIP, and fail clearly if not (ComfyUI alone only logs a warning and drops the word)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, embedding, clip=None):
        path = paths.embedding_path(embedding)
        return file_state(path) if path else float("nan")

    def load(self, embedding, clip=None):
        emb = load_listed(embedding)
        if clip is not None:
            check_fits(emb, host_text.clip_widths(clip))
        return (f"embedding:{prompt_name(emb.path)}", emb)


class DTISlerpConcepts(WritesEmbeddingFile):
    DESCRIPTION = ("Blend two learned concepts into a new word: slerp between their directions (and interpolate "
                   "their lengths), save it as a new embedding file and give the prompt text to use it.")
    SEARCH_ALIASES = ["slerp", "interpolate", "blend concepts", "mix embeddings"]
    CATEGORY = CATEGORY
    FUNCTION = "slerp"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", EMBEDDING_TYPE)
    RETURN_NAMES = ("prompt_text", "embedding")
    OUTPUT_TOOLTIPS = ("'embedding:NAME' of the blend, for a CLIPTextEncode prompt.", "The blended embedding.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding_a": (EMBEDDING_TYPE, {"tooltip": "Concept A (t = 0)."}),
                "embedding_b": (EMBEDDING_TYPE, {"tooltip": "Concept B (t = 1). Must cover the same text encoders as A and have the same number of vectors (or one of them a single vector)."}),
                "t": ("FLOAT", {"default": 0.5, "min": T_MIN, "max": T_MAX, "step": 0.05, "tooltip": "0 = A, 1 = B, 0.5 = halfway along the sphere. Values outside [0, 1] extrapolate (from -1 to 2)."}),
                "name": ("STRING", {"default": "blend", "tooltip": "File name for the blend in models/embeddings; use it as embedding:NAME."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name. Off: an existing file is never touched."}),
            }
        }

    def slerp(self, embedding_a, embedding_b, t, name, overwrite):
        name = check_name(name)
        t = check_t(t)
        vectors, warnings = slerp_embeddings(embedding_a.vectors, embedding_b.vectors, t)
        warnings = [f"{which} ({_label(emb)}) is a plain-TI embedding (method ti): its lengths are free, so the "
                    f"blend moves in length as well as in direction; DTI words all sit at m*, where a slerp "
                    f"moves in meaning only" for which, emb in (("A", embedding_a), ("B", embedding_b))
                    if emb.is_plain_ti] + warnings
        for w in warnings:
            log.warning("DTI Slerp Concepts: %s", w)
        fingerprint = _vectors_fingerprint(embedding_a, embedding_b, t)
        meta = {"dti.method": "dti" if embedding_a.is_dti and embedding_b.is_dti else "slerp",
                "dti.slerp_a": _label(embedding_a), "dti.slerp_b": _label(embedding_b), "dti.slerp_t": repr(t),
                "dti.version": __version__, "dti.fingerprint": fingerprint}
        if meta["dti.method"] == "dti":
            for key in vectors:
                ma, mb = embedding_a.m_star(key), embedding_b.m_star(key)
                if ma is not None and mb is not None:
                    meta[f"dti.m_star.{key}"] = repr((1 - t) * ma + t * mb)
        path = target_path(name)
        if overwrite or existing_result(path, name, fingerprint) is None:
            save_embedding(embeddings_root(), name, vectors, meta, overwrite=bool(overwrite))
        emb = Embedding(vectors=vectors, metadata=meta, source_format="dti", path=path)
        text = f"Saved embedding:{name} (t = {t:g})" + "".join(f"\nWarning: {w}" for w in warnings)
        return {"ui": {"text": [text]}, "result": (f"embedding:{name}", emb)}


class DTIInterpolationStrip:
    DESCRIPTION = ("Encode one prompt K times with the concept slerped from A to B (t = 0 ... 1), as one "
                   "CONDITIONING batch: feed it to a KSampler with a latent batch of K to render the whole strip "
                   "in one queue. Each entry equals a CLIPTextEncode of that blend.")
    SEARCH_ALIASES = ["interpolation", "slerp strip"]
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "t_values")
    OUTPUT_TOOLTIPS = ("K conditionings in one batch, t = 0 first.", "The t of each entry, comma separated.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder the embeddings were trained for."}),
                "text": ("STRING", {"default": "a photo of {} on a beach", "multiline": True, "tooltip": "The prompt; {} marks where the blended concept goes (exactly once)."}),
                "embedding_a": (EMBEDDING_TYPE, {"tooltip": "Concept at t = 0."}),
                "embedding_b": (EMBEDDING_TYPE, {"tooltip": "Concept at t = 1."}),
                "count": ("INT", {"default": 5, "min": 2, "max": 64, "tooltip": "K: how many steps from A to B (both ends included). Use the same number as the latent batch size."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "The latent the strip is sampled with (link the KSampler's latent here too): its batch size must equal count, which is checked. Without it, a KSampler given a different batch would silently repeat or drop blends."}),
            },
        }

    def encode(self, clip, text, embedding_a, embedding_b, count, latent=None):
        if text.count("{}") != 1:
            raise ValueError("the prompt must contain {} exactly once, where the blended concept goes")
        if not 2 <= int(count) <= 64:
            raise ValueError(f"count must be between 2 and 64; got {count}")
        if latent is not None:
            batch = int(latent["samples"].shape[0])
            if batch != int(count):
                raise ValueError(
                    f"count is {count} but the latent batch is {batch}: the sampler would silently "
                    f"{'repeat' if batch > count else 'drop'} blends. Set count and the latent's batch_size "
                    f"(e.g. Empty Latent Image) to the same number.")
        widths = host_text.clip_widths(clip)
        for emb in (embedding_a, embedding_b):
            check_fits(emb, widths)
        ts = [k / (count - 1) for k in range(count)]
        blends = [slerp_embeddings(embedding_a.vectors, embedding_b.vectors, t)[0] for t in ts]
        n = next(iter(blends[0].values())).shape[0]
        (prompt,) = host_text.tokenize_templates(clip, [text], n)
        encoders = host_text.text_encoders(clip)
        conds, pooled = [], []
        for vectors in blends:
            by_token_key = {tkey: vectors[key] for key, (tkey, _, _) in encoders.items()}
            # The same call CLIPTextEncode makes, so each entry equals a separate encode of that blend.
            ((cond, extra),) = host_text.encode_conditioning(clip, prompt.with_vectors(by_token_key))
            conds.append(cond)
            pooled.append(extra.get("pooled_output"))
        out = {"pooled_output": torch.cat(pooled)} if pooled[0] is not None else {}
        return ([[torch.cat(conds), out]], ", ".join(f"{t:.3g}" for t in ts))


def _label(emb: Embedding) -> str:
    return os.path.basename(emb.path) if emb.path else emb.metadata.get("dti.name", "in-memory")


def _vectors_fingerprint(a: Embedding, b: Embedding, t: float) -> str:
    h = hashlib.sha256(json.dumps([sorted(a.vectors), sorted(b.vectors), t]).encode())
    for emb in (a, b):
        for key in sorted(emb.vectors):
            h.update(emb.vectors[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class DTIEnableEmbeddings:
    DESCRIPTION = ("Make embedding:NAME work for text encoders whose ComfyUI tokenizer ignores it (Gemma-2 of "
                   "Lumina 2 / Neta Lumina, UMT5 of Wan, Qwen2.5 of Qwen-Image, Pile-T5 of AuraFlow): returns a CLIP whose tokenizers "
                   "read models/embeddings. The input CLIP is left as it was.")
    SEARCH_ALIASES = ["embedding folder", "qwen image embedding", "lumina embedding"]
    CATEGORY = CATEGORY
    FUNCTION = "enable"
    OUTPUT_NODE = True  # only so its note shows on the node; it writes nothing
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("The same text encoders; embedding:NAME in CLIPTextEncode now reads models/embeddings.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP", {"tooltip": "Any CLIP. For ones that already read embeddings this is a no-op."})}}

    def enable(self, clip):
        out, enabled = host_text.with_embeddings_folder(clip, paths.embedding_folders())
        if enabled:
            note = ("embedding:NAME enabled for " + ", ".join(enabled)
                    + " (this CLIP's ComfyUI tokenizer ignored it).")
        else:
            note = "Nothing to do: every text encoder of this CLIP already reads embedding:NAME."
        log.info("DTI Enable Embeddings: %s", note)
        return {"ui": {"text": [note]}, "result": (out,)}
