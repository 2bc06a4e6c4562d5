"""Photos as users have them: aspect-ratio buckets, a subject mask on the loss, per-image captions.
Each checked against an independent computation (the SDXL report's bucket table, SDXL's own
encode_adm, a hand-weighted MSE, the step's own random draws replayed)."""

import math

import pytest
import torch

from tests_host_helpers import replay_draws as draws

# SDXL report, appendix I: the (height, width) buckets at 1024 px, typed out again here.
SDXL_TABLE = """512 2048, 512 1984, 512 1920, 512 1856, 576 1792, 576 1728, 576 1664, 640 1600, 640 1536,
704 1472, 704 1408, 704 1344, 768 1344, 768 1280, 832 1216, 832 1152, 896 1152, 896 1088, 960 1088,
960 1024, 1024 1024"""


def sdxl_table():
    landscape = [tuple(int(x) for x in pair.split()) for pair in SDXL_TABLE.replace("\n", " ").split(",")]
    return sorted(set(landscape) | {(w, h) for h, w in landscape})


@pytest.fixture
def generator(dti_pack):
    return dti_pack.dti_core.training.step_generator


def test_buckets_are_sdxl_s_table_scaled_to_the_training_area(dti_pack):
    ct = dti_pack.comfy_host
    assert dti_pack.dti_core.buckets.buckets_for(1024) == sdxl_table()
    for res in (512, 768):
        got = dti_pack.dti_core.buckets.buckets_for(res)
        assert all(h % 64 == 0 and w % 64 == 0 for h, w in got)
        # every scaled entry, rounded to 64 px, is there; the areas stay near res^2
        s = res / 1024
        assert got == sorted({(round(h * s / 64) * 64, round(w * s / 64) * 64) for h, w in sdxl_table()})
        assert all(0.8 < h * w / res ** 2 < 1.2 for h, w in got)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in dti_pack.dti_core.buckets.buckets_for(64))
    # a 3:4 photo: 896/1152 = 0.778 vs 832/1152 = 0.722 around 0.75: |ln .778/.75| = .036 < .038
    assert dti_pack.dti_core.buckets.choose_bucket(3000, 4000, 1024) == (896, 1152)
    assert dti_pack.dti_core.buckets.choose_bucket(4000, 3000, 1024) == (1152, 896)
    assert dti_pack.dti_core.buckets.choose_bucket(500, 500, 1024) == (1024, 1024)
    assert dti_pack.dti_core.buckets.choose_bucket(100, 1000, 1024) == (512, 2048)  # beyond the table: its widest entry
    for h, w in [(37, 91), (300, 299), (1000, 1500), (91, 37)]:
        best = min(abs(math.log(bh / bw) - math.log(h / w)) for bh, bw in sdxl_table())
        bh, bw = dti_pack.dti_core.buckets.choose_bucket(h, w, 1024)
        assert abs(abs(math.log(bh / bw) - math.log(h / w)) - best) < 1e-9


def test_each_photo_is_resized_to_cover_its_bucket(dti_pack):
    ct = dti_pack.comfy_host
    item = ct.images.TrainingImage(torch.rand(30, 40, 3), None, "t")
    bucket, px, mask = ct.images.bucket_resize(item, 1024)
    # (896, 1152): scale max(896/30, 1152/40) = 29.87 -> 896 x 1194.7, 8 px steps -> 896 x 1192
    assert bucket == (896, 1152) and px.shape == (1, 896, 1192, 3) and mask is None
    item = ct.images.TrainingImage(torch.rand(40, 200, 3), torch.ones(40, 200), "t")
    bucket, px, mask = ct.images.bucket_resize(item, 64)
    # 1:5 at 64 px: SDXL's 512 x 2048 / 16 = 32 x 128 is the widest; scale 0.8 -> 32 x 160
    assert bucket == (32, 128) and px.shape == (1, 32, 160, 3) and mask.shape == (32, 160)


