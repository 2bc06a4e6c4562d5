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


def _step_grads(ct, model, clip, init, m_star, prompts, latents, batch=2, step=0, scale=1.0, res=128, div=1.0):
    """Loss and vector gradients of one DiffusionStep batch: backward of ``loss / div * scale``, the
    gradients divided by ``scale``."""
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, batch, 7, res, CPU)
        v = {k: init[k].clone().requires_grad_(True) for k in init}
        loss = ds({k: m_star[k] * v[k] for k in v}, step)
        (loss / div * scale).backward()
    return ds, float(loss), {k: v[k].grad / scale for k in v}


def test_sdxl_trains_with_text_encoders_on_the_gpu(dti_pack, fresh_sdxl, monkeypatch):
    """Recipe D. The encoders return on the execution device (the GPU), ComfyUI hands its pooled row
    on the intermediate device (the CPU). Before the fix, TextPath's probe compared the batched pooled
    rows (still "on the GPU") with ComfyUI's: "Expected all tensors to be on the same device, but found
    at least two devices, cuda:0 and cpu! (emulated on the CPU, in allclose)"."""
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sdxl
    init, m_star, prompts = _setup(ct, clip)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    _, ref_loss, ref = _step_grads(ct, model, clip, init, m_star, prompts, latents)

    with gpu.text_encoders_on_device(monkeypatch):
        # the emulation bites: ComfyUI's own encode moves its outputs off the marked device, the
        # encoder's forward output stays marked
        with torch.inference_mode():
            enc = ct.text.text_encoders(clip)["clip_g"][2]
            seen = []
            h = enc.register_forward_hook(lambda m, a, out: seen.append(out[1]))
            cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
            h.remove()
        assert gpu.is_marked(seen[0]) and not gpu.is_marked(pooled) and not gpu.is_marked(cond)
        with pytest.raises(RuntimeError, match="same device"):
            _ = seen[0] + pooled

        ds, loss, grads = _step_grads(ct, model, clip, init, m_star, prompts, latents)
        assert ds._text.batched, "the batched encode should pass its probe on the GPU layout too"
        cond, pooled = ds._text([p.with_vectors({"l": init["clip_l"], "g": init["clip_g"]}) for p in prompts])
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


def test_fp16_unet_gradient_matches_fp32_with_the_loss_scale(dti_pack, comfy, sd15_checkpoint, embeddings_dir,
                                                              checkpoints, monkeypatch):
    """Recipe C: the UNet stored and computed in fp16, the node's own step at batch 1 and 64 px, its loss
    divided by 128 to stand for the paper's 512 px batch of 2 (128 times the elements; the thin UNet's
    own 512 px gradients are larger than a real one's). Unscaled (the code before the fix), 22 % of
    the gradient entries reaching the text conditioning were exactly zero and the vector gradient's
    cosine to fp32 was 0.95 (fp32: none zero). With the loss scale the step picks for that real batch
    (2^15: 128 times its own 2^8), at most 1 % are zero and the cosine is at least 0.99."""
    ct = dti_pack.comfy_host
    folders = comfy.folder_paths.get_folder_paths("embeddings")
    (m32, clip, _), _ = checkpoints.load_checkpoint(sd15_checkpoint, folders)
    init, m_star, prompts = _setup(ct, clip)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ds32, _, ref = _step_grads(ct, m32, clip, init, m_star, prompts, latents, batch=1, res=64, div=128)
    assert ds32.loss_scale == 1.0, "fp32 compute is left unscaled"
    with gpu.fp16_compute(monkeypatch) as opts:
        (m16, _, _), _ = checkpoints.load_checkpoint(sd15_checkpoint, folders, opts)
        assert ct.step.compute_dtype(m16) == torch.float16
        seen = _crossattn_grad_probe(m16)
        ds, _, plain = _step_grads(ct, m16, clip, init, m_star, prompts, latents, batch=1, res=64, div=128)
        assert ds.loss_scale == 2.0 ** 8  # 1 x 4 x 8 x 8 elements
        scale = ds.loss_scale * 128
        _, _, scaled = _step_grads(ct, m16, clip, init, m_star, prompts, latents, batch=1, res=64, div=128,
                                   scale=scale)

    def zeros(g):
        return float((g == 0).float().mean())

    def cos(g):
        return float(torch.nn.functional.cosine_similarity(g["clip_l"].flatten(), ref["clip_l"].flatten(), dim=0))

    print(f"fp16 emulation: unscaled {zeros(seen[0]):.3f} zero, cosine {cos(plain):.4f}; "
          f"scale {scale:g}: {zeros(seen[1]):.4f} zero, cosine {cos(scaled):.5f}")
    assert zeros(seen[0]) > 0.05 and cos(plain) < 0.99, "the emulation no longer shows fp16 underflow"
    assert zeros(seen[1]) <= 0.01 and cos(scaled) >= 0.99
    assert torch.isfinite(scaled["clip_l"]).all()
