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


def _step_grads(ct, model, clip, init, m_star, prompts, latents, batch=2, step=0, scale=1.0):
    """Loss and vector gradients of one DiffusionStep batch (gradients divided by ``scale``)."""
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, batch, 7, 128, CPU)
        v = {k: init[k].clone().requires_grad_(True) for k in init}
        loss = ds({k: m_star[k] * v[k] for k in v}, step)
        (loss * scale).backward()
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
