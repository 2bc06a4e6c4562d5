"""Each shipped workflow runs to completion through ComfyUI's HTTP API (POST /prompt, poll
/history), on the small generated checkpoints, with steps and sizes cut down for the CPU."""

import shutil

import pytest
import torch

import dti_workflow_harness as h
from dti_core.embedding_file import load_embedding

RUN_TIMEOUT = 480.0


def prompt_for(name, object_info, latent=64, sampler_steps=1, **train):
    prompt = h.ui_to_api(h.load_workflow(name), object_info)
    h.set_inputs(prompt, "EmptyLatentImage", width=latent, height=latent)
    h.set_inputs(prompt, "KSampler", steps=sampler_steps)
    if train:
        h.set_inputs(prompt, "DTITrain", **train)
    assert h.validate_prompt(prompt, object_info) == []
    return prompt


def node_output(entry, prompt, class_type):
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return entry["outputs"].get(nid, {})


def check_images(server, entry, count, prefix):
    images = h.saved_images(entry)
    assert len(images) == count, entry["outputs"]
    for im in images:
        path = h.image_path(server, im)
        assert path.is_file() and path.stat().st_size > 0
        assert im["subfolder"] == prefix.split("/")[0] and im["filename"].startswith(prefix.split("/")[1])
    return [h.image_path(server, im) for im in images]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_train_workflow_trains_and_renders(kind, server, object_info):
    name = "dti_train_sdxl.json" if kind == "sdxl" else "dti_train_sd15.json"
    concept = "my-concept-xl" if kind == "sdxl" else "my-concept"
    # Batch size as shipped (4): the thin SDXL at batch 4 once drove a --cpu server out of memory.
    prompt = prompt_for(name, object_info, steps=2, resolution=64)
    assert h.find_nodes(prompt, "DTITrain")[0]["inputs"]["batch_size"] == 4
    entry = server.run(prompt, timeout=RUN_TIMEOUT)

    path = server.embeddings / f"{concept}.safetensors"
    assert path.is_file(), f"DTI Train did not write {path}"
    emb = load_embedding(str(path))
    assert emb.is_dti and emb.metadata["dti.steps"] == "2" and emb.metadata["dti.initializer"] == "dog"
    assert set(emb.vectors) == ({"clip_l", "clip_g"} if kind == "sdxl" else {"clip_l"})
    for key, v in emb.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), atol=1e-4)
    text = node_output(entry, prompt, "DTITrain").get("text", [""])[0]
    assert text.startswith(f"Saved embedding:{concept}"), text
    check_images(server, entry, 1, f"DTI/{concept}")


def test_flux_dev_workflow_trains_and_renders(server, object_info):
    """Flux.1 dev from UNETLoader + DualCLIPLoader (full-depth fp8 T5) + VAELoader on the real server:
    CLIP-L and T5-XXL vectors at their m*, and the render's stock CLIPTextEncode reads the file silently."""
    prompt = h.ui_to_api(h.load_workflow("dti_train_flux_dev.json"), object_info)
    h.set_inputs(prompt, "EmptySD3LatentImage", width=64, height=64)
    h.set_inputs(prompt, "KSampler", steps=1)
    # one training prompt and batch 1: each full-depth T5 encode costs most of a minute on this CPU
    h.set_inputs(prompt, "DTITrain", steps=2, resolution=64, batch_size=1, templates="custom",
                 custom_templates="a photo of a {}")
    assert h.validate_prompt(prompt, object_info) == []
    started = len(server.log_tail(10**9))
    entry = server.run(prompt, timeout=RUN_TIMEOUT * 2)
    emb = load_embedding(str(server.embeddings / "my-concept-flux.safetensors"))
    assert set(emb.vectors) == {"clip_l", "t5xxl"} and emb.metadata["dti.model_family"] == "Flux.1"
    assert emb.metadata["dti.guidance"] == "3.5"
    for key, v in emb.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), atol=1e-5)
    check_images(server, entry, 1, "DTI/my-concept-flux")
    log = server.log_tail(10**9)[started:]
    assert "Traceback" not in log and "shape mismatch" not in log and "embedding" not in log.lower(), log[-4000:]


def test_slerp_workflow(server, object_info):
    prompt = prompt_for("dti_slerp_concepts.json", object_info)
    entry = server.run(prompt, timeout=RUN_TIMEOUT)
    blend = load_embedding(str(server.embeddings / "blend.safetensors"))
    a = load_embedding(str(server.embeddings / h.CONCEPT_A))
    assert set(blend.vectors) == set(a.vectors) == {"clip_l", "clip_g"}
    for key, v in blend.vectors.items():
        # the blend stays on the sphere of radius m* (both concepts have the same m*)
        assert torch.allclose(v.norm(dim=-1), a.vectors[key].norm(dim=-1), atol=1e-4)
    report = node_output(entry, prompt, "DTIInspect").get("text", [""])[0]
    assert "clip_l" in report and "vector 0" in report
    assert len([im for im in sum((o.get("images", []) for o in entry["outputs"].values()), []) if im["type"] == "temp"]) == 1
    check_images(server, entry, 1, "DTI/blend")


def test_interpolation_strip_workflow(server, object_info):
    prompt = prompt_for("dti_interpolation_strip.json", object_info, latent=128, sampler_steps=2)
    entry = server.run(prompt, timeout=RUN_TIMEOUT)
    t_values = node_output(entry, prompt, "PreviewAny").get("text", [""])[0]
    assert t_values == "0, 0.25, 0.5, 0.75, 1"
    paths = check_images(server, entry, 5, "DTI/strip")
    tiled = h.tile_images(sorted(paths), h.REPO_ROOT / "test-artifacts" / "slerp_strip.png")
    if h.update_docs_images():
        dst = h.REPO_ROOT / "docs" / "images" / "slerp_strip.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiled, dst)