def test_masks_loaded_from_comfy_s_convention_and_checked(dti_pack):
    ct = dti_pack.comfy_host
    imgs = torch.rand(2, 16, 24, 3)
    subject = torch.zeros(1, 8, 12)
    subject[:, :, :6] = 1.0  # resized to the images' 16 x 24
    items = ct.images.load_training_images(imgs, subject)
    assert [tuple(it.mask.shape) for it in items] == [(16, 24)] * 2
    assert float(items[0].mask[:, :11].min()) == 1.0 and float(items[0].mask[:, 13:].max()) == 0.0
    # LoadImage on a photo without alpha gives a 64 x 64 MASK of zeros: no subject, a clear error
    with pytest.raises(ValueError, match="InvertMask"):
        ct.images.load_training_images(imgs, torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="one mask for all images or one per image"):
        ct.images.load_training_images(imgs, torch.ones(3, 16, 24))


def test_folder_images_keep_their_sizes_and_alpha_is_the_subject(dti_pack, comfy, tmp_path, monkeypatch):
    import folder_paths
    from PIL import Image

    ct = dti_pack.comfy_host
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "dog").mkdir()
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 10, 20))  # opaque left third: the subject
    rgba.save(tmp_path / "dog" / "b.png")
    Image.new("RGB", (16, 48), (0, 0, 255)).save(tmp_path / "dog" / "a.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    items = ct.images.load_training_images(torch.rand(1, 8, 8, 3), None, "dog")
    assert [tuple(it.pixels.shape) for it in items] == [(8, 8, 3), (48, 16, 3), (20, 30, 3)]
    assert items[1].mask is None and items[2].mask.shape == (20, 30)
    assert float(items[2].mask[:, :10].min()) == 1.0 and float(items[2].mask[:, 10:].max()) == 0.0
    assert torch.allclose(items[2].pixels[0, 0], torch.tensor([0.0, 1.0, 0.0]))
    for bad in ("../", "/etc", "dog/../../x", "nothere"):
        with pytest.raises(ValueError, match="image_folder"):
            ct.images.load_training_images(None, None, bad)


def test_captions_are_validated(dti_pack):
    parse = dti_pack.dti_core.templates.parse_captions
    assert parse("a photo of {}\n\n  {} on a beach \n", 2) == ["a photo of {}", "{} on a beach"]
    with pytest.raises(ValueError, match="1 line.*for 2 image"):
        parse("a photo of {}", 2)
    with pytest.raises(ValueError, match="caption 2"):
        parse("a photo of {}\na photo", 2)
    with pytest.raises(ValueError, match="caption 1"):
        parse("{} and {}\na photo of {}", 2)


def test_latent_mask_is_the_subject_share_of_each_cell(dti_pack, sd15_loaded):
    ct = dti_pack.comfy_host
    model, _, vae = sd15_loaded
    mask = torch.zeros(64, 64)
    mask[:, :20] = 1.0  # 20 px = 2.5 latent cells
    items = [ct.images.TrainingImage(torch.rand(64, 64, 3), mask, "a"), ct.images.TrainingImage(torch.rand(64, 64, 3), None, "b")]
    with torch.inference_mode():
        (tl,) = ct.latents.encode_buckets(vae, model, items, 64, True)
    ref = torch.zeros(1, 1, 8, 8)
    ref[..., :2], ref[..., 2] = 1.0, 0.5
    assert tl.crop == (8, 8) and tl.index == [0, 1] and tl.original_size == [(64, 64), (64, 64)]
    assert torch.allclose(tl.mask[0], ref, atol=1e-6)
    assert torch.equal(tl.mask[1], torch.ones(1, 1, 8, 8))  # an image without a mask counts whole
    assert tl.flipped_mean is not None and len(tl.flipped_mean) == 2


def test_masked_loss_equals_the_hand_weighted_mse(dti_pack, fresh_sd15, generator, monkeypatch):
    ct = dti_pack.comfy_host
    model, clip, _ = fresh_sd15
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
    g0 = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 4, 8, 8, generator=g0)
    mask = (torch.rand(2, 1, 8, 8, generator=g0) > 0.6).float() * torch.rand(2, 1, 8, 8, generator=g0)
    seen = []
    real = model.model.apply_model

    def spy(x, t, **kw):
        out = real(x, t, **kw)
        seen.append((x.detach().clone(), t.detach().clone(), out.detach().float().clone()))
        return out

    monkeypatch.setattr(model.model, "apply_model", spy)
    b, seed, step = 3, 5, 1
    with torch.inference_mode(False), torch.no_grad(), ct.autograd.differentiable(model, clip):
        embeds = {k: m_star[k] * init[k] for k in init}
        masked = ct.latents.TrainingLatents(mean, None, mask=mask)
        loss = ct.step.DiffusionStep(model, clip, prompts, masked, None, b, seed, 64, torch.device("cpu"))(embeds, step)
        plain = ct.step.DiffusionStep(model, clip, prompts, ct.latents.TrainingLatents(mean, None), None, b, seed, 64,
                                 torch.device("cpu"))(embeds, step)
        ones = ct.step.DiffusionStep(model, clip, prompts, ct.latents.TrainingLatents(mean, None, mask=torch.ones_like(mask)),
                                None, b, seed, 64, torch.device("cpu"))(embeds, step)
        # with mirror images: a draw that mixes flipped and unflipped samples
        fmean = torch.randn(2, 4, 8, 8, generator=g0)
        fstep = next(s for s in range(100) if len(set(draws(generator, seed, s, b, 2, 1, [(8, 8)] * 2, (8, 8),
                                                            eps=False)["flip"].tolist())) == 2)
        mirrored = ct.step.DiffusionStep(model, clip, prompts, ct.latents.TrainingLatents(mean, None, fmean, None, mask=mask),
                                    None, b, seed, 64, torch.device("cpu"))(embeds, fstep)
    d = draws(generator, seed, step, b, 2, 1, [(8, 8)] * 2, (8, 8), eps=False)
    x_t, sigma, x0_pred = seen[0]
    x0 = mean[d["idx"]]
    assert torch.allclose(x_t, x0 + sigma.view(-1, 1, 1, 1) * d["noise"], atol=1e-5)
    eps_pred = (x_t - x0_pred) / sigma.view(-1, 1, 1, 1)  # an eps model: x0 = x_t - sigma * eps
    err = (eps_pred - d["noise"]) ** 2
    w = mask[d["idx"]]
    hand = float((err * w).sum() / (w.sum() * 4))
    assert math.isclose(float(loss), hand, rel_tol=1e-4)
    assert math.isclose(float(plain), float(err.mean()), rel_tol=1e-4)
    assert math.isclose(float(ones), float(plain), rel_tol=1e-6)  # a full mask changes nothing
    assert not math.isclose(float(loss), float(plain), rel_tol=1e-3)
    # a mirrored photo is weighted by its mirrored mask
    d = draws(generator, seed, fstep, b, 2, 1, [(8, 8)] * 2, (8, 8), eps=False)
    x_t, sigma, x0_pred = seen[3]
    f = d["flip"].view(-1, 1, 1, 1)
    x0 = torch.where(f, fmean[d["idx"]], mean[d["idx"]])
    assert torch.allclose(x_t, x0 + sigma.view(-1, 1, 1, 1) * d["noise"], atol=1e-5)
    err = ((x_t - x0_pred) / sigma.view(-1, 1, 1, 1) - d["noise"]) ** 2
    w = torch.where(f, mask[d["idx"]].flip(-1), mask[d["idx"]])
    assert math.isclose(float(mirrored), float((err * w).sum() / (w.sum() * 4)), rel_tol=1e-4)
    unmirrored = mask[d["idx"]]
    assert not math.isclose(float(mirrored), float((err * unmirrored).sum() / (unmirrored.sum() * 4)), rel_tol=1e-3)


