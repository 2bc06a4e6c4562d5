"""The generated checkpoints load through ComfyUI's own loader as SD1.5 / SDXL and
give finite, non-degenerate outputs.  Needs COMFYUI_PATH (skips loudly otherwise)."""

import pytest
import torch

KINDS = ["sd15", "sdxl"]
WIDTH = {"sd15": 768, "sdxl": 2048}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def loaded(kind, request):
    return request.getfixturevalue(f"{kind}_loaded")


def _encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def _adm(model, pooled, kind, size=64):
    if kind != "sdxl":
        return None
    return model.model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                  target_width=size, target_height=size)


def test_detection(kind, request, comfy, checkpoints):
    load = request.getfixturevalue(f"{kind}_load")
    model, clip, vae = load.out
    expected_cfg = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[kind]
    expected_model = {"sd15": comfy.model_base.BaseModel, "sdxl": comfy.model_base.SDXL}[kind]
    assert type(model.model.model_config) is expected_cfg
    assert type(model.model) is expected_model
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert clip is not None and vae is not None
    # Keys round-trip cleanly (no unet/clip/vae missing or unexpected beyond what
    # ComfyUI itself considers normal).
    assert checkpoints.load_problems(load.log) == []
    # The thin config is what the detector saw.
    ref = checkpoints.SD15_UNET_CONFIG if kind == "sd15" else checkpoints.SDXL_UNET_CONFIG
    cfg = model.model.model_config.unet_config
    for k in ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "context_dim"):
        assert cfg[k] == ref[k], k


def test_loaded_under_inference_mode(loaded):
    model, clip, vae = loaded
    p = next(model.model.diffusion_model.parameters())
    assert p.is_inference(), "fixtures must load like ComfyUI's executor: under torch.inference_mode()"


def test_clip_encode(kind, loaded):
    model, clip, vae = loaded
    cond, pooled = _encode(clip, "a photo of a dog")
    assert cond.shape == (1, 77, WIDTH[kind])
    assert torch.isfinite(cond).all()
    assert cond.float().std() > 1e-3
    other, _ = _encode(clip, "a photo of a car")
    assert not torch.equal(cond, other), "different prompts must give different conditioning"
    if kind == "sdxl":
        assert pooled.shape == (1, 1280)
        assert torch.isfinite(pooled).all() and pooled.float().std() > 1e-3


def test_apply_model(kind, loaded):
    model, clip, vae = loaded
    cond, pooled = _encode(clip, "a photo of a dog")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        ms = model.model.model_sampling
        sigma = ms.percent_to_sigma(0.5) * torch.ones(1)
        latent = torch.randn(1, 4, 8, 8, generator=g)
        noise = torch.randn(1, 4, 8, 8, generator=g)
        x_t = ms.noise_scaling(sigma, noise, latent)
        x0 = model.model.apply_model(x_t, sigma, c_crossattn=cond, y=_adm(model, pooled, kind))
    assert x0.shape == x_t.shape
    assert torch.isfinite(x0).all()
    eps = (x_t - x0) / sigma.view(-1, 1, 1, 1)
    assert eps.abs().max() > 1e-3, "UNet output must not be identically zero"


def test_one_step_ksampler(sd15_loaded, comfy_nodes):
    """ComfyUI's own sampling path (nodes.common_ksampler), 1 step, 8x8 latent."""
    model, clip, vae = sd15_loaded
    cond, pooled = _encode(clip, "a photo of a dog")
    neg, npooled = _encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, 0, 1, 1.0, "euler", "normal",
                                             [[cond, {"pooled_output": pooled}]],
                                             [[neg, {"pooled_output": npooled}]], latent)
    s = out["samples"]
    assert s.shape == (1, 4, 8, 8)
    assert torch.isfinite(s).all() and s.abs().max() > 0


def test_vae_roundtrip(kind, loaded):
    model, clip, vae = loaded
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 64, 64, 3, generator=g)
    with torch.inference_mode():
        lat = vae.encode(img)
        dec = vae.decode(lat)
    assert lat.shape == (1, 4, 8, 8)
    assert torch.isfinite(lat).all() and lat.abs().max() > 0
    assert dec.shape[-1] == 3 and dec.shape[-3:-1] == (64, 64)
    assert torch.isfinite(dec).all()


def test_embedding_folder_is_used(kind, loaded, embeddings_dir, comfy):
    """A file in ``embeddings_dir`` is found through ``embedding:NAME``: the token
    list then holds a tensor slot per vector (ComfyUI's splice path)."""
    from safetensors.torch import save_file
    model, clip, vae = loaded
    name = "dti_fixture_probe"
    path = embeddings_dir / f"{name}.safetensors"
    if not path.exists():
        g = torch.Generator().manual_seed(1)
        save_file({"clip_l": torch.randn(2, 768, generator=g) * 0.014,
                   "clip_g": torch.randn(2, 1280, generator=g) * 0.014}, str(path))
    tokens = clip.tokenize(f"a photo of embedding:{name}")
    for key, width in (("l", 768), ("g", 1280)):
        if key not in tokens:
            continue
        slots = [t for t, _w in tokens[key][0] if isinstance(t, torch.Tensor)]
        assert len(slots) == 2 and all(s.shape[-1] == width for s in slots), key
    cond, _ = _encode(clip, f"a photo of embedding:{name}")
    assert torch.isfinite(cond).all()


def test_init_weights_covers_every_parameter(comfy, checkpoints):
    """ComfyUI's ops leave ``torch.empty`` memory; the generator initialises every
    parameter explicitly and refuses parameters it has no rule for."""
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    m = torch.nn.Sequential(ops.Linear(4, 4), ops.LayerNorm(4), ops.Conv2d(4, 4, 3))
    g = torch.Generator().manual_seed(0)
    checkpoints.init_weights_(m, g)
    assert torch.equal(m[1].weight, torch.ones(4)) and torch.equal(m[0].bias, torch.zeros(4))
    m2 = torch.nn.Sequential(ops.Linear(4, 4), ops.LayerNorm(4), ops.Conv2d(4, 4, 3))
    checkpoints.init_weights_(m2, torch.Generator().manual_seed(0))
    assert torch.equal(m[0].weight, m2[0].weight) and torch.equal(m[2].weight, m2[2].weight)
    m.odd = torch.nn.Parameter(torch.empty(3))
    with pytest.raises(ValueError):
        checkpoints.init_weights_(m, g)
