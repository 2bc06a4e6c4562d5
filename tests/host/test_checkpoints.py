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


# ---------------------------------------------------------------------------
# Flux.1 dev / schnell, Chroma, SD3.5 (checkpoints.FAMILIES): separate files loaded like
# UNETLoader + (Dual/Triple)CLIPLoader + VAELoader, one-layer T5-XXL.
# ---------------------------------------------------------------------------

import os  # noqa: E402
import time  # noqa: E402

import dti_host_checkpoints as ck  # noqa: E402  (registered by tests/host/conftest.py)

FAMILY_NAMES = ["flux-dev", "flux-schnell", "chroma", "sd3"]
# supported_models class, model_base class, ModelType name, latent format class
FAMILY_EXPECT = {
    "flux-dev": ("Flux", "Flux", "FLUX", "Flux"),
    "flux-schnell": ("FluxSchnell", "Flux", "FLOW", "Flux"),
    "chroma": ("Chroma", "Chroma", "FLUX", "Flux"),
    "sd3": ("SD3", "SD3", "FLOW", "SD3"),
}
# min_length of each family's T5 tokenizer in ComfyUI 0.3.64 (Flux pads to 256, SD3 to 77,
# Chroma/PixArt does not pad).
T5_MIN_LENGTH = {"flux-dev": 256, "flux-schnell": 256, "chroma": 1, "sd3": 77}


# Session-scoped and parametrized: pytest groups the tests by family, so with the
# FamilyCache keeping one family, each is loaded once.
@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture
def fam_load(family, request):
    return request.getfixturevalue(f"{family.replace('-', '_')}_load")


def _t5_module(clip):
    t5 = clip.cond_stage_model.t5xxl
    return getattr(t5, "t5xxl", t5)  # Chroma: SD1ClipModel(name="t5xxl") wraps the SDClipModel