def test_non_square_photo_reaches_sdxl_y_with_its_size_bucket_and_crop(dti_pack, fresh_sdxl, generator, monkeypatch):
    """A 40 x 200 photo at 64 px trains in the 32 x 128 bucket (resized to 32 x 160): SDXL's y carries
    (40, 200) as original size, the crop's corner in the resized photo, and 32 x 128 as target."""
    ct = dti_pack.comfy_host
    model, clip, vae = fresh_sdxl
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
        items = [ct.images.TrainingImage(torch.rand(40, 200, 3, generator=torch.Generator().manual_seed(0)), None, "w")]
        latents = [tl.cloned() for tl in ct.latents.encode_buckets(vae, model, items, 64, False)]
    (tl,) = latents
    assert tl.crop == (4, 16) and tl.mean[0].shape == (1, 4, 4, 20) and tl.original_size == [(40, 200)]
    seen = []
    real = model.model.apply_model

    def spy(x, t, **kw):
        seen.append((x.detach().clone(), kw["y"].detach().clone()))
        return real(x, t, **kw)

    monkeypatch.setattr(model.model, "apply_model", spy)
    b, seed = 3, 2
    with torch.inference_mode(False), torch.no_grad(), ct.autograd.differentiable(model, clip):
        embeds = {k: m_star[k] * init[k] for k in init}
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, b, seed, 64, torch.device("cpu"))
        pooled = clip.encode_from_tokens(prompts[0].with_vectors({"l": embeds["clip_l"], "g": embeds["clip_g"]}),
                                         return_pooled=True)[1]
        lefts = set()
        for step in range(3):
            seen.clear()
            ds(embeds, step)
            d = draws(generator, seed, step, b, 1, 1, [(4, 20)], (4, 16))
            ((x_t, y),) = seen
            assert x_t.shape == (b, 4, 4, 16)
            table = model.get_model_object("model_sampling").sigmas
            sigma = table[(d["u"] * len(table)).floor().long()]
            for i, (top, left) in enumerate(d["corners"]):
                x0 = tl.mean[0][0, :, top:top + 4, left:left + 16] + tl.std[0][0, :, top:top + 4, left:left + 16] * d["eps"][i]
                assert torch.allclose(x_t[i], x0 + sigma[i] * d["noise"][i], atol=1e-4)
                y_ref = model.model.encode_adm(pooled_output=pooled.float(), width=200, height=40, crop_w=8 * left,
                                               crop_h=8 * top, target_width=128, target_height=32)
                assert torch.allclose(y[i:i + 1].float(), y_ref.float(), atol=1e-3, rtol=0), (step, i)
                lefts.add(left)
    assert len(lefts) > 1, "the crop corner never moved"


