"""The device and precision dimension, on the CPU: what only a GPU runs, emulated (``gpu_emulation.py``;
``docs/testing.md`` says what each emulation covers and what only a GPU shows). Each test here failed
on the code before its fix, with the error or number in its docstring."""

import logging

import pytest
import torch

import tests_host_gpu_emulation as gpu

CPU = torch.device("cpu")


def _setup(ct, clip, templates=("a photo of a {}", "a {} in the snow")):
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, list(templates), 1)
    return init, m_star, prompts


def _step_grads(ct, model, clip, init, m_star, prompts, latents, batch=2, step=0, scale=1.0, res=128, div=1.0, **kw):
    """Loss and vector gradients of one DiffusionStep batch: backward of ``loss / div * scale``, the
    gradients divided by ``scale``."""
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, batch, 7, res, CPU, **kw)
        v = {k: init[k].clone().requires_grad_(True) for k in init}
        loss = ds({k: m_star[k] * v[k] for k in v}, step)
        (loss / div * scale).backward()
    return ds, float(loss), {k: v[k].grad / scale for k in v}


@pytest.mark.parametrize("kind", ["sdxl", "flux_dev"])
def test_pooled_models_train_with_text_encoders_on_the_gpu(kind, dti_pack, request, monkeypatch):
    """Recipe D, on the two families whose conditioning reads the pooled text (SDXL's ``y``, Flux's
    vector). The encoders return on the execution device (the GPU), ComfyUI hands its pooled row on the
    intermediate device (the CPU). Before the fix, TextPath's probe compared the batched pooled rows
    (still "on the GPU") with ComfyUI's: "Expected all tensors to be on the same device, but found at
    least two devices, cuda:0 and cpu! (emulated on the CPU, in allclose)"."""
    ct = dti_pack.comfy_host
    model, clip, _ = request.getfixturevalue(f"fresh_{kind}")
    init, m_star, prompts = _setup(ct, clip)
    channels, kw = (4, {}) if kind == "sdxl" else (16, {"guidance": 3.5})
    latents = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    _, ref_loss, ref = _step_grads(ct, model, clip, init, m_star, prompts, latents, res=64, **kw)
    pooled_key = "clip_g" if kind == "sdxl" else "clip_l"

    with gpu.text_encoders_on_device(monkeypatch):
        # the emulation bites: ComfyUI's own encode moves its outputs off the marked device, the
        # encoder's forward output stays marked
        with torch.inference_mode():
            enc = ct.text.text_encoders(clip)[pooled_key][2]
            seen = []
            h = enc.register_forward_hook(lambda m, a, out: seen.append(out[1]))
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
            h.remove()
        assert gpu.is_marked(seen[0]) and not gpu.is_marked(pooled) and not gpu.is_marked(cond)
        with pytest.raises(RuntimeError, match="same device"):
            _ = seen[0] + pooled

        ds, loss, grads = _step_grads(ct, model, clip, init, m_star, prompts, latents, res=64, **kw)
        if kind == "sdxl":
            assert ds._text.batched, "the batched encode should pass its probe on the GPU layout too"
            token_keys = {key: tkey for key, (tkey, _, _) in ds.encoders.items()}
            cond, pooled = ds._text([p.with_vectors({token_keys[k]: init[k] for k in init}) for p in prompts])
            assert not gpu.is_marked(pooled), "pooled rows must follow ComfyUI's intermediate device"
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for k in ref:
        assert torch.isfinite(grads[k]).all() and grads[k].abs().sum() > 0
        assert torch.allclose(grads[k], ref[k], rtol=1e-5, atol=1e-6 * float(ref[k].abs().max())), k


def _crossattn_grad_probe(model):
    """Record the gradient reaching the UNet's text conditioning (``c_crossattn``) in each call."""
    grads = []
    apply = model.model.apply_model

    def probe(*args, **kwargs):
        c = kwargs.get("c_crossattn")
        if torch.is_tensor(c) and c.requires_grad:
            c.register_hook(lambda g: grads.append(g.detach().clone()))
        return apply(*args, **kwargs)

    model.model.apply_model = probe
    return grads


# the real batch each family's loss at 64 px stands for: SD1.5 512 px x 2, SDXL 1024 px x 1
FP16_REAL = {"sd15": 128, "sdxl": 256}


