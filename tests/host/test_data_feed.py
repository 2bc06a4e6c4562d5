"""What DTI Train feeds the loss, checked against independent computations (the paper's SDXL data
pipeline: antialiased resize of the shorter side, a fresh random crop and a fresh VAE posterior sample
each step, the photo's real size and crop corner as SDXL micro-conditioning)."""

import pytest
import torch


def test_bucket_resize_is_antialiased(dti_pack, comfy):
    """The live resize (each photo to cover its bucket): a one-pixel checkerboard downscaled 8x is
    averaged to grey by an antialiased filter; a plain bicubic resize samples it and keeps values far
    from 0.5 (aliasing)."""
    ct = dti_pack.nodes.comfy_training
    board = ((torch.arange(512).view(-1, 1) + torch.arange(512).view(1, -1)) % 2).float()
    item = ct.TrainingImage(board.view(512, 512, 1).expand(512, 512, 3).contiguous(), None, "board")
    bucket, out, mask = ct.bucket_resize(item, 64)
    assert bucket == (64, 64) and out.shape == (1, 64, 64, 3) and mask is None
    assert float((out - 0.5).abs().max()) < 0.02


def test_posterior_moments_equal_the_vae_encoder_s_own(dti_pack, sd15_loaded):
    ct = dti_pack.nodes.comfy_training
    model, _, vae = sd15_loaded
    px = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tl = ct.encode_latents(vae, model, px, False, original_size=(64, 64))
        # independent: the encoder and quant conv by hand, the posterior as (mean, logvar)
        fsm = vae.first_stage_model
        x = vae.process_input(px.movedim(-1, 1)).to(vae.vae_dtype)
        z = fsm.encoder(x)
        if getattr(fsm, "quant_conv", None) is not None:
            z = fsm.quant_conv(z)
        mean, logvar = z.float().chunk(2, dim=1)
        ref_mean = model.model.process_latent_in(mean)
        scale = model.model.latent_format.scale_factor
        ref_std = torch.exp(0.5 * logvar.clamp(-30, 20)) * scale
    assert tl.std is not None and tl.flipped_mean is None
    assert torch.allclose(tl.mean, ref_mean, atol=1e-4, rtol=1e-4)
    assert torch.allclose(tl.std, ref_std, atol=1e-6, rtol=1e-4)
    assert float(tl.std.min()) > 0


def test_step_samples_a_random_crop_of_the_posterior_and_conditions_on_its_corner(dti_pack, sdxl_loaded, monkeypatch):
    """Non-square latents (64 x 104 px photo at 64 px): each sample's x0 is mean + std * eps in its own
    crop, and SDXL's y carries (original h, w, crop top, left, target h, w) for that sample."""
    ct = dti_pack.nodes.comfy_training
    training = dti_pack.dti_core.training
    model, clip, _ = sdxl_loaded
    with torch.inference_mode():
        init, _, m_star = ct.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.tokenize_templates(clip, ["a photo of a {}"], 1)
    g0 = torch.Generator().manual_seed(1)
    mean, std = torch.randn(3, 4, 8, 13, generator=g0), torch.rand(3, 4, 8, 13, generator=g0) * 0.3 + 0.05
    tl = ct.TrainingLatents(mean, std, None, None, original_size=(300, 480))
    seen = []
    real = model.model.apply_model

    def spy(x, t, **kw):
        seen.append((x.detach().clone(), t.detach().clone(), kw["y"].detach().clone()))
        return real(x, t, **kw)

    monkeypatch.setattr(model.model, "apply_model", spy)
    b, seed, step = 3, 4, 2
    with torch.inference_mode(False), torch.no_grad(), ct.differentiable(model, clip):
        ds = ct.DiffusionStep(model, clip, prompts, tl, None, b, seed, 64, torch.device("cpu"))
        embeds = {k: m_star[k] * init[k] for k in init}
        ds(embeds, step)
        pooled = clip.encode_from_tokens(prompts[0].with_vectors({"l": embeds["clip_l"], "g": embeds["clip_g"]}),
                                         return_pooled=True)[1]
    (x_t, t, y), = seen

    g = training.step_generator(seed, step)
    idx = torch.randint(3, (b,), generator=g)
    torch.rand(b, generator=g)
    torch.randint(1, (b,), generator=g)
    u = torch.rand(b, generator=g, dtype=torch.float64)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    torch.rand(b, generator=g, dtype=torch.float64)  # the crop's top: no margin on the short side
    left = (torch.rand(b, generator=g, dtype=torch.float64) * (13 - 8 + 1)).floor().long()
    eps = torch.randn(b, 4, 8, 8, generator=g)
    assert len(set(left.tolist())) > 1, "pick a step whose crops differ"
    table = model.get_model_object("model_sampling").sigmas
    sigma = table[(u * len(table)).floor().long()]
    x0 = torch.stack([mean[idx[i], :, :, left[i]:left[i] + 8] + std[idx[i], :, :, left[i]:left[i] + 8] * eps[i]
                      for i in range(b)])
    assert torch.allclose(x_t, x0 + sigma.view(-1, 1, 1, 1) * noise, atol=1e-5)
    for i in range(b):
        y_ref = model.model.encode_adm(pooled_output=pooled.float(), width=480, height=300, crop_w=8 * int(left[i]),
                                       crop_h=0, target_width=64, target_height=64)
        assert torch.allclose(y[i:i + 1].float(), y_ref.float(), atol=1e-3, rtol=0), i
    assert not torch.allclose(y[0], y[1]) or int(left[0]) == int(left[1])


def test_wide_photos_train_at_their_aspect_ratio_through_the_node(dti_pack, fresh_sdxl, embeddings_dir, monkeypatch):
    from tests_host_helpers import run_train

    ct = dti_pack.nodes.comfy_training
    seen = {}

    class Spy(ct.DiffusionStep):
        def __init__(self, model, clip, prompts, latents, *args, **kwargs):
            seen["latents"] = latents
            super().__init__(model, clip, prompts, latents, *args, **kwargs)

    monkeypatch.setattr(ct, "DiffusionStep", Spy)
    run_train(dti_pack, fresh_sdxl, images=torch.rand(2, 48, 96, 3), name="wide", steps=1, batch_size=1,
              resolution=64, horizontal_flip=False)
    (tl,) = seen["latents"]  # one bucket: both photos have the same shape
    # 2:1 photo at 64 px: SDXL's 704 x 1472 bucket scaled by 64/1024 is 44 x 92 -> 48 x 96 (8 px steps),
    # aspect 0.5 exactly; the photo already covers it, so nothing is cut away and nothing resized.
    assert tl.crop == (6, 12) and [m.shape for m in tl.mean] == [(1, 4, 6, 12)] * 2
    assert [s.shape for s in tl.std] == [(1, 4, 6, 12)] * 2
    assert tl.original_size == [(48, 96), (48, 96)] and tl.flipped_mean is None and tl.mask is None
    assert (embeddings_dir / "wide.safetensors").exists()
