"""Training under the attention backends and weight storage that ComfyUI's launch flags select,
in-process on the thin models (the real-server runs per flag are in tests/workflows/test_launch_flags.py).

ComfyUI picks its attention once at start (``comfy.ldm.modules.attention.optimized_attention``)
and ``CrossAttention.forward`` reads that module global at call time, so swapping it here is what
the flags do. Sub-quadratic attention chunks (and exponentiates in place) only when
``model_management.get_free_memory`` reports little: the tests force that path by handing the
attention module a ``model_management`` that reports 1 KiB free, instead of hoping the machine
is busy.
"""

import types

import pytest
import torch

BACKENDS = ["sub_quad_chunked", "sub_quad", "split", "basic", "pytorch"]


def low_memory_model_management(mm, free_bytes=1024):
    proxy = types.ModuleType("low_memory_model_management")
    proxy.__getattr__ = lambda name: getattr(mm, name)  # module-level __getattr__ (PEP 562)
    proxy.get_free_memory = lambda dev=None, torch_free_too=False: (free_bytes, free_bytes) if torch_free_too else free_bytes
    return proxy


@pytest.fixture
def backend(request, monkeypatch, comfy):
    """Make ComfyUI's attention the named backend, as its launch flags would."""
    import comfy.ldm.modules.attention as attention

    name = request.param
    fn = {"sub_quad_chunked": attention.attention_sub_quad, "sub_quad": attention.attention_sub_quad,
          "split": attention.attention_split, "basic": attention.attention_basic,
          "pytorch": attention.attention_pytorch}[name]
    monkeypatch.setattr(attention, "optimized_attention", fn)
    monkeypatch.setattr(attention, "optimized_attention_masked", fn)
    if name == "sub_quad_chunked":
        monkeypatch.setattr(attention, "model_management", low_memory_model_management(comfy.model_management))
    return name, fn


def _step_grad(dti_pack, loaded, seed=0):
    """Loss and gradient of the node's own training step at the initializer (SD1.5, batch 2, 16x16 latents)."""
    ct = dti_pack.comfy_host
    model, clip, _ = loaded
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}", "a {} in the snow"], init["clip_l"].shape[0])
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        step = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 7, 128, torch.device("cpu"))
        v = init["clip_l"].clone().requires_grad_(True)
        loss = step({"clip_l": m_star["clip_l"] * v}, 3)
        loss.backward()
    return float(loss), v.grad.clone()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_training_step_differentiates_under_every_attention_backend(backend, dti_pack, fresh_sd15, comfy):
    import comfy.ldm.modules.attention as attention

    name, fn = backend
    model = fresh_sd15[0]
    # The backend really runs when the model samples outside training (it is what the flags chose).
    calls = []
    spy = lambda *a, **k: (calls.append(1), fn(*a, **k))[1]  # noqa: E731
    attention.optimized_attention = spy
    with torch.inference_mode():
        model.model.apply_model(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), c_crossattn=torch.randn(1, 77, 768))
    assert calls, "the forced backend was not used by the UNet"
    attention.optimized_attention = fn

    loss, grad = _step_grad(dti_pack, fresh_sd15)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Same loss and gradient as under PyTorch SDPA: training never depends on the flags. Tolerance:
    # the text encoder runs fp16 on this CPU (ComfyUI's default), so the two paths may differ by a
    # few fp16 ulps of the conditioning before the fp32 UNet; 1e-3 relative is far above that and
    # far below any real difference in the gradient.
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    ref_loss, ref_grad = _step_grad(dti_pack, fresh_sd15)
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-3 * float(ref_grad.abs().max()))
    # Nothing global was changed by the run: the MODEL samples with its own options again.
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_chunked_sub_quadratic_attention_is_really_taken_and_not_differentiable(comfy, monkeypatch):
    # Guards the forcing above: with 1 KiB "free", ComfyUI's sub-quadratic attention takes its
    # chunked path, whose in-place exp cannot be differentiated -- the failure users hit.
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(attention, "model_management", low_memory_model_management(comfy.model_management))
    q = torch.randn(1, 64, 64, requires_grad=True)
    with torch.inference_mode(False), torch.enable_grad(), pytest.raises(RuntimeError, match="out="):
        attention.attention_sub_quad(q, q, q, heads=1).sum().backward()


def _cast_layers(comfy, weight_dtype):
    import comfy.ops as ops

    g = torch.Generator().manual_seed(0)
    lin = ops.manual_cast.Linear(48, 32, dtype=weight_dtype)
    conv = ops.manual_cast.Conv2d(32, 16, 3, padding=1, stride=2, dtype=weight_dtype)
    with torch.no_grad():
        for m in (lin, conv):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for p in (*lin.parameters(), *conv.parameters()):
        p.requires_grad_(False)  # as in training: only the learned vectors need gradients
    return torch.nn.ModuleDict({"lin": lin, "conv": conv})