@pytest.mark.parametrize("kind", sorted(FP16_REAL))
def test_fp16_unet_gradient_matches_fp32_with_the_loss_scale(kind, request, dti_pack, comfy, embeddings_dir,
                                                              checkpoints, monkeypatch):
    """Recipe C: the UNet stored and computed in fp16, the node's own step at batch 1 and 64 px, its loss
    divided to stand for a real batch (SD1.5: 512 px x 2, 128 times the elements; SDXL: 1024 px x 1,
    256 times; the thin UNets' own full-size gradients are larger than a real one's). Unscaled (the
    code before the fix), SD1.5: 22 % of the gradient entries reaching the text conditioning were
    exactly zero and the vector gradient's cosine to fp32 was 0.95 (fp32: none zero). With the loss
    scale the step picks for that real batch, at most 1 % are zero and the cosine is at least 0.99
    for every encoder."""
    ct = dti_pack.comfy_host
    folders = comfy.folder_paths.get_folder_paths("embeddings")
    path, div = request.getfixturevalue(f"{kind}_checkpoint"), FP16_REAL[kind]
    (m32, clip, _), _ = checkpoints.load_checkpoint(path, folders)
    init, m_star, prompts = _setup(ct, clip)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ds32, _, ref = _step_grads(ct, m32, clip, init, m_star, prompts, latents, batch=1, res=64, div=div)
    assert ds32.loss_scale == 1.0, "fp32 compute is left unscaled"
    del m32
    with gpu.fp16_compute(monkeypatch) as opts:
        (m16, _, _), _ = checkpoints.load_checkpoint(path, folders, opts)
        assert ct.step.compute_dtype(m16) == torch.float16
        seen = _crossattn_grad_probe(m16)
        ds, _, plain = _step_grads(ct, m16, clip, init, m_star, prompts, latents, batch=1, res=64, div=div)
        assert ds.loss_scale == 2.0 ** 8  # 1 x 4 x 8 x 8 elements
        scale = ds.loss_scale * div  # what the step picks for the real batch
        _, _, scaled = _step_grads(ct, m16, clip, init, m_star, prompts, latents, batch=1, res=64, div=div,
                                   scale=scale)

    def zeros(g):
        return float((g == 0).float().mean())

    def cos(g):
        return min(float(torch.nn.functional.cosine_similarity(g[k].flatten(), ref[k].flatten(), dim=0)) for k in ref)

    print(f"fp16 emulation ({kind}): unscaled {zeros(seen[0]):.3f} zero, cosine {cos(plain):.4f}; "
          f"scale {scale:g}: {zeros(seen[1]):.4f} zero, cosine {cos(scaled):.5f}")
    if kind == "sd15":
        assert zeros(seen[0]) > 0.05 and cos(plain) < 0.99, "the emulation no longer shows fp16 underflow"
    assert zeros(seen[1]) <= 0.01 and cos(scaled) >= 0.99
    assert all(torch.isfinite(g).all() for g in scaled.values())


def _dynamic_host(comfy):
    import comfy.model_patcher as mp

    if not hasattr(mp.ModelPatcher, "is_dynamic"):
        pytest.skip(f"ComfyUI {comfy.path} has no dynamic VRAM (0.33 added it): nothing to emulate")
    return mp


def _as_dynamic_with_delegate(mp, patcher):
    """Also give the instance ComfyUI's cached delegate (``ModelPatcherDynamic.get_non_dynamic_delegate``)."""
    patcher.non_dynamic_delegate_model = None
    patcher.get_non_dynamic_delegate = mp.ModelPatcherDynamic.get_non_dynamic_delegate.__get__(patcher)


