"""What DTI Train feeds the loss, checked against independent computations (the paper's SDXL data
pipeline: antialiased resize of the shorter side, a fresh random crop and a fresh VAE posterior sample
each step, the photo's real size and crop corner as SDXL micro-conditioning)."""

import pytest
import torch

from tests_host_helpers import replay_draws


def test_bucket_resize_is_antialiased(dti_pack, comfy):
    """The live resize (each photo to cover its bucket): a one-pixel checkerboard downscaled 8x is
    averaged to grey by an antialiased filter; a plain bicubic resize samples it and keeps values far
    from 0.5 (aliasing)."""
    ct = dti_pack.comfy_host
    board = ((torch.arange(512).view(-1, 1) + torch.arange(512).view(1, -1)) % 2).float()
    item = ct.images.TrainingImage(board.view(512, 512, 1).expand(512, 512, 3).contiguous(), None, "board")
    bucket, out, mask = ct.images.bucket_resize(item, 64)
    assert bucket == (64, 64) and out.shape == (1, 64, 64, 3) and mask is None
    assert float((out - 0.5).abs().max()) < 0.02


def test_posterior_moments_equal_the_vae_encoder_s_own(dti_pack, sd15_loaded):
    ct = dti_pack.comfy_host
    model, _, vae = sd15_loaded
    px = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tl = ct.latents.encode_latents(vae, model, px, False, original_size=(64, 64))
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
    ct = dti_pack.comfy_host
    training = dti_pack.dti_core.training
    model, clip, _ = sdxl_loaded
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
    g0 = torch.Generator().manual_seed(1)
    mean, std = torch.randn(3, 4, 8, 13, generator=g0), torch.rand(3, 4, 8, 13, generator=g0) * 0.3 + 0.05
    tl = ct.latents.TrainingLatents(mean, std, None, None, original_size=(300, 480))
    seen = []
    real = model.model.apply_model

    def spy(x, t, **kw):
        seen.append((x.detach().clone(), t.detach().clone(), kw["y"].detach().clone()))
        return real(x, t, **kw)

    monkeypatch.setattr(model.model, "apply_model", spy)
    b, seed, step = 3, 4, 2
    with torch.inference_mode(False), torch.no_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, tl, None, b, seed, 64, torch.device("cpu"))
        embeds = {k: m_star[k] * init[k] for k in init}
        ds(embeds, step)
        pooled = clip.encode_from_tokens(prompts[0].with_vectors({"l": embeds["clip_l"], "g": embeds["clip_g"]}),
                                         return_pooled=True)[1]
    (x_t, t, y), = seen

    d = replay_draws(training.step_generator, seed, step, b, 3, 1, [(8, 13)] * 3, (8, 8))
    idx, u, noise, eps = d["idx"], d["u"], d["noise"], d["eps"]
    assert all(top == 0 for top, _ in d["corners"])  # no margin on the short side
    left = torch.tensor([lft for _, lft in d["corners"]])
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

    ct = dti_pack.comfy_host
    seen = {}

    class Spy(ct.step.DiffusionStep):
        def __init__(self, model, clip, prompts, latents, *args, **kwargs):
            seen["latents"] = latents
            super().__init__(model, clip, prompts, latents, *args, **kwargs)

    monkeypatch.setattr(ct.step, "DiffusionStep", Spy)
    run_train(dti_pack, fresh_sdxl, images=torch.rand(2, 48, 96, 3), name="wide", steps=1, batch_size=1,
              resolution=64, horizontal_flip=False)
    (tl,) = seen["latents"]  # one bucket: both photos have the same shape
    # 2:1 photo at 64 px: SDXL's 704 x 1472 bucket scaled by 64/1024 is 44 x 92 -> 48 x 96 (8 px steps),
    # aspect 0.5 exactly; the photo already covers it, so nothing is cut away and nothing resized.
    assert tl.crop == (6, 12) and [m.shape for m in tl.mean] == [(1, 4, 6, 12)] * 2
    assert [s.shape for s in tl.std] == [(1, 4, 6, 12)] * 2
    assert tl.original_size == [(48, 96), (48, 96)] and tl.flipped_mean is None and tl.mask is None
    assert (embeddings_dir / "wide.safetensors").exists()