def _encode_family(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


def test_family_detection(family, fam_load, comfy):
    model, clip, vae = fam_load.out
    cfg_name, model_name, mtype, latent = FAMILY_EXPECT[family]
    fam = ck.FAMILIES[family]
    assert type(model.model.model_config) is getattr(comfy.supported_models, cfg_name)
    assert type(model.model) is getattr(comfy.model_base, model_name)
    assert model.model.model_type == getattr(comfy.model_base.ModelType, mtype)
    import comfy.latent_formats
    assert type(model.model.latent_format) is getattr(comfy.latent_formats, latent)
    assert ck.load_problems(fam_load.log) == []
    cfg = model.model.model_config.unet_config
    for k, v in ck.dit_config(fam.dit)[1].items():
        assert cfg[k] == v, k
    dm = model.model.diffusion_model
    if family.startswith("flux"):
        # (schnell's guidance_in is an nn.Identity: no weights)
        assert dm.params.guidance_embed == (family == "flux-dev")
        assert isinstance(dm.guidance_in, torch.nn.Identity) == (family == "flux-schnell")
        assert any(k.startswith("guidance_in.") for k in dm.state_dict()) == (family == "flux-dev")
        assert (len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size) == (1, 1, 3072)
    elif family == "chroma":
        assert hasattr(dm, "distilled_guidance_layer") and not hasattr(dm, "guidance_in")
        assert (len(dm.double_blocks), len(dm.single_blocks)) == (1, 1)
    else:
        assert (len(dm.joint_blocks), dm.hidden_size) == (2, 128)
        assert not isinstance(dm.joint_blocks[0].x_block.attn.ln_q, torch.nn.Identity)  # SD3.5: qk RMSNorm
        assert dm.joint_blocks[0].x_block.x_block_self_attn  # SD3.5 medium: dual attention
    assert next(dm.parameters()).is_inference(), "loaded like ComfyUI's executor: under torch.inference_mode()"
    assert next(clip.cond_stage_model.parameters()).is_inference()
    assert vae.latent_channels == 16 and next(vae.first_stage_model.parameters()).is_inference()
    n_dit, n_te, n_vae = (ck.param_count(m) for m in (dm, clip.cond_stage_model, vae.first_stage_model))
    print(f"\n[{family}] load {fam_load.seconds:.1f} s; params: diffusion {n_dit / 1e6:.0f}M, "
          f"text encoders {n_te / 1e6:.0f}M, vae {n_vae / 1e6:.0f}M; files "
          + ", ".join(f"{os.path.basename(str(p))} {ck.human_bytes(os.path.getsize(p))}"
                      for p in [fam_load.paths["diffusion_model"], *fam_load.paths["text_encoders"], fam_load.paths["vae"]]))


def test_family_text_encoders(family, fam_load, embeddings_dir):
    model, clip, vae = fam_load.out
    fam = ck.FAMILIES[family]
    toks = {k: v for k, v in vars(clip.tokenizer).items() if hasattr(v, "embedding_key")}
    assert {k: v.embedding_key for k, v in toks.items()} == fam.expected_tokenizers
    for t in toks.values():
        assert str(embeddings_dir) in t.embedding_directory
    encoders = {n for n, m in clip.cond_stage_model.named_children() if m is not None}
    assert encoders == {"clip-l": {"t5xxl", "clip_l"}, "chroma": {"t5xxl"}, "sd3": {"clip_l", "clip_g", "t5xxl"}}.get(
        "clip-l" if family.startswith("flux") else family)
    t5 = _t5_module(clip)
    assert t5.num_layers == 1 and len(t5.transformer.encoder.block) == 1, "the one-layer T5 (t5xxl_model_config)"
    t5_tok = toks["clip_t5xxl" if family == "chroma" else "t5xxl"]
    assert t5_tok.min_length == T5_MIN_LENGTH[family]
    tokens = clip.tokenize("a photo of a dog")
    t5_ids = [t for t, *_ in tokens["t5xxl"][0]]
    if family == "chroma":  # no padding: the words and the end token (1)
        assert t5_ids[-1] == 1 and 0 not in t5_ids and len(t5_ids) < 16
    else:  # padded with 0 after the end token up to min_length
        assert len(t5_ids) == T5_MIN_LENGTH[family] and t5_ids[t5_ids.index(1) + 1:] == [0] * (len(t5_ids) - t5_ids.index(1) - 1)
    cond, pooled = _encode_family(clip, "a photo of a dog")
    other, _ = _encode_family(clip, "a photo of a car")
    assert torch.isfinite(cond).all() and cond.float().std() > 1e-3
    assert not torch.equal(cond, other)
    expect_len = {"chroma": len(tokens["t5xxl"][0]), "sd3": 77 + 77}.get(family, 256)
    assert cond.shape == (1, expect_len, 4096)
    if family == "chroma":
        assert pooled is None
    else:
        assert pooled.shape == (1, 2048 if family == "sd3" else 768) and torch.isfinite(pooled).all()


def _write_probe(folder, name, t5_seed):
    from safetensors.torch import save_file
    path = folder / f"{name}.safetensors"
    if not path.exists():
        g = torch.Generator().manual_seed(1)
        sd = {"clip_l": torch.randn(2, 768, generator=g) * 0.014, "clip_g": torch.randn(2, 1280, generator=g) * 0.014}
        sd["t5xxl"] = torch.randn(2, 4096, generator=torch.Generator().manual_seed(t5_seed)) * 0.3
        save_file(sd, str(path))
    return name


def test_family_embedding_tokens_spliced(family, fam_load, embeddings_dir):
    """``embedding:NAME`` from ``embeddings_dir`` becomes two tensor slots in every
    tokenizer, and the T5 really uses them: two files that differ only in ``t5xxl``
    change exactly the T5 part of the conditioning."""
    model, clip, vae = fam_load.out
    a = _write_probe(embeddings_dir, "dti_family_probe_a", 2)
    b = _write_probe(embeddings_dir, "dti_family_probe_b", 3)
    tokens = clip.tokenize(f"a photo of embedding:{a}")
    widths = {"l": 768, "g": 1280, "t5xxl": 4096}
    assert set(tokens) == {"flux-dev": {"l", "t5xxl"}, "flux-schnell": {"l", "t5xxl"}, "chroma": {"t5xxl"},
                           "sd3": {"l", "g", "t5xxl"}}[family]
    for key, batches in tokens.items():
        slots = [t for t, *_ in batches[0] if isinstance(t, torch.Tensor)]
        assert len(slots) == 2 and all(s.shape == (widths[key],) for s in slots), key
    ca, pa = _encode_family(clip, f"a photo of embedding:{a}")
    cb, pb = _encode_family(clip, f"a photo of embedding:{b}")
    assert torch.isfinite(ca).all() and torch.isfinite(cb).all()
    t5_part = slice(77, None) if family == "sd3" else slice(None)
    assert not torch.equal(ca[:, t5_part], cb[:, t5_part]), "T5 output must depend on the spliced t5xxl vectors"
    if family == "sd3":
        assert torch.equal(ca[:, :77], cb[:, :77]), "CLIP-L/G part must not depend on the t5xxl vectors"
    if pa is not None:
        assert torch.equal(pa, pb)


def test_family_denoiser_forward(family, fam_load):
    """One ``apply_model`` with the conds ``extra_conds`` builds (what the sampler does) at
    a 16x8x8 latent: finite, depends on the text, and Flux dev on the guidance."""
    model, clip, vae = fam_load.out
    cond, pooled = _encode_family(clip, "a photo of a dog")
    other, opooled = _encode_family(clip, "a photo of a car")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        conds = ck.model_conds(model, cond, pooled, x)
        expect = {"flux-dev": {"c_crossattn", "y", "guidance"}, "flux-schnell": {"c_crossattn", "y", "guidance"},
                  "chroma": {"c_crossattn", "guidance"}, "sd3": {"c_crossattn", "y"}}[family]
        assert set(conds) == expect
        sigma = model.model.model_sampling.percent_to_sigma(0.5) * torch.ones(1)
        out = model.model.apply_model(x, sigma, **conds)
        seconds = time.perf_counter() - t0
        out_other = model.model.apply_model(x, sigma, **ck.model_conds(model, other, opooled, x))
        if family.startswith("flux"):
            out_g = model.model.apply_model(x, sigma, **ck.model_conds(model, cond, pooled, x, guidance=1.0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - x).abs().max() > 1e-3
    assert not torch.equal(out, out_other), "the denoiser output must depend on the text"
    if family == "flux-dev":
        assert not torch.equal(out, out_g), "guidance_in: Flux dev's output depends on guidance"
    elif family == "flux-schnell":
        assert torch.equal(out, out_g), "schnell has no guidance_in"
    print(f"\n[{family}] one denoiser forward at 16x8x8: {seconds:.2f} s")
    assert seconds < 60


def test_family_vae(family, fam_load):
    model, clip, vae = fam_load.out
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lat = vae.encode(img)
        dec = vae.decode(lat)
        lat_in = model.model.process_latent_in(lat)
    assert lat.shape == (1, 16, 8, 8) and torch.isfinite(lat).all() and lat.abs().max() > 0
    assert dec.shape[-3:] == (64, 64, 3) and torch.isfinite(dec).all()
    assert not torch.equal(lat_in, lat)  # Flux / SD3 latent formats shift and scale


def test_family_memory_and_time(family, fam_load):
    """Small enough for CPU tests: weights in memory and load time bounded."""
    model, clip, vae = fam_load.out
    nbytes = sum(p.numel() * p.element_size()
                 for m in (model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model)
                 for p in m.parameters())
    print(f"\n[{family}] resident weights {ck.human_bytes(nbytes)}, load {fam_load.seconds:.1f} s")
    assert nbytes < 4 * 2**30
    assert fam_load.seconds < 120


@pytest.mark.parametrize("kind", ["sd3-medium", "sd35-medium", "sd35-large"])
def test_sd3_layouts_load_as_sd3(kind, comfy, checkpoint_cache_dir):
    """Every MMDiT layout (SD3 medium, SD3.5 medium with dual attention, SD3.5 large)
    loads through UNETLoader's call as supported_models.SD3 and runs."""
    path = ck.ensure_component(kind, checkpoint_cache_dir)
    model, log = ck.load_diffusion_model(path)
    assert ck.load_problems(log) == []
    assert type(model.model.model_config) is comfy.supported_models.SD3
    assert type(model.model) is comfy.model_base.SD3
    dm = model.model.diffusion_model
    cfg = ck.dit_config(kind)[1]
    assert (not isinstance(dm.joint_blocks[0].x_block.attn.ln_q, torch.nn.Identity)) == (cfg.get("qk_norm") == "rms")
    assert bool(dm.joint_blocks[0].x_block.x_block_self_attn) == (cfg["x_block_self_attn_layers"] == [0])
    assert dm.pos_embed.shape == (1, cfg["num_patches"], 128)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    with torch.inference_mode():
        conds = ck.model_conds(model, torch.randn(1, 20, 4096, generator=g), torch.randn(1, 2048, generator=g), x)
        out = model.model.apply_model(x, torch.ones(1) * 0.5, **conds)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sd3_single_file_checkpoint(sd3_checkpoint_load, comfy, checkpoint_cache_dir):
    """CheckpointLoaderSimple's call on the SD3.5 "incl. clips" file: SD3, CLIP-L + CLIP-G
    and no T5, the same weights as the separate files, and a forward that runs."""
    from safetensors import safe_open
    model, clip, vae = sd3_checkpoint_load.out
    assert ck.load_problems(sd3_checkpoint_load.log) == []
    assert type(model.model.model_config) is comfy.supported_models.SD3
    cm = clip.cond_stage_model
    assert cm.clip_l is not None and cm.clip_g is not None and cm.t5xxl is None
    assert {k: v.embedding_key for k, v in vars(clip.tokenizer).items()} == \
        {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5xxl"}
    assert vae.latent_channels == 16
    with safe_open(str(ck.ensure_component(ck.SD3_CHECKPOINT_DIT, checkpoint_cache_dir)), framework="pt") as f:
        w = f.get_tensor("x_embedder.proj.weight")
    assert torch.equal(model.model.diffusion_model.x_embedder.proj.weight.to(w.dtype), w)
    cond, pooled = _encode_family(clip, "a photo of a dog")
    assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model.model.apply_model(x, torch.ones(1) * 0.5, **ck.model_conds(model, cond, pooled, x))
    assert torch.isfinite(out).all()


def test_one_layer_t5_routing(comfy, checkpoint_cache_dir):
    """Why ``load_text_encoders`` builds Chroma's CLIP itself: ComfyUI's
    ``detect_te_model`` takes a single one-layer T5-XXL for T5-Base (it needs
    ``encoder.block.23``), and only a 24-deep file routes to PixArt/Chroma's T5."""
    import comfy.sd
    from safetensors import safe_open
    path = ck.ensure_component("t5xxl", checkpoint_cache_dir)
    with safe_open(str(path), framework="pt") as f:
        keys = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    assert comfy.sd.detect_te_model(keys) == comfy.sd.TEModel.T5_BASE
    keys["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] = torch.empty(10240, 4096, device="meta")
    assert comfy.sd.detect_te_model(keys) == comfy.sd.TEModel.T5_XXL
    clip, log = ck.load_text_encoders([path], "CHROMA", model_options=ck.T5XXL_ONE_LAYER_OPTIONS)
    assert type(clip.cond_stage_model).__mro__[1].__name__ == "PixArtT5XXL"
    assert type(clip.tokenizer).__name__ == "PixArtTokenizer"
    assert ck.load_problems(log) == []


def test_streaming_writer_roundtrip(tmp_path):
    from safetensors import safe_open
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.c": torch.randn(7, generator=g).to(torch.bfloat16),
               "d": torch.randn(2, 2, generator=g).to(torch.float8_e4m3fn), "e": torch.tensor(4.5, dtype=torch.float16),
               "f": torch.arange(3)}
    entries = [(k, tuple(v.shape), v.dtype, (lambda v=v: v.clone())) for k, v in tensors.items()]
    ck.write_safetensors_streaming(tmp_path / "x.safetensors", entries, {"m": 1})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"m": "1"} and set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dim() else \
                torch.equal(got, v)
    with pytest.raises(ValueError):
        ck.write_safetensors_streaming(tmp_path / "y.safetensors", [("a", (2,), torch.float32, lambda: torch.zeros(3))])
    assert not (tmp_path / "y.safetensors").exists()


def test_streaming_writer_leaves_zeros_as_holes(tmp_path):
    """All-zero tensors are skipped over, not written (the 24-layer T5 relies on it for its disk use), and
    still read back as zeros, a trailing one included: the file keeps its full length."""
    from safetensors import safe_open
    big = 1 << 16  # float32 elements: 256 KiB
    tensors = {"z1": torch.zeros(big), "x": torch.arange(5, dtype=torch.float32), "z2": torch.zeros(big)}
    entries = [(k, tuple(v.shape), v.dtype, (lambda v=v: v.clone())) for k, v in tensors.items()]
    size = ck.write_safetensors_streaming(tmp_path / "h.safetensors", entries)
    assert size == os.path.getsize(tmp_path / "h.safetensors")
    with safe_open(str(tmp_path / "h.safetensors"), framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert os.stat(tmp_path / "h.safetensors").st_blocks * 512 < 2 * big * 4, "zeros were written, not skipped"

    # A producer's None is an all-zero tensor (the generators' idle blocks: no fp32 pass, no cast), and a
    # tensor of zero and non-zero 64 KiB chunks with a short tail reads back whole.
    mixed = torch.zeros(5 * big + 3)
    mixed[big:2 * big] = 1.0
    mixed[3 * big + 7] = 2.0
    mixed[-1] = 3.0
    tensors = {"none": torch.zeros(big, dtype=torch.float16), "mixed": mixed, "last": torch.zeros(big)}
    entries = [("none", (big,), torch.float16, lambda: None), ("mixed", tuple(mixed.shape), mixed.dtype, mixed.clone),
               ("last", (big,), torch.float32, lambda: None)]
    ck.write_safetensors_streaming(tmp_path / "n.safetensors", entries)
    with safe_open(str(tmp_path / "n.safetensors"), framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    # 1.7 MB long; the chunks with non-zero values (and the header's) take ~0.45 MB of disk
    assert os.path.getsize(tmp_path / "n.safetensors") > 1_600_000
    assert os.stat(tmp_path / "n.safetensors").st_blocks * 512 < 700_000, "zeros were written, not skipped"


def test_deep_t5_plan_keeps_only_the_first_blocks_live(comfy):
    plan = ck._text_encoder_plan("t5xxl", t5_layers=4)
    zeroed = {name for name, _shape, fill in plan if fill is ck._zero_fill}
    assert "encoder.block.3.layer.1.DenseReluDense.wo.weight" in zeroed
    assert "encoder.block.2.layer.0.SelfAttention.q.weight" in zeroed
    assert not any(".block.0." in n or ".block.1." in n or "layer_norm" in n or n == "shared.weight" for n in zeroed)
    assert len(zeroed) == 7 * (4 - ck.T5XXL_LIVE_LAYERS)  # q, k, v, o, wi_0, wi_1, wo per idle block


@pytest.mark.skipif(os.environ.get("DTI_TEST_FULL_T5", "") != "1",
                    reason="full-depth T5-XXL (4.8 GB fp8 file, ~5 GB RAM, ~1 min a prompt): set DTI_TEST_FULL_T5=1")
def test_full_depth_t5_through_loader_call(comfy, embeddings_dir, checkpoint_cache_dir):
    """The real-depth T5-XXL (24 layers, float8_e4m3fn like t5xxl_fp8_e4m3fn) loads through
    DualCLIPLoader's call (``comfy.sd.load_clip`` with no model_options, type flux) and
    splices ``embedding:NAME``."""
    t0 = time.perf_counter()
    t5 = ck.ensure_component("t5xxl", checkpoint_cache_dir, dtype=torch.float8_e4m3fn, t5_layers=24)
    gen_s = time.perf_counter() - t0
    clip_l = ck.ensure_component("clip-l", checkpoint_cache_dir)
    t0 = time.perf_counter()
    clip, log = ck.load_text_encoders([clip_l, t5], "FLUX", embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))
    load_s = time.perf_counter() - t0
    assert ck.load_problems(log) == []
    assert len(_t5_module(clip).transformer.encoder.block) == 24
    a = _write_probe(embeddings_dir, "dti_family_probe_a", 2)
    tokens = clip.tokenize(f"a photo of embedding:{a}")
    assert sum(isinstance(t, torch.Tensor) for t, *_ in tokens["t5xxl"][0]) == 2
    t0 = time.perf_counter()
    cond, pooled = _encode_family(clip, f"a photo of embedding:{a}")
    enc_s = time.perf_counter() - t0
    assert cond.shape == (1, 256, 4096) and torch.isfinite(cond).all()
    print(f"\n[full T5] generate {gen_s:.0f} s, file {ck.human_bytes(os.path.getsize(t5))}, load {load_s:.0f} s, "
          f"encode {enc_s:.0f} s")
