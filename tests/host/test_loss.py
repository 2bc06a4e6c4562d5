"""DiffusionStep's loss and the inputs it hands the denoiser, recomputed independently.

The reference rebuilds every input of ``apply_model`` from the documented draw order of
``step_generator`` and from the host alone: sigma as the entry of the model's own
``model_sampling.sigmas`` table at an integer timestep drawn over its whole range (the paper's
integer DDPM timesteps; not from the object under test), the
mirrored latents where a flip was drawn, one CLIPTextEncode-style encode per prompt, and SDXL's
vector conditioning from the pooled output of that encode.
"""

import math

import pytest
import torch

from tests_host_helpers import replay_draws, rounding_tolerance, text_compute_dtypes

RES = 64


def sigma_from_table(ms, u):
    """The paper's integer DDPM timesteps: index floor(u * N) of the model's own sigma table."""
    table = ms.sigmas.double()
    return table[(u.double() * len(table)).floor().long().clamp(max=len(table) - 1)]


def draws(training, seed, step, n, prompts, b, shape):
    d = replay_draws(training.step_generator, seed, step, b, n, prompts, [shape[1:]] * n, shape[1:],
                     channels=shape[0], eps=False)
    return d["idx"], d["flip"], d["which"], d["u"], d["noise"]


@pytest.mark.parametrize("kind, sampling", [("sd15", "eps"), ("sd15", "v_prediction"), ("sdxl", "eps")])
def test_step_inputs_and_loss_match_an_independent_reference(kind, sampling, request, dti_pack, comfy, comfy_nodes,
                                                             monkeypatch):
    import comfy_extras.nodes_model_advanced as adv

    ct = dti_pack.comfy_host
    training = dti_pack.dti_core.training
    model, clip, _ = request.getfixturevalue(f"fresh_{kind}")
    enc = ct.text.text_encoders(clip)
    tol = rounding_tolerance(text_compute_dtypes(clip, [e for _, _, e in enc.values()]), 20.0)
    b, seed = (3, 3) if kind == "sd15" else (2, 5)
    with torch.inference_mode():
        if sampling != "eps":
            model = adv.ModelSamplingDiscrete().patch(model, sampling, False)[0]
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        init, mu, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        templates = ["a photo of a {}", "a {} in the snow"]
        prompts = ct.text.tokenize_templates(clip, templates, 1)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=gen)
    flipped = torch.randn(3, 4, 8, 8, generator=gen)  # stands in for the mirror images: anything different
    # A step whose draws mix flipped and unflipped samples and both prompts.
    step = next(s for s in range(100) if len(set(draws(training, seed, s, 3, 2, b, (4, 8, 8))[1].tolist())) == 2
                and len(set(draws(training, seed, s, 3, 2, b, (4, 8, 8))[2].tolist())) == 2)
    idx, flip, which, u, noise = draws(training, seed, step, 3, 2, b, (4, 8, 8))

    calls = []
    real_apply = model.model.apply_model

    def spy(x, t, *args, **kwargs):
        out = real_apply(x, t, *args, **kwargs)
        calls.append((x.detach().clone(), t.detach().clone(), kwargs.get("c_crossattn").detach().clone(),
                      kwargs["y"].detach().clone() if kwargs.get("y") is not None else None, out.detach().float()))
        return out

    monkeypatch.setattr(model.model, "apply_model", spy)
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, flipped, b, seed, RES, torch.device("cpu"))
        embeds = {k: (m_star[k] * init[k]).requires_grad_() for k in init}
        loss = ds(embeds, step)
        loss.backward()
        with torch.no_grad():
            refs = [clip.encode_from_tokens(prompts[int(w)].with_vectors(
                {tkey: embeds[key].detach() for key, (tkey, _, _) in enc.items()}), return_pooled=True) for w in which]
    assert len(calls) == 1
    x_t, sigma, cond, y, x0_pred = calls[0]

    ms = model.get_model_object("model_sampling")
    sigma_ref = sigma_from_table(ms, u)
    assert torch.allclose(sigma.double(), sigma_ref, rtol=1e-5, atol=0), (sigma, sigma_ref)
    x0 = torch.where(flip.view(-1, 1, 1, 1), flipped[idx], latents[idx])
    assert not torch.allclose(x0, latents[idx])  # the flip matters in this draw
    s = sigma_ref.float().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, x0 + s * noise, atol=1e-5, rtol=1e-6)
    cond_ref = torch.cat([c for c, _ in refs]).float()
    assert torch.allclose(cond.float(), cond_ref, atol=tol, rtol=0)
    if kind == "sdxl":
        pooled_ref = torch.cat([p for _, p in refs]).float()
        assert pooled_ref.abs().max() > 0.1
        y_ref = model.model.encode_adm(pooled_output=pooled_ref, width=RES, height=RES, crop_w=0, crop_h=0,
                                       target_width=RES, target_height=RES)
        assert y is not None and torch.allclose(y.float(), y_ref.float(), atol=tol, rtol=0)
    else:
        assert y is None

    # The loss in the model's own output space, from the denoised output apply_model returned.
    if sampling == "eps":
        pred, target = (x_t - x0_pred) / s, noise
    else:  # v: denoised = x_t / (s^2 + 1) - v * s / sqrt(s^2 + 1)
        pred = (x_t / (s ** 2 + 1) - x0_pred) * (s ** 2 + 1).sqrt() / s
        target = (noise - s * x0) / (s ** 2 + 1).sqrt()
    expected = ((pred - target) ** 2).mean()
    assert torch.isfinite(loss)
    assert math.isclose(float(loss.detach()), float(expected), rel_tol=1e-4), (float(loss.detach()), float(expected))
    # the gradient reaches every encoder's vector
    for k, e in embeds.items():
        assert e.grad is not None and float(e.grad.abs().max()) > 0, f"no gradient reached {k}"


