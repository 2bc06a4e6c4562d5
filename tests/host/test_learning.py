"""Teacher-student recovery through the real ComfyUI text path: DTI learns a known word.

Target: the conditioning CLIPTextEncode gives for "a photo of a dog". The student is the
learned word in "a photo of a {}", spliced in exactly as embedding:NAME is at inference,
starting from "car". On random weights the signal is weaker than on a trained CLIP, so the
test asserts a clear rise of the cosine to "dog", not convergence.
"""

import contextlib
import math

import pytest
import torch


def teacher_student(dti_pack, loaded):
    """Target conditioning of "a photo of a dog", the student word starting at "car", and the
    direction of "dog" to measure against."""
    ct = dti_pack.comfy_host
    _, clip, _ = loaded
    (_, tok, encoder), = ct.text.text_encoders(clip).values()
    with torch.inference_mode():
        target = clip.encode_from_tokens(clip.tokenize("a photo of a dog"))
        init, mu, m_star = ct.text.initial_vectors(clip, "car", 0, "mean")
        dog = ct.text.initializer_ids(tok, "dog")
        prompt, = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
    assert len(dog) == 1 and init["clip_l"].shape == (1, 768)
    with torch.inference_mode(False):
        dog_dir = ct.text.vocabulary(encoder)[dog].detach().float().clone()
        dog_dir = dog_dir / dog_dir.norm()
        target = target.clone().float()

    def cos_to_dog(v):
        return float((v / v.norm(dim=-1, keepdim=True) * dog_dir).sum())

    return target, init, mu, m_star, prompt, cos_to_dog


@contextlib.contextmanager
def teacher_student_denoiser(ds, model, target):
    """Turn DiffusionStep ``ds``'s model call into a teacher-student objective: at each of the step's
    own draws (crop, posterior sample, timestep, noise) the model returns student - teacher + x0, so the
    step's denoising loss becomes the distance between the student's prediction (the learned word) and
    the teacher's (the conditioning ``target``, e.g. "a photo of a dog"). Restored on exit."""
    seen_x0 = []
    real_call, real_scaling = model.model.apply_model, ds.ms.noise_scaling

    def scaling(sigma, noise, x0, *args, **kwargs):
        seen_x0.append(x0.detach())
        return real_scaling(sigma, noise, x0, *args, **kwargs)

    def teacher_student_call(x, t, **kw):
        student = real_call(x, t, **kw)
        with torch.no_grad():
            c = kw["c_crossattn"]
            teacher = real_call(x, t, **dict(kw, c_crossattn=target.to(c).expand(c.shape[0], -1, -1)))
        return student - teacher + seen_x0[-1]

    ds.ms.noise_scaling = scaling
    model.model.apply_model = teacher_student_call
    try:
        yield
    finally:
        del ds.ms.noise_scaling, model.model.apply_model  # back to the class's methods


def test_dti_recovers_target_word_direction_and_plain_ti_norm_drifts(dti_pack, fresh_sd15):
    ct = dti_pack.comfy_host
    core_training = dti_pack.dti_core.training
    _, clip, _ = fresh_sd15
    target, init, mu, m_star, prompt, cos_to_dog = teacher_student(dti_pack, fresh_sd15)

    def loss_fn(embeds, step):
        cond, _ = ct.text.encode_tokens(clip, prompt.with_vectors({"l": embeds["clip_l"]}))
        return ((cond.float() - target) ** 2).mean()

    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(fresh_sd15[0], clip):
        start = cos_to_dog(init["clip_l"])
        cfg = core_training.TrainConfig(steps=40, lr=0.04, kappa=0.0)
        dti = core_training.train(init, mu, m_star, loss_fn, cfg)
        learned = cos_to_dog(dti.vectors["clip_l"])

        # The pack's plain-TI baseline (DTI Train's method "ti") on the same loss: the vector itself from
        # the "car" row, AdamW at the authors' TI rate (5e-3 x batch 4).
        with torch.inference_mode():
            rows = ct.text.initializer_rows(clip, "car", 0, ("clip_l",))
        assert abs(float(rows["clip_l"].norm()) - m_star["clip_l"]) < 0.2 * m_star["clip_l"]  # a row starts near m*
        ti = core_training.train(rows, mu, m_star, loss_fn, core_training.TrainConfig(steps=40, lr=0.02, method="ti"))
        e = ti.vectors["clip_l"]
        ti_norm = float(e.norm())

    print(f"\nteacher-student: cos(v, dog) {start:.3f} -> {learned:.3f} in 40 DTI steps; "
          f"loss {dti.history.loss[0]:.5f} -> {dti.history.loss[-1]:.5f}; "
          f"DTI |e| = {dti.vectors['clip_l'].norm():.4f} (m* {m_star['clip_l']:.4f}); "
          f"plain TI |e| {float(rows['clip_l'].norm()):.4f} -> {ti_norm:.4f}, cos {cos_to_dog(e):.3f}")
    assert learned > start + 0.3
    assert dti.history.loss[-1] < 0.5 * dti.history.loss[0]
    assert abs(float(dti.vectors["clip_l"].norm()) - m_star["clip_l"]) < 1e-5
    assert abs(ti_norm - m_star["clip_l"]) > 0.2 * m_star["clip_l"]