def test_dynamic_models_from_core_loaders_train_as_classic_ones_reloaded_once(dti_pack, comfy, sd15_checkpoint,
                                                                             embeddings_dir, checkpoints):
    """Recipe B: a MODEL and CLIP from the core checkpoint loader, reporting dynamic VRAM, a LoRA on the
    MODEL. The run gets classic patchers with the LoRA and its attention override, the CLIP's encoder
    is its patcher's model, and a second run takes ComfyUI's cached delegate: the checkpoint is read
    once, not at every run (before: ``clone(disable_dynamic=True)`` re-read it every time)."""
    mp = _dynamic_host(comfy)
    ct = dti_pack.comfy_host
    (model, clip, _), _ = checkpoints.load_checkpoint(sd15_checkpoint, comfy.folder_paths.get_folder_paths("embeddings"))
    sd = model.model_state_dict()
    key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
    with torch.inference_mode():
        model = model.clone()
        model.add_patches({key: ("lora", (torch.randn(sd[key].shape[0], 2), torch.randn(2, sd[key].shape[1]),
                                          None, None, None, None))}, 1.0)
        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = "marker"
    reads = []
    for p in (model, clip.patcher):
        init = p.cached_patcher_init
        p.cached_patcher_init = (lambda *a, _f=init[0], **k: (reads.append(1), _f(*a, **k))[1],) + tuple(init[1:])
        _as_dynamic_with_delegate(mp, p)
    with gpu.dynamic(model, clip.patcher), torch.inference_mode():
        assert ct.memory.any_dynamic(model, clip)
        got_model, got_clip = ct.memory.trainable(model, clip)
        assert len(reads) == 2
        again_model, again_clip = ct.memory.trainable(model, clip)
        assert len(reads) == 2, "the second run re-read the checkpoint"
    for m, c in ((got_model, got_clip), (again_model, again_clip)):
        assert not ct.memory.any_dynamic(m, c)
        assert type(m) is mp.ModelPatcher and type(c.patcher) is mp.ModelPatcher
        assert key in m.patches
        assert m.model_options["transformer_options"]["optimized_attention_override"] == "marker"
        assert c.cond_stage_model is c.patcher.model
        assert c.cond_stage_model is not clip.cond_stage_model


def test_a_dynamic_model_from_a_loader_without_a_reload_factory_is_one_clear_error(dti_pack, comfy, sd15_checkpoint,
                                                                                  embeddings_dir, tmp_path):
    """Recipe B through ``load_state_dict_guess_config`` (what a custom loader node calls): no
    ``cached_patcher_init``. Before the fix, DTI Train raised ComfyUI's raw "Cannot create non-dynamic
    delegate: cached_patcher_init is not initialized."; now one error names the way out, before
    anything is trained or written."""
    _dynamic_host(comfy)
    ct = dti_pack.comfy_host
    with torch.inference_mode():
        sd = comfy.utils.load_torch_file(str(sd15_checkpoint))
        model, clip, vae = comfy.sd.load_state_dict_guess_config(
            sd, embedding_directory=comfy.folder_paths.get_folder_paths("embeddings"))[:3]
    assert model.cached_patcher_init is None
    before = sorted(p.name for p in embeddings_dir.iterdir())
    with gpu.dynamic(model, clip.patcher):
        with pytest.raises(ct.contracts.UnsupportedModelError,
                           match=r"(?s)MODEL is a dynamic-VRAM model.*CheckpointLoaderSimple.*--disable-dynamic-vram"):
            import tests_host_helpers as helpers
            helpers.run_train(dti_pack, (model, clip, vae), name="dyn_refused", steps=1)
    assert sorted(p.name for p in embeddings_dir.iterdir()) == before


def test_partial_load_with_pinned_offloaded_weights_trains_like_a_full_load(dti_pack, fresh_sd15, comfy, monkeypatch,
                                                                            caplog):
    """--lowvram / --novram on 0.33: the offloaded layers' CPU weights are pinned, and their casts live
    in cast buffers that the next layer reuses (offload streams). Before the fix, the UNet's and
    CLIP's norm layers (ComfyUI's forward) kept their cast weights for backward: with the buffer
    reuse emulated, the vector gradient came out NaN. And the run swapped the pinned weights for
    unpinned copies: ComfyUI then warned "Tried to unpin tensor not pinned by ComfyUI" for each."""
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sd15
    init, m_star, prompts = _setup(ct, clip)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    _, full_loss, full = _step_grads(ct, model, clip, init, m_star, prompts, latents)
    with gpu.pinning(monkeypatch, caplog) as pin_warnings:
        with torch.inference_mode():
            model.unpatch_model()
            model.load(CPU, lowvram_model_memory=1)
            clip.patcher.unpatch_model()
            clip.patcher.load(CPU, lowvram_model_memory=1)
        assert model.model.model_lowvram
        pinned = {p: set(p.pinned) for p in (model, clip.patcher)}
        assert pinned[model], "the partial load pinned nothing: the emulation does not bite"
        with gpu.offload_buffer_reuse(monkeypatch) as poisoned:
            _, loss, grads = _step_grads(ct, model, clip, init, m_star, prompts, latents)
        assert poisoned[0] > 0
        for p, keys in pinned.items():
            assert set(p.pinned) == keys
        with torch.inference_mode():
            for p in pinned:
                p.unpin_all_weights()
        assert pin_warnings() == []
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for k in full:
        assert torch.isfinite(grads[k]).all(), f"{k}: a cast weight kept for backward was overwritten"
        assert torch.allclose(grads[k], full[k], rtol=1e-4, atol=1e-4 * float(full[k].abs().max())), k