def test_batches_come_from_one_bucket_and_captions_follow_their_image(dti_pack, fresh_sd15, generator, monkeypatch):
    ct = dti_pack.comfy_host
    model, clip, vae = fresh_sd15
    captions = ["a photo of {} on grass", "{} in the snow", "a drawing of {}"]
    g0 = torch.Generator().manual_seed(1)
    # image 0 and 2 are square, image 1 is 1:2: two buckets, image 1 alone in the second
    items = [ct.images.TrainingImage(torch.rand(*s, 3, generator=g0), None, str(k))
             for k, s in enumerate([(64, 64), (48, 96), (80, 80)])]
    with torch.inference_mode():
        init, _, m_star = ct.text.initial_vectors(clip, "cat", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, captions, 1)
        latents = [tl.cloned() for tl in ct.latents.encode_buckets(vae, model, items, 64, False)]
    assert [tl.index for tl in latents] == [[0, 2], [1]] and [tl.crop for tl in latents] == [(8, 8), (6, 12)]
    used, shapes = [], []
    for k, p in enumerate(prompts):
        real = p.with_vectors
        monkeypatch.setattr(p, "with_vectors", lambda v, _k=k, _r=real: (used.append(_k), _r(v))[1])
    real_apply = model.model.apply_model
    monkeypatch.setattr(model.model, "apply_model",
                        lambda x, t, **kw: (shapes.append(tuple(x.shape[-2:])), real_apply(x, t, **kw))[1])
    b, seed = 2, 9
    with torch.inference_mode(False), torch.no_grad(), ct.autograd.differentiable(model, clip):
        embeds = {k: m_star[k] * init[k] for k in init}
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, b, seed, 64, torch.device("cpu"),
                              per_image_prompts=True)
        chosen = set()
        pick = {s: int(torch.multinomial(torch.tensor([2.0, 1.0]), 1, generator=generator(seed, s))) for s in range(40)}
        steps = [s for s in pick if pick[s] == 0][:2] + [s for s in pick if pick[s] == 1][:2]
        for step in steps:
            used.clear(), shapes.clear()
            ds(embeds, step)
            g = generator(seed, step)
            k = int(torch.multinomial(torch.tensor([2.0, 1.0]), 1, generator=g))
            idx = torch.randint(len(latents[k].index), (b,), generator=g)
            assert shapes == [latents[k].crop]  # one bucket per batch
            assert used[-b:] == [latents[k].index[int(i)] for i in idx], (step, used)
            chosen.add(k)
    assert chosen == {0, 1}


