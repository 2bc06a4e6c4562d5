"""Each shipped workflow runs to completion through ComfyUI's HTTP API (POST /prompt, poll
/history), on the small generated checkpoints, with steps and sizes cut down for the CPU."""

import shutil
import time
from pathlib import Path

import pytest
import torch

import dti_workflow_harness as h
import dti_host_checkpoints as ck
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
    h.check_saved_images(server, entry, 1, f"DTI/{concept}")


# ComfyUI's own warnings when a word is missing, unreadable or of the wrong width (comfy/sd1_clip.py)
LOG_PROBLEMS = ("Traceback", "does not exist, ignoring", "error loading embedding", "shape mismatch")


def dit_workflow_prompt(name, object_info):
    """A shipped DiT train workflow cut to CPU size: 1 step of one prompt ("a photo of a {}") at 64 px, batch 1,
    a 64 px latent and 1 sampler step (each full-depth T5 encode and its backward cost most of a minute or more
    on this CPU: Flux pads T5 prompts to 256 tokens; a step moves the word as well as two do)."""
    prompt = h.ui_to_api(h.load_workflow(name), object_info)
    h.set_inputs(prompt, "EmptySD3LatentImage", width=64, height=64)
    h.set_inputs(prompt, "KSampler", steps=1)
    h.set_inputs(prompt, "DTITrain", steps=1, resolution=64, batch_size=1, templates="custom",
                 custom_templates="a photo of a {}")
    assert h.validate_prompt(prompt, object_info) == []
    return prompt


def run_dit_workflow(server, prompt, concept, keys, family):
    """Queue it; the file has ``keys`` at their m* (fp32), the ``family`` metadata, one saved render, and the
    server log of this run (training and the render's stock CLIPTextEncode) has no error or embedding warning."""
    started = len(server.log_tail(10**9))
    t0 = time.monotonic()
    entry = server.run(prompt, timeout=RUN_TIMEOUT * 2)
    print(f"\n{concept}: workflow ran in {time.monotonic() - t0:.0f} s")
    emb = load_embedding(str(server.embeddings / f"{concept}.safetensors"))
    assert set(emb.vectors) == set(keys) and emb.metadata["dti.model_family"] == family
    assert emb.metadata["dti.steps"] == "1" and emb.metadata["dti.initializer"] == "dog"
    for key, v in emb.vectors.items():
        assert v.dtype == torch.float32
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), atol=1e-5)
    text = node_output(entry, prompt, "DTITrain").get("text", [""])[0]
    assert text.startswith(f"Saved embedding:{concept}"), text
    h.check_saved_images(server, entry, 1, f"DTI/{concept}")
    log = server.log_tail(10**9)[started:]
    for bad in LOG_PROBLEMS:
        assert bad not in log, log[-4000:]
    assert "embedding" not in log.lower(), log[-4000:]
    return emb


def test_flux_dev_workflow_trains_and_renders(server, object_info):
    """Flux.1 dev from UNETLoader + DualCLIPLoader (full-depth fp8 T5) + VAELoader on the real server:
    CLIP-L and T5-XXL vectors at their m*, and the render's stock CLIPTextEncode reads the file silently."""
    prompt = dit_workflow_prompt("dti_train_flux_dev.json", object_info)
    emb = run_dit_workflow(server, prompt, "my-concept-flux", {"clip_l", "t5xxl"}, "Flux.1")
    assert emb.metadata["dti.guidance"] == "3.5"


def test_sd35_workflow_trains_and_renders(server, object_info):
    """SD3.5 as ComfyUI's examples load it: CheckpointLoaderSimple (MMDiT + VAE, no text encoders) +
    TripleCLIPLoader (CLIP-L, CLIP-G, full-depth fp8 T5-XXL): all three learn, each at its own m*."""
    prompt = dit_workflow_prompt("dti_train_sd35.json", object_info)
    run_dit_workflow(server, prompt, "my-concept-sd35", {"clip_l", "clip_g", "t5xxl"}, "SD3 / SD3.5")


