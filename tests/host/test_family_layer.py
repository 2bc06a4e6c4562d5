"""The model-family layer: which family a MODEL + CLIP is, and conditioning built by the model itself.

SD1.x / SDXL moved from a hand-built ``y`` onto ``model.model.extra_conds`` (what ComfyUI's sampler
uses); the first test pins that the denoiser receives exactly (bit for bit) what the hand-built
step gave it.
"""

import pytest
import torch


def _capture_step(dti_pack, loaded, res=64):
    ct = dti_pack.comfy_host
    model, clip, _ = loaded
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        counts = {k: v.shape[0] for k, v in init.items()}
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}", "a {} in the snow"], counts)
    latents = torch.randn(3, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(0))
    seen = {}
    inner = model.model
    orig_apply, orig_extra = inner.apply_model, inner.extra_conds

    def apply_model(x, t, **kw):
        seen["apply"] = dict(kw)
        return orig_apply(x, t, **kw)

    def extra_conds(**kw):
        if torch.is_tensor(kw.get("cross_attn")):
            seen["extra"] = dict(kw)
        return orig_extra(**kw)

    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        inner.apply_model, inner.extra_conds = apply_model, extra_conds
        try:
            step = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 3, res, torch.device("cpu"))
            loss = step({k: m_star[k] * init[k] for k in init}, 4)
        finally:
            del inner.apply_model, inner.extra_conds
    return model, seen, loss


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sd_families_give_the_denoiser_exactly_what_the_hand_built_step_did(kind, request, dti_pack):
    loaded = request.getfixturevalue(f"fresh_{kind}")
    model, seen, loss = _capture_step(dti_pack, loaded)
    kw, ex = seen["apply"], seen["extra"]
    cond = ex["cross_attn"]
    assert torch.equal(kw["c_crossattn"], cond)
    if kind == "sd15":
        # SD1.x: cross-attention only (no pooled text, no y), as before
        assert set(kw) == {"c_crossattn", "transformer_options"}
        assert ex["pooled_output"] is None
    else:
        pooled = ex["pooled_output"]
        assert pooled is not None and pooled.shape == (2, 1280) and pooled.abs().max() > 0
        y_old = model.model.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0, crop_h=0,
                                       target_width=64, target_height=64, device=torch.device("cpu"))
        assert set(kw) == {"c_crossattn", "y", "transformer_options"}
        assert torch.equal(kw["y"], y_old)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind,family,encoders", [("sd15", "SD1.x", ("clip_l",)), ("sd2", "SD2.x", ("clip_h",)),
                                                  ("sdxl", "SDXL", ("clip_l", "clip_g"))])
def test_family_of_the_loaded_checkpoints(kind, family, encoders, request, dti_pack):
    fams = dti_pack.comfy_host.families
    model, clip, _ = request.getfixturevalue(f"fresh_{kind}")
    fam = fams.family_of(model, clip)
    assert fam.name == family and fam.encoders == encoders
    assert fams.trained_encoders(fam, "all") == encoders
    assert fams.trained_encoders(fam, f" {encoders[-1]} ,") == (encoders[-1],)
    with pytest.raises(ValueError, match="write 'all' or a comma-separated list"):
        fams.trained_encoders(fam, "t5xxl")


def test_a_clip_from_another_family_is_refused_before_any_work(dti_pack, sd15_loaded, sdxl_loaded):
    fams = dti_pack.comfy_host.families
    with pytest.raises(dti_pack.comfy_host.contracts.UnsupportedModelError,
                       match=r"does not fit the SD1\.x / SD2\.x model \(BaseModel\): it needs the text encoders clip_l or clip_h, "
                             r"the CLIP has clip_g, clip_l"):
        fams.family_of(sd15_loaded[0], sdxl_loaded[1])


def test_z_image_is_taken_for_z_image_never_for_lumina2(comfy, dti_pack, checkpoints, sd15_loaded, embeddings_dir):
    """0.33's Z-Image is ``supported_models.ZImage(Lumina2)`` on the shared ``model_base.Lumina2``: a
    check on the model class alone took it for Lumina 2 and its Gemma encoder. The model's config
    decides: a Z-Image MODEL asks for Qwen3-4B by the family's name, before any work."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    from tests_host_helpers import run_train

    if not hasattr(sm, "ZImage"):
        pytest.skip("this ComfyUI has no Z-Image (supported_models.ZImage came after 0.3.64)")
    assert issubclass(sm.ZImage, sm.Lumina2)
    with torch.device("meta"):
        base = sm.ZImage(dict(checkpoints.LUMINA2_DIT_CONFIG)).get_model({})
    assert type(base) is comfy.model_base.Lumina2  # the class Lumina 2 uses too
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    _, clip, vae = sd15_loaded
    families = dti_pack.comfy_host.families
    with pytest.raises(dti_pack.comfy_host.contracts.UnsupportedModelError,
                       match=r"does not fit the Z-Image model \(Lumina2\): it needs the text encoders qwen3_4b, "
                             r"the CLIP has clip_l"):
        families.family_of(model, clip)
    before = sorted(p.name for p in embeddings_dir.rglob("*"))
    with pytest.raises(ValueError, match="Z-Image"):
        run_train(dti_pack, (model, clip, vae), name="zimage_refused", steps=1, batch_size=1)
    assert sorted(p.name for p in embeddings_dir.rglob("*")) == before


def test_readme_family_table_agrees_with_the_family_table(dti_pack):
    """Every family row of comfy_host/families.py has a README row: its name first, its encoder keys in
    the encoder column, its default resolution; and the README lists no family the code lacks."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("| family | encoders that learn vectors")
    lines = text[start:].splitlines()[2:]
    rows = lines[:next((i for i, r in enumerate(lines) if not r.startswith("|")), len(lines))]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    fams = dti_pack.comfy_host.families.FAMILIES
    for fam in fams:
        name = fam.name.replace(" (no T5)", "")
        row = next((c for c in cells if c[0].startswith(name)), None)
        assert row is not None, f"README has no row for {name}"
        assert all(f"`{k}`" in row[1] for k in fam.encoders), (name, fam.encoders, row[1])
        assert row[2] == str(fam.resolution), (name, fam.resolution, row[2])
    names = {f.name.replace(" (no T5)", "") for f in fams}
    for c in cells:
        assert any(c[0].startswith(n) for n in names), f"README row {c[0]!r} names no family of the code"
