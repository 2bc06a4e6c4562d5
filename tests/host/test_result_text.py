"""DTI Train's result text says how many vectors each encoder learned and why (a multi-token
initializer trains one vector per token), on the real ComfyUI tokenizers."""

import pytest
import torch

from tests_host_helpers import run_train


def counts_for(pack, clip, initializer, num_vectors=0):
    ct = pack.comfy_host
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, initializer, num_vectors, "mean")
    return {k: v.shape[0] for k, v in init.items()}, m_star


def test_summary_names_counts_per_encoder_and_why(dti_pack, sdxl_loaded):
    _, clip, _ = sdxl_loaded
    common = dti_pack.nodes.common
    counts, m_star = counts_for(dti_pack, clip, "teddy bear")
    assert counts == {"clip_l": 2, "clip_g": 2}
    text = common.train_summary("toy", counts, m_star, "teddy bear", final_loss=0.125)
    lines = text.splitlines()
    assert lines[0] == "Saved embedding:toy (final loss 0.12500)"
    assert lines[1] == f"clip_l: 2 vectors ('teddy bear' is 2 tokens for this encoder), learned, |v| = m* {m_star['clip_l']:.4f}"
    assert lines[2].startswith("clip_g: 2 vectors ('teddy bear' is 2 tokens")
    assert "set num_vectors" in lines[3]
    # one token: no explanation line; an explicit count says so; a frozen encoder says so
    counts1, _ = counts_for(dti_pack, clip, "dog")
    one = common.train_summary("d", counts1, m_star, "dog", learned=["clip_g"])
    assert "clip_l: 1 vector ('dog' is 1 token for this encoder), kept at the initializer" in one
    assert "clip_g: 1 vector ('dog' is 1 token for this encoder), learned" in one and "set num_vectors" not in one
    counts3, _ = counts_for(dti_pack, clip, "dog", num_vectors=3)
    assert "clip_l: 3 vectors (num_vectors = 3)" in common.train_summary("d", counts3, m_star, "dog", num_vectors=3)


def test_train_node_reports_vectors_per_encoder_and_why(dti_pack, sd15_loaded, embeddings_dir):
    out = run_train(dti_pack, sd15_loaded, name="teddy-summary", steps=1, batch_size=1, resolution=64,
                    initializer="teddy bear", overwrite=True)
    (text,) = out["ui"]["text"]
    assert text.startswith("Saved embedding:teddy-summary")
    assert "clip_l: 2 vectors ('teddy bear' is 2 tokens for this encoder)" in text, text
