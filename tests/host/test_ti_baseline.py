"""DTI Train's plain-TI baseline (``method = ti``, the authors' TI launchers: free vectors from the
initializer's rows, AdamW, no prior) beside DTI, on the thin SD1.5 through the real ComfyUI: what the
file says, what the other nodes make of it, and the lengths that set the two apart."""

import logging

import pytest
import torch

from dti_core.embedding_file import load_embedding
from tests_host_helpers import run_train


def test_ti_and_dti_runs_differ_in_length_and_the_file_says_which(dti_pack, fresh_sd15, embeddings_dir, comfy_nodes,
                                                                   caplog):
    ct = dti_pack.comfy_host
    _, clip, _ = fresh_sd15
    common = dict(initializer="dog", steps=4, batch_size=2, seed=3)
    dti = run_train(dti_pack, fresh_sd15, name="tb-dti", learning_rate=0.01, **common)
    ti = run_train(dti_pack, fresh_sd15, name="tb-ti", learning_rate=0.005, method="ti", **common)
    fd, ft = (load_embedding(str(embeddings_dir / f"{n}.safetensors")) for n in ("tb-dti", "tb-ti"))
    assert (fd.metadata["dti.method"], ft.metadata["dti.method"]) == ("dti", "ti")
    assert fd.is_dti and not ft.is_dti and ft.is_plain_ti and ft.source_format == "ti"
    assert ft.metadata["dti.weight_decay"] == "0.01" and "dti.kappa" not in ft.metadata
    assert float(ft.metadata["dti.lr"]) == pytest.approx(0.01)  # 0.005 x batch 2, as the authors' scale_lr
    m = fd.m_star("clip_l")
    assert ft.m_star("clip_l") == pytest.approx(m)  # the vocabulary's m*, recorded for comparison
    with torch.inference_mode():
        rows = ct.text.initializer_rows(clip, "dog", 0, ("clip_l",))["clip_l"]
    assert torch.allclose(fd.vectors["clip_l"].float().norm(dim=-1), torch.full((rows.shape[0],), m), atol=1e-3)
    # 4 AdamW steps of 0.01 move each of the 768 coordinates by up to 0.04: the lengths leave where they began
    moved = (ft.vectors["clip_l"].float().norm(dim=-1) - rows.norm(dim=-1)).abs()
    assert (moved > 0.05 * m).all(), (moved, m)
    assert "plain TI: free lengths" in ti["ui"]["text"][0] and "|v| = m*" in dti["ui"]["text"][0]
    # a different run: not the DTI run's reused file
    assert ft.metadata["dti.fingerprint"] != fd.metadata["dti.fingerprint"]
    # the stock encode reads a TI file like any embedding
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        (cond,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of embedding:tb-ti")
    assert cond[0][0].shape[-1] == 768
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_slerp_and_inspect_say_when_a_file_is_plain_ti(dti_pack, fresh_sd15, embeddings_dir):
    run_train(dti_pack, fresh_sd15, name="tb2-dti", initializer="cat", steps=2, batch_size=2)
    run_train(dti_pack, fresh_sd15, name="tb2-ti", initializer="dog", steps=2, batch_size=2, learning_rate=0.005,
              method="ti")
    nodes = dti_pack.nodes
    with torch.inference_mode():
        (_, a), (_, b) = (nodes.embedding_nodes.DTILoadEmbedding().load(f"{n}.safetensors", None)
                          for n in ("tb2-dti", "tb2-ti"))
        out = nodes.embedding_nodes.DTISlerpConcepts().slerp(a, b, 0.5, "tb2-blend", False)
        report = nodes.inspect_node.DTIInspect().inspect(b, fresh_sd15[1], 3)["result"][0]
    text = out["ui"]["text"][0]
    assert "B (tb2-ti.safetensors) is a plain-TI embedding (method ti)" in text and "A (" not in text
    assert load_embedding(str(embeddings_dir / "tb2-blend.safetensors")).metadata["dti.method"] == "slerp"
    assert report.splitlines()[0].endswith("[ti]") and "plain TI (method ti)" in report


@pytest.mark.parametrize("method", ["TI", "adam", ""])
def test_an_unknown_method_is_refused(dti_pack, fresh_sd15, method):
    with pytest.raises(ValueError, match="method must be one of dti, ti"):
        run_train(dti_pack, fresh_sd15, name="tb-bad", method=method)