def test_fp16_unet_with_cublas_ops_trains_through_a_differentiable_linear(dti_pack, comfy, sd15_checkpoint,
                                                                          embeddings_dir, checkpoints, monkeypatch):
    """``--fast cublas_ops`` with fp16 weights computed in fp16: ComfyUI's cublas Linear runs a matmul
    without a backward, ungated (docs/host-kernels.md). Before the fix the step's backward raised
    "Trying to backward through dti_test.half_matmul.default but no autograd formula was registered";
    now training takes the plain cast linear, with the same gradient as fp16 without cublas ops, and
    sampling keeps the kernel."""
    ct = dti_pack.comfy_host
    folders = comfy.folder_paths.get_folder_paths("embeddings")
    with gpu.fp16_compute(monkeypatch) as opts:
        (plain, clip, _), _ = checkpoints.load_checkpoint(sd15_checkpoint, folders, opts)
        (fast, _, _), _ = checkpoints.load_checkpoint(
            sd15_checkpoint, folders, dict(opts, custom_operations=gpu.cublas_operations()))
        layers = [m for m in fast.model.modules() if isinstance(m, gpu.CublasLinear)]
        assert layers
        init, m_star, prompts = _setup(ct, clip)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        _, ref_loss, ref = _step_grads(ct, plain, clip, init, m_star, prompts, latents, batch=1, res=64, scale=2.0**15)
        class Calls(torch.overrides.TorchFunctionMode):
            seen = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                if "half_matmul" in str(func) and (not torch.is_grad_enabled() or args[0].requires_grad):
                    self.seen.append(func)  # (under grad: with an input that needs its backward)
                return func(*args, **(kwargs or {}))

        with Calls():
            _, loss, grads = _step_grads(ct, fast, clip, init, m_star, prompts, latents, batch=1, res=64, scale=2.0**15)
        assert not Calls.seen, "the kernel without a backward ran under grad"
        with Calls(), torch.inference_mode():
            fast.model.apply_model(torch.randn(1, 4, 8, 8, dtype=torch.float16), torch.tensor([1.0]),
                                   c_crossattn=torch.randn(1, 77, 768, dtype=torch.float16))
        assert Calls.seen, "sampling should keep the host's kernel"
    assert loss == pytest.approx(ref_loss, rel=1e-3)
    k = "clip_l"
    assert torch.isfinite(grads[k]).all()
    assert float(torch.nn.functional.cosine_similarity(grads[k].flatten(), ref[k].flatten(), dim=0)) >= 0.999


def test_sd3_context_processor_with_attention_without_a_backward_is_refused(dti_pack, fresh_sd15, comfy, monkeypatch):
    """An SD3 checkpoint with a context processor runs its attention with the launch-chosen backend and no
    override; with sage / flash / comfy-kitchen attention the run is refused with the way out."""
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sd15
    net = model.model.diffusion_model
    monkeypatch.setattr(net, "context_processor", torch.nn.Identity(), raising=False)
    monkeypatch.setattr(mmdit, "optimized_attention", attention.attention_pytorch)
    with torch.inference_mode(False), ct.autograd.differentiable(model, clip):
        pass  # differentiable attention there: trains
    monkeypatch.setattr(mmdit, "optimized_attention", getattr(attention, "attention_sage"))
    with pytest.raises(ct.contracts.UnsupportedModelError, match=r"context processor.*attention_sage.*--use-pytorch-cross-attention"):
        with torch.inference_mode(False), ct.autograd.differentiable(model, clip):
            pass
