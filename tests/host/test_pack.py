"""The pack inside the real ComfyUI: it loads as a custom node, its nodes register with
tooltips, and a file written by the core is what CLIPTextEncode picks up as embedding:NAME."""

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from dti_core.embedding_file import dti_metadata, save_embedding
from dti_core.sphere import normalize

ROOT = Path(__file__).resolve().parent.parent.parent
NODES = {"DTITrain", "DTILoadEmbedding", "DTISlerpConcepts", "DTIInterpolationStrip", "DTIInspect", "DTIEnableEmbeddings"}


def test_pack_loads_through_comfyui_load_custom_node(comfy_nodes, caplog):
    caplog.set_level(logging.WARNING)
    ok = asyncio.run(comfy_nodes.load_custom_node(str(ROOT)))
    assert ok, [r.getMessage() for r in caplog.records]
    assert NODES <= set(comfy_nodes.NODE_CLASS_MAPPINGS)
    assert NODES <= set(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    assert str(ROOT / "js") in comfy_nodes.EXTENSION_WEB_DIRS.values()
    assert not [r for r in caplog.records if "pyproject" in r.getMessage() or "Skip" in r.getMessage()]


def test_every_node_input_has_a_tooltip_and_every_node_a_description(comfy_nodes):
    for node_id in NODES:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert len(cls.DESCRIPTION) > 40, node_id
        assert cls.CATEGORY == "DTI"
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (kind, *opts) in spec.get(section, {}).items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def vocab_m_star(encoder):
    with torch.inference_mode(False):
        w = encoder.transformer.get_input_embeddings().weight.detach().float().clone()
    return float(w.norm(dim=-1)[w.norm(dim=-1) > 0].mean())


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_core_file_is_used_by_clip_text_encode_without_warning(kind, request, embeddings_dir, comfy_nodes, caplog):
    model, clip, vae = request.getfixturevalue(f"{kind}_loaded")
    widths = {"clip_l": 768} if kind == "sd15" else {"clip_l": 768, "clip_g": 1280}
    g = torch.Generator().manual_seed(3)
    vectors = {k: vocab_m_star(getattr(clip.cond_stage_model, k)) * normalize(torch.randn(2, w, generator=g))
               for k, w in widths.items()}
    name = f"core-{kind}"
    save_embedding(str(embeddings_dir), name, vectors, dti_metadata(model_family=kind))
    caplog.set_level(logging.WARNING)
    encode = comfy_nodes.CLIPTextEncode()
    with torch.inference_mode():
        (with_emb,) = encode.encode(clip, f"a photo of embedding:{name}")
        (without,) = encode.encode(clip, "a photo of")
        tokens = clip.tokenize(f"a photo of embedding:{name}")
    # two tensor token slots per encoder, exactly our rows
    for tkey, chunks in tokens.items():
        slots = [t for t, *_ in chunks[0] if torch.is_tensor(t)]
        assert len(slots) == 2
        assert torch.equal(slots[0].float(), vectors["clip_" + tkey][0])
    assert not torch.allclose(with_emb[0][0], without[0][0])
    if kind == "sdxl":
        assert not torch.allclose(with_emb[0][1]["pooled_output"], without[0][1]["pooled_output"])
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "does not exist" in m or "shape mismatch" in m or "error loading" in m], messages