def test_node_refuses_a_wrong_number_of_captions(dti_pack, sd15_loaded):
    from tests_host_helpers import run_train

    with pytest.raises(ValueError, match="captions: 1 line"):
        run_train(dti_pack, sd15_loaded, name="caps", captions="a photo of {}")


def test_masks_and_captions_change_the_fingerprint(dti_pack, sd15_loaded):
    tn = dti_pack.nodes.train_node
    model, clip, _ = sd15_loaded
    px = torch.rand(1, 8, 8, 3)
    m = torch.ones(8, 8)
    m2 = m.clone()
    m2[0, 0] = 0.0
    base = dict(steps=1)
    f = [tn._fingerprint(base, [px], model, clip), tn._fingerprint(base, [px, m], model, clip),
         tn._fingerprint(base, [px, m2], model, clip), tn._fingerprint(dict(base, templates=["{} x"]), [px], model, clip)]
    assert len(set(f)) == 4


def two_buckets_with_masks(ct):
    """A square photo (all subject) and a wide one whose subject is a box: two buckets, masks."""
    g0 = torch.Generator().manual_seed(2)
    mask = torch.zeros(48, 96)
    mask[8:40, 16:64] = 1.0
    return [ct.images.TrainingImage(torch.rand(64, 64, 3, generator=g0), torch.ones(64, 64), "sq"),
            ct.images.TrainingImage(torch.rand(48, 96, 3, generator=g0), mask, "wide")]


def test_descent_through_buckets_and_masks(dti_pack, fresh_sd15):
    """kappa = 0 DTI through the node's DiffusionStep on photos of two aspect ratios with subject
    masks: on a fixed set of draws covering both buckets the objective must fall step after step."""
    ct = dti_pack.comfy_host
    core = dti_pack.dti_core.training
    model, clip, vae = fresh_sd15
    items = two_buckets_with_masks(ct)
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "car", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of {}", "{} on a table"], 1)
        latents = [tl.cloned() for tl in ct.latents.encode_buckets(vae, model, items, 64, True)]
    assert len(latents) == 2
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 3, 64, torch.device("cpu"),
                              per_image_prompts=True)
        fixed = [0, 1, 2, 3]
        picks = {int(torch.multinomial(torch.tensor([1.0, 1.0]), 1, generator=core.step_generator(3, k))) for k in fixed}
        assert picks == {0, 1}, "the fixed draws must cover both buckets"
        result = core.train(init, mu, m_star, lambda e, s: sum(ds(e, k) for k in fixed) / len(fixed),
                            core.TrainConfig(steps=4, lr=0.02, kappa=0.0))
    loss = result.history.loss
    print(f"\nbuckets + masks: loss on the fixed draws {loss}")
    assert all(b < a for a, b in zip(loss, loss[1:])), loss
    v = result.vectors["clip_l"]
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), m_star["clip_l"]), atol=1e-5)


