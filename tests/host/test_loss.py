"""The training loss is the paper's noise-prediction MSE for eps models and the v-prediction MSE
for v models, computed independently here from the same random draws."""

import pytest
import torch


@pytest.mark.parametrize("sampling", ["eps", "v_prediction"])
def test_loss_matches_the_parameterisation_target(sampling, dti_pack, fresh_sd15, comfy, comfy_nodes):
    import comfy_extras.nodes_model_advanced as adv

    ct = dti_pack.nodes.comfy_training
    training = dti_pack.dti_core.training
    model, clip, _ = fresh_sd15
    with torch.inference_mode():
        model = adv.ModelSamplingDiscrete().patch(model, sampling, False)[0]
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        init, mu, m_star = ct.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.tokenize_templates(clip, ["a photo of a {}", "a {} in the snow"], 1)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False), torch.enable_grad(), ct.differentiable(model, clip):
        step = ct.DiffusionStep(model, clip, prompts, latents, None, 2, 3, 64, torch.device("cpu"))
        embeds = {"clip_l": m_star["clip_l"] * init["clip_l"]}
        loss = step(embeds, 5)

        # Independent recomputation from the same draws, in the order DiffusionStep makes them.
        g = training.step_generator(3, 5)
        idx = torch.randint(3, (2,), generator=g)
        torch.rand(2, generator=g)  # flips (unused: no mirrored latents)
        which = torch.randint(2, (2,), generator=g)
        u = torch.rand(2, generator=g, dtype=torch.float64)
        noise = torch.randn(2, 4, 8, 8, generator=g)
        ms = model.get_model_object("model_sampling")
        sigma = ms.sigma((step.t_min + u * (step.t_max - step.t_min)).float())
        x0 = latents[idx]
        x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
        # one encode per prompt (the CLIPTextEncode path) as the reference for the batched step
        conds = [ct.encode_tokens(clip, prompts[int(w)].with_vectors({"l": embeds["clip_l"]}))[0] for w in which]
        unet = model.model.diffusion_model
        out = unet(ms.calculate_input(sigma, x_t), ms.timestep(sigma).float(), context=torch.cat(conds)).float()
        s = sigma.view(-1, 1, 1, 1)
        target = noise if sampling == "eps" else (noise - s * x0) / (s ** 2 + 1).sqrt()
        expected = ((out - target) ** 2).mean()
    assert torch.isfinite(loss)
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-7), (float(loss), float(expected))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_batched_prompt_encoding_equals_one_encode_per_prompt(kind, request, dti_pack):
    ct = dti_pack.nodes.comfy_training
    _, clip, _ = request.getfixturevalue(f"{kind}_loaded")
    with torch.inference_mode():
        init, _, m_star = ct.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.tokenize_templates(clip, ["a photo of a {}", "a (weighted:1.3) {} in the snow", "{}"], 1)
    enc = ct.text_encoders(clip)
    vectors = {tkey: (m_star[key] * init[key]).requires_grad_() for key, (tkey, _, _) in enc.items()}
    with torch.inference_mode(False), torch.no_grad():
        dicts = [p.with_vectors(vectors) for p in prompts]
        cond, pooled = ct.encode_token_batch(clip, dicts)
        ref = [ct.encode_tokens(clip, d) for d in dicts]
    assert cond.shape[0] == 3
    for k, (c, p) in enumerate(ref):
        assert torch.allclose(cond[k:k + 1].float(), c.float(), atol=1e-5, rtol=0)
        if kind == "sdxl":
            assert torch.allclose(pooled[k:k + 1].float().cpu(), p.float().cpu(), atol=1e-5, rtol=0)
    assert not torch.allclose(cond[0], cond[1])