def test_timesteps_cover_the_whole_sigma_table(dti_pack, fresh_sd15, monkeypatch):
    """Over many draws the sigmas span the table from sigma_min to sigma_max."""
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sd15
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["{}"], 1)
    seen = []
    # Only the sigmas matter here: skip the text encoder and the UNet.
    monkeypatch.setattr(ct.text, "encode_token_batch", lambda clip, dicts, want_pooled=True: (torch.zeros(len(dicts), 77, 768), None))
    # (and the per-prompt encode the batch is checked against, or the 512 prompts go one by one)
    monkeypatch.setattr(ct.text, "encode_each", lambda clip, dicts, want_pooled=True: ([torch.zeros(1, 77, 768)] * len(dicts), None))
    monkeypatch.setattr(model.model, "apply_model",
                        lambda x, t, *a, **k: (seen.append(t.detach().clone()), torch.zeros_like(x))[1])
    with torch.inference_mode(False), torch.no_grad():
        ds = ct.step.DiffusionStep(model, clip, prompts, torch.randn(1, 4, 8, 8), None, 512, 0, RES, torch.device("cpu"))
        ds({"clip_l": m_star["clip_l"] * init["clip_l"]}, 0)
    sigmas = torch.cat(seen).double()
    table = model.get_model_object("model_sampling").sigmas.double()
    assert sigmas.min() >= table[0] * (1 - 1e-6) and sigmas.max() <= table[-1] * (1 + 1e-6)
    # integer timesteps: every noise level is a table entry, and the UNet's timestep is that entry's index
    dist = (sigmas.view(-1, 1).float() - table.view(1, -1).float()).abs().min(dim=1).values
    assert float(dist.max()) == 0.0
    # 512 uniform draws over 1000 steps: both ends of the table are reached within 2 %
    # (a miss has probability 2 * 0.98^512, about 6e-5, and the draws are seeded).
    assert sigmas.min() < sigma_from_table_at(table, 0.02) and sigmas.max() > sigma_from_table_at(table, 0.98)


def sigma_from_table_at(table, frac):
    return table[int(frac * (len(table) - 1))]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_batched_prompt_encoding_equals_one_encode_per_prompt(kind, request, dti_pack):
    ct = dti_pack.comfy_host
    _, clip, _ = request.getfixturevalue(f"{kind}_loaded")
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}", "a (weighted:1.3) {} in the snow", "{}"], 1)
    enc = ct.text.text_encoders(clip)
    vectors = {tkey: (m_star[key] * init[key]).requires_grad_() for key, (tkey, _, _) in enc.items()}
    with torch.inference_mode(False), torch.no_grad():
        dicts = [p.with_vectors(vectors) for p in prompts]
        cond, pooled = ct.text.encode_token_batch(clip, dicts)
        ref = [ct.text.encode_tokens(clip, d) for d in dicts]
    # Batching changes the shapes the kernels see, so the sums round differently: allow a few dozen
    # roundings of the dtype the encoders actually compute in (read from their outputs; ComfyUI keeps
    # fp16 weights here but runs the layers in fp32) at the size of the values. A wrong prompt order
    # or a lost weight changes values by far more.
    dtypes = text_compute_dtypes(clip, [e for _, _, e in enc.values()])
    assert cond.shape[0] == 3
    for k, (c, p) in enumerate(ref):
        tol = rounding_tolerance(dtypes, c.abs().max())
        assert torch.allclose(cond[k:k + 1].float(), c.float(), atol=tol, rtol=0), (float((cond[k:k + 1] - c).abs().max()), tol)
        if kind == "sdxl":
            tol = rounding_tolerance(dtypes, p.abs().max())
            assert torch.allclose(pooled[k:k + 1].float().cpu(), p.float().cpu(), atol=tol, rtol=0)
    assert not torch.allclose(cond[0], cond[1])
    assert not torch.allclose(cond[1], cond[2])