def test_dti_recovers_target_through_the_denoiser(dti_pack, fresh_sd15):
    """The same recovery, with the loss on the UNet's output (as training sees it)."""
    ct = dti_pack.comfy_host
    core_training = dti_pack.dti_core.training
    model, clip, _ = fresh_sd15
    target, init, mu, m_star, prompt, cos_to_dog = teacher_student(dti_pack, fresh_sd15)
    ms = model.model.model_sampling

    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        def loss_fn(embeds, i):
            g = core_training.step_generator(7, i)
            x0 = torch.randn(2, 4, 8, 8, generator=g)
            sigma = ms.sigma(torch.rand(2, generator=g) * 999)
            x_t = ms.noise_scaling(sigma, torch.randn(2, 4, 8, 8, generator=g), x0)
            cond, _ = ct.text.encode_tokens(clip, prompt.with_vectors({"l": embeds["clip_l"]}))
            student = model.model.apply_model(x_t, sigma, c_crossattn=cond.repeat(2, 1, 1))
            with torch.no_grad():
                teacher = model.model.apply_model(x_t, sigma, c_crossattn=target.repeat(2, 1, 1))
            return ((student.float() - teacher.float()) / sigma.view(-1, 1, 1, 1)).pow(2).mean()

        start = cos_to_dog(init["clip_l"])
        dti = core_training.train(init, mu, m_star, loss_fn, core_training.TrainConfig(steps=40, lr=0.04, kappa=0.0))
    learned = cos_to_dog(dti.vectors["clip_l"])
    print(f"\nteacher-student through the UNet: cos(v, dog) {start:.3f} -> {learned:.3f} in 40 steps; "
          f"loss {sum(dti.history.loss[:5]) / 5:.3g} -> {sum(dti.history.loss[-5:]) / 5:.3g} (5-step means)")
    assert learned > start + 0.1


def fit_through_the_training_step(dti_pack, loaded, steps, lr):
    """kappa = 0 DTI steps through the node's own DiffusionStep, all on one fixed draw (step 0), so
    the objective is one deterministic function of the vectors: it must fall, and every encoder's
    vectors must turn by exactly atan(lr) in the first step (beta = 0 normalises each step)."""
    ct = dti_pack.comfy_host
    core = dti_pack.dti_core.training
    model, clip, _ = loaded
    with torch.inference_mode():
        init, mu, m_star = ct.text.initial_vectors(clip, "car", 0, "mean")
        prompts = ct.text.tokenize_templates(clip, ["a photo of a {}"], 1)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    flipped = latents.flip(-1)
    snapshots = {}
    with torch.inference_mode(False), torch.enable_grad(), ct.autograd.differentiable(model, clip):
        ds = ct.step.DiffusionStep(model, clip, prompts, latents, flipped, 2, 11, 64, torch.device("cpu"))
        result = core.train(init, mu, m_star, lambda e, s: ds(e, 0),
                            core.TrainConfig(steps=steps, lr=lr, kappa=0.0, checkpoint_every=1),
                            on_checkpoint=lambda s, r: snapshots.setdefault(s, {k: v.clone() for k, v in r.vectors.items()}))
    return init, m_star, snapshots[1], result


def angle(a, b):
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))


@pytest.mark.parametrize("kind, steps", [("sd15", 4), ("sdxl", 3)])
def test_every_encoder_trains_and_the_loss_falls_through_the_diffusion_step(kind, steps, request, dti_pack):
    lr = 0.04
    init, m_star, first, result = fit_through_the_training_step(dti_pack, request.getfixturevalue(f"fresh_{kind}"),
                                                                steps, lr)
    assert set(result.vectors) == {"sd15": {"clip_l"}, "sdxl": {"clip_l", "clip_g"}}[kind]
    for k, v in result.vectors.items():
        assert torch.allclose(angle(first[k], init[k]), torch.full((v.shape[0],), math.atan(lr)), atol=1e-4), k
        assert (angle(v, init[k]) > 1.5 * math.atan(lr)).all(), f"{k} stopped moving"
        assert torch.allclose(v.norm(dim=-1), torch.full((v.shape[0],), m_star[k]), atol=1e-5)
    loss = result.history.loss
    print(f"\n{kind}: loss on the fixed draw {loss}")
    assert loss[-1] < loss[0] and all(b <= a for a, b in zip(loss, loss[1:]))