def train_only_prompt(object_info, loaders: dict, wire: dict, **train) -> dict:
    """Loader nodes -> DTI Train (defaults from /object_info) -> PreviewAny, as an API prompt."""
    defaults = {k: v[1].get("default") for k, v in object_info["DTITrain"]["input"]["required"].items()
                if isinstance(v, list) and len(v) > 1 and isinstance(v[1], dict)}
    prompt = {k: {"class_type": c, "inputs": i} for k, (c, i) in loaders.items()}
    prompt["img"] = {"class_type": "LoadImage", "inputs": {"image": h.EXAMPLE_IMAGES[0]}}
    prompt["train"] = {"class_type": "DTITrain", "inputs": {**defaults, **wire, "images": ["img", 0],
                                                            "resume_from": "(none)", **train}}
    prompt["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 0]}}
    assert h.validate_prompt(prompt, object_info) == []
    return prompt


def test_sd35_single_file_trains_on_the_server(server, object_info):
    """The single file with CLIP-L/G built in and no T5 (CheckpointLoaderSimple alone): the word lives in
    CLIP-L/G only."""
    prompt = train_only_prompt(object_info, {"ckpt": ("CheckpointLoaderSimple", {"ckpt_name": h.SD35_CKPT})},
                               {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2]},
                               name="sd35-concept", initializer="dog", steps=2, batch_size=2, resolution=64)
    server.run(prompt, timeout=RUN_TIMEOUT)
    emb = load_embedding(str(server.embeddings / "sd35-concept.safetensors"))
    assert set(emb.vectors) == {"clip_l", "clip_g"} and emb.metadata["dti.model_family"] == "SD3 / SD3.5 (no T5)"
    for key, v in emb.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), emb.m_star(key)), atol=1e-5)


def test_chroma_workflow_trains_and_renders_on_a_server_with_fp8_text_encoder(comfy_path, test_checkpoints,
                                                                              flux_files, tmp_path_factory):
    """The shipped Chroma workflow: UNETLoader + CLIPLoader(type chroma, full-depth fp8 T5) + VAELoader, real
    cfg with a negative prompt, on a server started with --fp8_e4m3fn-text-enc (without it ComfyUI builds
    Chroma's T5 in fp16: 9 GiB on the CPU)."""
    folder = Path(test_checkpoints["sd15"]).parent
    dit = ck.ensure_family_files("chroma", folder)["diffusion_model"]
    srv = h.ComfyServer(comfy_path, tmp_path_factory.mktemp("comfyui_chroma"), extra_args=["--fp8_e4m3fn-text-enc"])
    srv.prepare()
    srv.link_model(dit, "diffusion_models", h.CHROMA_DIT)
    srv.link_model(flux_files["t5xxl"], "text_encoders", h.FLUX_T5)
    srv.link_model(flux_files["vae"], "vae", h.FLUX_VAE)
    h.write_example_images(srv.input)
    srv.start(timeout=240)
    try:
        prompt = dit_workflow_prompt("dti_train_chroma.json", srv.object_info())
        run_dit_workflow(srv, prompt, "my-concept-chroma", {"t5xxl"}, "Chroma")
    finally:
        srv.stop()


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
    h.check_saved_images(server, entry, 1, "DTI/blend")


def test_interpolation_strip_workflow(server, object_info):
    prompt = prompt_for("dti_interpolation_strip.json", object_info, latent=128, sampler_steps=2)
    entry = server.run(prompt, timeout=RUN_TIMEOUT)
    t_values = node_output(entry, prompt, "PreviewAny").get("text", [""])[0]
    assert t_values == "0, 0.25, 0.5, 0.75, 1"
    paths = h.check_saved_images(server, entry, 5, "DTI/strip")
    tiled = h.tile_images(sorted(paths), h.REPO_ROOT / "test-artifacts" / "slerp_strip.png")
    if h.update_docs_images():
        dst = h.REPO_ROOT / "docs" / "images" / "slerp_strip.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiled, dst)


# The DTI-vs-TI workflow runs once, queued from the page (test_frontend.py::
# test_dti_vs_ti_queued_from_the_page_shows_both_words_the_grid_and_the_four_scores), which also checks
# the files, the scores and the saved grid this module checked through POST /prompt (one run less).