def test_node_trains_from_a_folder_alone_and_refuses_no_images(dti_pack, fresh_sd15, comfy, embeddings_dir,
                                                               tmp_path, monkeypatch):
    """``images`` is optional: a folder of photos is enough; neither is a clear refusal, and so is a mask
    without the batch it belongs to."""
    import folder_paths
    from PIL import Image
    from tests_host_helpers import train_args

    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(tmp_path))
    (tmp_path / "cat").mkdir()
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(64, 48), (48, 64)]):
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(tmp_path / "cat" / f"{i}.png")
    model, clip, vae = fresh_sd15
    node = dti_pack.nodes.train_node.DTITrain()
    with torch.inference_mode():
        out = node.run(model, clip, vae, **train_args(name="folder-only", steps=1, batch_size=1, image_folder="cat"))
        assert out["ui"]["text"][0].startswith("Saved embedding:folder-only")
        with pytest.raises(ValueError, match="no training images"):
            node.run(model, clip, vae, **train_args(name="nothing"))
        with pytest.raises(ValueError, match="mask belongs to the images batch"):
            node.run(model, clip, vae, mask=torch.ones(1, 8, 8), **train_args(name="mask-only", image_folder="cat"))
    assert (embeddings_dir / "folder-only.safetensors").is_file()
    assert not (embeddings_dir / "nothing.safetensors").exists()


def test_teacher_student_through_the_training_step_with_the_new_defaults(dti_pack, fresh_sd15):
    """Training still converges with the paper's defaults and this pack's additions: the node's own
    DiffusionStep (a random bucket per batch, a fresh random crop, a fresh posterior sample, integer
    DDPM timesteps, subject masks) with the model's call turned into a teacher-student objective. At
    each of the step's own draws the model returns student - teacher + x0, so the step's (masked)
    denoising loss becomes the distance between the student's prediction and the teacher's, whose
    prompt holds "dog". The learned word, started at "car", must turn toward "dog"."""
    from pathlib import Path

    from dti_tests_support import load_by_path

    # the same target, measure and model call as the teacher-student test through the UNet
    learning = load_by_path("dti_test_learning", Path(__file__).parent / "test_learning.py")
    teacher_student, teacher_student_denoiser = learning.teacher_student, learning.teacher_student_denoiser

    ct = dti_pack.comfy_host
    core = dti_pack.dti_core.training
    model, clip, vae = fresh_sd15
    target, init, mu, m_star, _, cos_to_dog = teacher_student(dti_pack, fresh_sd15)
    items = two_buckets_with_masks(ct)
    with torch.inference_mode():
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
        latents = [tl.cloned() for tl in ct.latents.encode_buckets(vae, model, items, 64, False)]
    assert len(latents) == 2 and all(tl.std is not None for tl in latents)  # posterior sampling is on
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, None, 2, 3, 64, torch.device("cpu"))
        with teacher_student_denoiser(ds, model, target):
            start = cos_to_dog(init["clip_l"])
            result = core.train(init, mu, m_star, lambda e, s: ds(e, s), core.TrainConfig(steps=40, lr=0.04, kappa=0.0))
    learned = cos_to_dog(result.vectors["clip_l"])
    loss = result.history.loss
    print(f"\nteacher-student through DiffusionStep (buckets, masks, crops, posterior, integer t): "
          f"cos(v, dog) {start:.3f} -> {learned:.3f}; loss {sum(loss[:5]) / 5:.3g} -> {sum(loss[-5:]) / 5:.3g}")
    assert learned > start + 0.1
    v = result.vectors["clip_l"]
    assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), m_star["clip_l"]), atol=1e-5)