def _forward(mods, x):
    h = mods["lin"](x)  # (2, 10, 10, 32)
    return mods["conv"](h.permute(0, 3, 1, 2))


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float8_e4m3fn])
def test_cast_weights_are_recast_in_backward_not_kept(weight_dtype, dti_pack, comfy):
    """Layers that cast stored weights per call (fp16 text encoders on the CPU, fp8 storage, LoRA
    patches) give the same input gradient as autograd's own, while no weight-sized tensor is kept."""
    diff = dti_pack.comfy_host.autograd
    mods = _cast_layers(comfy, weight_dtype)
    # A LoRA-like patch: the effective weight differs from the stored one.
    mods["lin"].weight_function = [lambda w: w * 1.5]
    x = torch.randn(2, 10, 10, 48, generator=torch.Generator().manual_seed(1))
    weight_numels = {m.weight.numel() for m in mods.values()}

    def run():
        xi = x.clone().requires_grad_(True)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel()), t)[1], lambda t: t):
            out = _forward(mods, xi)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return out.detach(), xi.grad, sizes

    ref_out, ref_grad, ref_sizes = run()
    assert weight_numels & set(ref_sizes), "the reference path should keep the cast weights (else this test proves nothing)"
    layers = diff._lean_cast_layers(mods)
    try:
        out, grad, sizes = run()
    finally:
        for m in layers:
            del m.forward_comfy_cast_weights
    assert not weight_numels & set(sizes)
    # Same fp32 arithmetic on the same cast weights; only summation order may differ.
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # and the patch reached the backward: without it the gradient differs
    mods["lin"].weight_function = []
    assert not torch.allclose(run()[1], ref_grad, rtol=1e-3)


def test_text_encoder_weights_are_not_copied_for_backward(dti_pack, fresh_sdxl):
    """The fp16 CLIP-G on the CPU casts its weights to fp32 per layer; a training step must not
    keep those copies (they were the largest item of a thin SDXL run's memory)."""
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sdxl
    enc = ct.text.text_encoders(clip)["clip_g"][2]
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
    numels = {p.numel() for p in enc.parameters() if p.dim() == 2 and p.numel() > 10**6}
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        sizes = []
        v = {k: (m_star[k] * init[k]).requires_grad_(True) for k in init}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel()), t)[1], lambda t: t):
            cond, pooled = ct.text.encode_token_batch(clip, [prompts[0].with_vectors({"l": v["clip_l"], "g": v["clip_g"]})])
        (cond.float().square().mean() + pooled.float().square().mean()).backward()
    assert v["clip_g"].grad is not None and v["clip_g"].grad.abs().sum() > 0
    kept = [n for n in sizes if n in numels]
    assert kept == [], f"{len(kept)} weight-sized tensors kept for backward"


def test_partially_loaded_model_trains_like_a_fully_loaded_one(dti_pack, fresh_sd15, comfy):
    """--lowvram / --novram on a GPU: ComfyUI leaves layers off the device, casts them per call and
    applies LoRA patches lazily (LowVramPatch). Emulated here by loading with a 1-byte budget; the
    training gradient must equal the fully loaded one (ComfyUI refuses those flags without a GPU,
    so the real-server tests for them run only where one is present)."""
    model, clip, _ = fresh_sd15
    sd = model.model_state_dict()
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    lora = {key: ("lora", (torch.randn(sd[key].shape[0], 4) * 0.05, torch.randn(4, sd[key].shape[1]) * 0.05,
                           None, None, None, None))}
    with torch.inference_mode():
        model = model.clone()
        model.add_patches(lora, 1.0)
        comfy.model_management.load_models_gpu([model], force_full_load=True)
    resident = dti_pack.comfy_host.memory.resident
    size = model.model_size() / 2**30
    full = f"diffusion model {size:.2f} of {size:.2f} GiB"
    assert resident(model, clip).startswith(f"weights on the device: {full}, text encoders ")
    full_loss, full_grad = _step_grad(dti_pack, (model, clip, None))
    with torch.inference_mode():
        model.unpatch_model()
        model.load(torch.device("cpu"), lowvram_model_memory=1)
    assert model.model.model_lowvram
    # what DTI Train's GPU log line reports of a --lowvram load: only part of the weights resident
    assert full not in resident(model, clip) and f" of {size:.2f} GiB" in resident(model, clip)
    lowvram = [m for m in model.model.modules() if getattr(m, "comfy_cast_weights", False)]
    assert any(m.weight_function for m in lowvram), "the LoRA patch should be applied lazily per call"
    part_loss, part_grad = _step_grad(dti_pack, (model, clip, None))
    assert part_loss == pytest.approx(full_loss, rel=1e-5)
    assert torch.allclose(part_grad, full_grad, rtol=1e-4, atol=1e-4 * float(full_grad.abs().max()))
