"""The shipped UI workflows are well-formed and valid against the running server's /object_info."""

import json

import pytest

import dti_workflow_harness as h

WORKFLOWS = h.WORKFLOWS
CORE_MODULES = ("nodes", "comfy_extras.")
PACK_MODULE = "custom_nodes.ComfyUI-DTI"
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def test_the_workflows_are_shipped():
    present = {p.name for p in h.WORKFLOWS_DIR.glob("*.json")}
    assert set(WORKFLOWS) <= present


def _nulls(obj, path="$"):
    if obj is None:
        yield path
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nulls(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nulls(v, f"{path}[{i}]")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_well_formed(name, object_info):
    h.skip_if_host_lacks(name, object_info)
    wf = h.load_workflow(name)
    assert wf.get("version") == 0.4
    # the frontend's zod schema rejects null in several places; the builder drops all of them
    assert list(_nulls(wf)) == []
    assert h.validate_ui_workflow(wf, object_info) == []
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        module = object_info[node["type"]].get("python_module", "")
        assert module == "nodes" or module.startswith(CORE_MODULES) or module == PACK_MODULE, \
            f"{name}: node {node['id']} {node['type']} comes from {module}, not core ComfyUI or this pack"
    # labelled for a newcomer: a read-me note and groups
    assert any(n["type"] == "Note" and "Read me" == n.get("title") for n in wf["nodes"])
    assert len(wf.get("groups", [])) >= 2


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_prompt_is_valid_against_object_info(name, object_info):
    h.skip_if_host_lacks(name, object_info)
    prompt = h.ui_to_api(h.load_workflow(name), object_info)
    assert h.validate_prompt(prompt, object_info) == []
    assert any(object_info[n["class_type"]].get("output_node") for n in prompt.values())


ONE_CLIP = {"klein": (h.FLUX2_KLEIN_DIT, h.FLUX2_QWEN3, "flux2", h.FLUX2_VAE),
            "wan": (h.WAN_DIT, h.WAN_UMT5, "wan", h.WAN_VAE),
            "qwen_image": (h.QWEN_IMAGE_DIT, h.QWEN_IMAGE_TE, "qwen_image", h.QWEN_IMAGE_VAE),
            "lumina": (h.LUMINA2_DIT, h.LUMINA2_GEMMA, "lumina2", h.FLUX_VAE),
            "chroma": (h.CHROMA_DIT, h.FLUX_T5, "chroma", h.FLUX_VAE),
            "z_image": (h.ZIMAGE_DIT, h.ZIMAGE_QWEN3, "lumina2", h.FLUX_VAE)}


def test_workflows_use_the_public_file_names(object_info):
    uses = {}
    loadable = [n for n in WORKFLOWS if not (n in h.NEEDS_NEWER_HOST and h.NEEDS_NEWER_HOST[n][0] not in object_info)]
    for name in loadable:
        prompt = h.ui_to_api(h.load_workflow(name), object_info)
        uses[name] = prompt
        ckpts = {n["inputs"]["ckpt_name"] for n in h.find_nodes(prompt, "CheckpointLoaderSimple")}
        # One CLIPLoader: (diffusion model, text encoder, CLIP type, VAE) by workflow.
        kind = next((k for k in ONE_CLIP if k in name), None)
        if kind is not None:
            dit, te, clip_type, vae = ONE_CLIP[kind]
            assert ckpts == set()
            assert [n["inputs"]["unet_name"] for n in h.find_nodes(prompt, "UNETLoader")] == [dit]
            (clip,) = h.find_nodes(prompt, "CLIPLoader")
            assert (clip["inputs"]["clip_name"], clip["inputs"]["type"]) == (te, clip_type)
            assert [n["inputs"]["vae_name"] for n in h.find_nodes(prompt, "VAELoader")] == [vae]
            (train,) = h.find_nodes(prompt, "DTITrain")
            if kind == "klein":
                assert len(h.find_nodes(prompt, "EmptyFlux2LatentImage")) == 1
                assert (train["inputs"]["steps"], train["inputs"]["kappa"]) == (1000, 0.00005)  # the authors' klein config
            if kind == "wan":
                (latent,) = h.find_nodes(prompt, "EmptyHunyuanLatentVideo")
                assert latent["inputs"]["length"] > 1  # the word drives a video
                (enable,) = h.find_nodes(prompt, "DTIEnableEmbeddings")  # UMT5's tokenizer has no folder
                assert (train["inputs"]["steps"], train["inputs"]["kappa"]) == (500, 0.00005)  # the authors' Wan launcher
            if kind == "qwen_image":
                (enable,) = h.find_nodes(prompt, "DTIEnableEmbeddings")  # its tokenizer has no folder
                (shift,) = h.find_nodes(prompt, "ModelSamplingAuraFlow")
                (sampler,) = h.find_nodes(prompt, "KSampler")
                (shift_id,) = [k for k, v in prompt.items() if v["class_type"] == "ModelSamplingAuraFlow"]
                (unet_id,) = [k for k, v in prompt.items() if v["class_type"] == "UNETLoader"]
                # the template's shift for the render; training on the model as loaded
                assert (sampler["inputs"]["model"], train["inputs"]["model"]) == ([shift_id, 0], [unet_id, 0])
                assert shift["inputs"]["shift"] == 3.1
            continue
        if "flux" in name:
            assert ckpts == set()
            assert [n["inputs"]["unet_name"] for n in h.find_nodes(prompt, "UNETLoader")] == [h.FLUX_DIT]
            (clip,) = h.find_nodes(prompt, "DualCLIPLoader")
            assert (clip["inputs"]["clip_name1"], clip["inputs"]["clip_name2"], clip["inputs"]["type"]) == \
                (h.FLUX_CLIP_L, h.FLUX_T5, "flux")
            assert [n["inputs"]["vae_name"] for n in h.find_nodes(prompt, "VAELoader")] == [h.FLUX_VAE]
            continue
        if "sd35" in name:
            # ComfyUI's SD3.5 examples: the checkpoint gives MODEL and VAE, TripleCLIPLoader the CLIP
            assert ckpts == {h.SD35_MEDIUM_CKPT}
            (clip,) = h.find_nodes(prompt, "TripleCLIPLoader")
            assert [clip["inputs"][f"clip_name{i}"] for i in (1, 2, 3)] == [h.FLUX_CLIP_L, h.SD35_CLIP_G, h.FLUX_T5]
            (ckpt_id,) = [k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple"]
            (clip_id,) = [k for k, v in prompt.items() if v["class_type"] == "TripleCLIPLoader"]
            (train,) = h.find_nodes(prompt, "DTITrain")
            assert (train["inputs"]["model"], train["inputs"]["clip"], train["inputs"]["vae"]) == \
                ([ckpt_id, 0], [clip_id, 0], [ckpt_id, 2])
            assert train["inputs"]["train_encoders"] == "all"
            assert all(n["inputs"]["clip"] == [clip_id, 0] for n in h.find_nodes(prompt, "CLIPTextEncode"))
            continue
        assert ckpts == {h.SDXL_CKPT if "sdxl" in name else h.SD15_CKPT}
    for name in [n for n in loadable if n.startswith("dti_train_")]:
        (train,) = h.find_nodes(uses[name], "DTITrain")
        # photos from a folder, each at its own size (no Batch Images cropping them to one size)
        assert train["inputs"]["image_folder"] == h.EXAMPLE_FOLDER and "images" not in train["inputs"]
        assert not h.find_nodes(uses[name], "ImageBatch")
        # the render's prompt is linked to the training output, so training runs first
        (replace,) = h.find_nodes(uses[name], "StringReplace")
        assert replace["inputs"]["replace"][0] in {k for k, v in uses[name].items() if v["class_type"] == "DTITrain"}
        assert "{}" in replace["inputs"]["string"]
    for name in ("dti_slerp_concepts.json", "dti_interpolation_strip.json"):
        embs = sorted(n["inputs"]["embedding"] for n in h.find_nodes(uses[name], "DTILoadEmbedding"))
        assert embs == [h.CONCEPT_A, h.CONCEPT_B]
    (strip,) = h.find_nodes(uses["dti_interpolation_strip.json"], "DTIInterpolationStrip")
    (latent,) = h.find_nodes(uses["dti_interpolation_strip.json"], "EmptyLatentImage")
    assert strip["inputs"]["count"] == latent["inputs"]["batch_size"] == 5


@pytest.mark.parametrize("name", ["dti_train_sd35.json", "dti_train_chroma.json"])
def test_sd35_and_chroma_render_with_real_cfg_and_a_negative_prompt(name, object_info):
    """Neither is guidance-distilled: cfg above 1 and a negative prompt that the sampler reads."""
    prompt = h.ui_to_api(h.load_workflow(name), object_info)
    (ks,) = h.find_nodes(prompt, "KSampler")
    assert ks["inputs"]["cfg"] > 1
    negative = prompt[ks["inputs"]["negative"][0]]
    assert negative["class_type"] == "CLIPTextEncode" and negative["inputs"]["text"].strip()
    assert h.find_nodes(prompt, "EmptySD3LatentImage") and not h.find_nodes(prompt, "FluxGuidance")


def test_validator_catches_bad_values(object_info):
    """The checks above can fail: a wrong combo value, an out-of-range number, a bad link."""
    prompt = h.ui_to_api(h.load_workflow("dti_train_sd15.json"), object_info)
    bad = json.loads(json.dumps(prompt))
    (train,) = h.find_nodes(bad, "DTITrain")
    train["inputs"]["magnitude"] = "median"
    train["inputs"]["steps"] = 0
    (ks,) = h.find_nodes(bad, "KSampler")
    ks["inputs"]["positive"] = [ks["inputs"]["model"][0], 0]  # MODEL into CONDITIONING
    problems = h.validate_prompt(bad, object_info)
    assert len(problems) == 3, problems


def test_server_lists_them_as_the_packs_templates(server):
    """ComfyUI serves *.json in a pack's workflows/ to the template browser."""
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(h.PACK_DIR_NAME, [])) == sorted(n[:-5] for n in WORKFLOWS)
    served = server.get_json(f"/api/workflow_templates/{h.PACK_DIR_NAME}/dti_train_sd15.json")
    assert served == h.load_workflow("dti_train_sd15.json")