def test_photos_are_read_as_load_image_reads_them(dti_pack, comfy_nodes, tmp_path):
    """image_folder and the CLI read a photo with the pack's read_image; ComfyUI's own LoadImage, on the
    same files, is the reference: EXIF rotation, 16-bit grey, palette transparency, RGBA, the first frame
    of an animation. LoadImage's mask is 1 - alpha; read_image returns alpha as stored."""
    import folder_paths
    import numpy as np
    from PIL import Image

    ct = dti_pack.comfy_host
    rng = np.random.RandomState(0)
    rgb = Image.fromarray((rng.rand(20, 40, 3) * 255).astype("uint8"))
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotate 90 degrees: the 40 x 20 stored image shows 20 wide, 40 high
    rgb.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    grey = (rng.rand(16, 24) * 65535).astype("uint16")
    Image.fromarray(grey.astype("int32"), mode="I").save(tmp_path / "grey32.tif")  # opens as mode "I"
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # opens as "I;16" in current Pillow
    rgba = np.concatenate([rng.rand(24, 16, 3) * 255, rng.rand(24, 16, 1) * 255], axis=-1).astype("uint8")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "cutout.png")
    pal = Image.fromarray((rng.rand(12, 12) * 4).astype("uint8"), mode="L").convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])

    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        for name, has_alpha in (("rotated.jpg", False), ("grey32.tif", False), ("grey16.png", False),
                                ("cutout.png", True),
                                ("palette.png", True), ("anim.gif", False)):
            image, alpha = ct.images.read_image(str(tmp_path / name))
            try:
                ref_image, ref_mask = comfy_nodes.LoadImage().load_image(name)
            except Exception:
                # Host difference "LoadImage decodes through PyAV" (0.33): its filter graph fails on
                # this 8 px GIF; the reader then takes Pillow's route, as 0.3.64's LoadImage does.
                assert ct.images._host_decoder() is not None and name == "anim.gif", name
                ref_image, ref_mask = pillow_load_image(tmp_path / name)
            if name == "grey32.tif" and bool((ref_image == 1).all()):
                # Host difference "LoadImage decodes through PyAV" (0.33): its Pillow fallback for a
                # 32-bit grey TIFF drops 0.3.64's 1/255 scaling and reads it all white; the reader
                # keeps the photo (checked below), not the white page.
                assert ct.images._host_decoder() is not None
            else:
                assert torch.equal(image, ref_image[0]), name
            if has_alpha:
                # (1 - (1 - a) rounds in float32: equal to one ulp)
                assert alpha is not None and torch.allclose(alpha, 1.0 - ref_mask[0], rtol=0, atol=1e-7), name
                assert 0 < float(alpha.mean()) < 1, name
            else:
                assert alpha is None, name
        assert ct.images.read_image(str(tmp_path / "rotated.jpg"))[0].shape == (40, 20, 3)
        grey32 = ct.images.read_image(str(tmp_path / "grey32.tif"))[0]
        assert 0.5 < float(grey32.max()) <= 1 and float(grey32.min()) < 0.1  # scaled by 1/255, not clipped to white
        (tmp_path / "broken.png").write_bytes(b"not a png")
        with pytest.raises(ValueError, match="cannot read image .*broken.png"):
            ct.images.read_image(str(tmp_path / "broken.png"))
    finally:
        folder_paths.set_input_directory(old)


def pillow_load_image(path):
    """0.3.64's LoadImage on one file, in the layout LoadImage returns (image batch, mask batch)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "I":
            im = im.point(lambda i: i * (1 / 255))
        rgb = torch.from_numpy(np.array(im.convert("RGB")).astype(np.float32) / 255.0)[None]
        if "A" in im.getbands():
            mask = 1.0 - torch.from_numpy(np.array(im.getchannel("A")).astype(np.float32) / 255.0)
        else:
            mask = torch.zeros((64, 64))
    return rgb, mask[None]
