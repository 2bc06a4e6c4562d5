import pytest
import torch

from dti_core.sphere import normalize
from dti_core.training import NonFiniteError, TrainConfig, step_generator, train

M_STAR = {"clip_l": 0.4, "clip_g": 0.6}


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = {"clip_l": torch.randn(2, 768, generator=g), "clip_g": torch.randn(2, 1280, generator=g)}
    target = {k: normalize(torch.randn_like(v)) for k, v in init.items()}
    return init, {k: normalize(v) for k, v in init.items()}, target


def noisy_loss(target):
    def step_fn(embeds, step):
        gen = step_generator(123, step)
        loss = 0
        for k, e in embeds.items():
            noise = 0.01 * torch.randn(e.shape, generator=gen)
            loss = loss + ((e - M_STAR[k] * target[k] - noise) ** 2).mean()
        return loss
    return step_fn


def test_learns_toward_target_with_norm_held_at_m_star():
    init, mu, target = setup()
    seen = []
    result = train(init, mu, M_STAR, noisy_loss(target), TrainConfig(steps=60, lr=0.05, kappa=0.0),
                   on_step=lambda s, loss, norms: seen.append((s, loss, norms)))
    assert [s for s, _, _ in seen] == list(range(1, 61))
    for k, v in result.vectors.items():
        assert torch.allclose(v.norm(dim=-1), torch.full((2,), M_STAR[k]), atol=1e-5)
        cos = (normalize(v) * target[k]).sum(-1)
        start = (normalize(init[k]) * target[k]).sum(-1)
        assert (cos > start + 0.5).all()
    for norms in result.history.norms["clip_g"]:
        assert norms == pytest.approx([0.6, 0.6], abs=1e-5)
    assert result.history.loss[-1] < result.history.loss[0]


def test_step_function_gets_m_star_times_the_unit_direction_attached_to_the_graph():
    init, mu, target = setup()
    seen = []

    def step_fn(embeds, step):
        seen.append({k: e for k, e in embeds.items()})
        return noisy_loss(target)(embeds, step)

    train(init, mu, M_STAR, step_fn, TrainConfig(steps=2, lr=0.05, kappa=0.0))
    for k in init:
        first = seen[0][k]
        assert first.requires_grad, f"{k} reaches the step function detached, so it can never train"
        assert torch.allclose(first.norm(dim=-1), torch.full((2,), M_STAR[k]), atol=1e-6, rtol=0)
        assert torch.allclose(first.detach(), M_STAR[k] * normalize(init[k]), atol=1e-6, rtol=0)
        assert torch.allclose(seen[1][k].norm(dim=-1), torch.full((2,), M_STAR[k]), atol=1e-6, rtol=0)


def test_same_seed_same_result_and_resume_reproduces_uninterrupted_run():
    # kappa = 0: with a strong prior every run lands next to the initializer and a resume
    # that restarted from step 0 would agree with the uninterrupted run anyway.
    init, mu, target = setup()
    cfg = TrainConfig(steps=20, lr=0.03, kappa=0.0, beta=0.9, checkpoint_every=7)
    checkpoints = {}
    full = train(init, mu, M_STAR, noisy_loss(target), cfg, on_checkpoint=lambda s, r: checkpoints.setdefault(s, r))
    assert sorted(checkpoints) == [7, 14]
    again = train(init, mu, M_STAR, noisy_loss(target), cfg)
    for k in full.vectors:
        assert torch.equal(full.vectors[k], again.vectors[k])
    ck = checkpoints[14]
    assert ck.steps_done == 14
    calls = []

    def counting(embeds, step):
        calls.append(step)
        return noisy_loss(target)(embeds, step)

    resumed = train(ck.vectors, mu, M_STAR, counting, cfg, start_step=14, optimizer_state=ck.optimizer_state)
    assert calls == list(range(14, 20))
    assert resumed.history.steps == list(range(15, 21)) and resumed.steps_done == 20
    assert resumed.history.loss == pytest.approx(full.history.loss[14:], rel=1e-5)
    for k in full.vectors:
        assert torch.allclose(resumed.vectors[k], full.vectors[k], atol=1e-6, rtol=0)
    # The comparison can tell (elements are ~0.02): a restart, or a resume without the
    # optimizer state, ends at least 100 tolerances away.
    restarted = train(ck.vectors, mu, M_STAR, noisy_loss(target), cfg)
    no_state = train(ck.vectors, mu, M_STAR, noisy_loss(target), cfg, start_step=14)
    for other in (restarted, no_state):
        assert max(float((other.vectors[k] - full.vectors[k]).abs().max()) for k in full.vectors) > 1e-4


def test_non_finite_loss_stops_the_run():
    init, mu, _ = setup()

    def bad(embeds, step):
        loss = sum(e.sum() for e in embeds.values())
        return loss * float("nan") if step == 3 else loss

    steps = []
    with pytest.raises(NonFiniteError, match="step 4"):
        train(init, mu, M_STAR, bad, TrainConfig(steps=10), on_step=lambda s, *_: steps.append(s))
    assert steps == [1, 2, 3]


def test_non_finite_gradient_stops_the_run_before_the_optimizer_step():
    init, mu, _ = setup()

    def bad_grad(embeds, step):
        loss = sum(((e - 0.1) ** 2).mean() for e in embeds.values())
        if step == 2:
            x = embeds["clip_l"][0, 0]
            loss = loss + torch.sqrt(x - x)  # value 0, gradient NaN
        return loss

    steps = []
    with pytest.raises(NonFiniteError, match="gradient for clip_l became non-finite at step 3"):
        train(init, mu, M_STAR, bad_grad, TrainConfig(steps=10, kappa=0.0), on_step=lambda s, *_: steps.append(s))
    assert steps == [1, 2]


def test_an_encoder_whose_vector_gets_no_gradient_is_an_error():
    # A vector detached inside the step function would silently never train.
    init, mu, target = setup()

    def detached_g(embeds, step):
        embeds = dict(embeds, clip_g=embeds["clip_g"].detach())
        return noisy_loss(target)(embeds, step)

    with pytest.raises(RuntimeError, match="no gradient reached the clip_g vector"):
        train(init, mu, M_STAR, detached_g, TrainConfig(steps=3, kappa=0.0))


def test_cancel_from_callback_stops_within_a_step():
    init, mu, target = setup()

    class Cancelled(Exception):
        pass

    def on_step(step, loss, norms):
        if step == 2:
            raise Cancelled()

    calls = []

    def step_fn(embeds, step):
        calls.append(step)
        return noisy_loss(target)(embeds, step)

    with pytest.raises(Cancelled):
        train(init, mu, M_STAR, step_fn, TrainConfig(steps=10), on_step=on_step)
    assert calls == [0, 1]


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("lr", float("nan")), ("lr", 1e9),
                                          ("kappa", -1e-4), ("beta", 1.0), ("checkpoint_every", -1),
                                          ("method", "adam")])
def test_bad_settings_are_refused(field, value):
    init, mu, target = setup()
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "lr" else "learning rate"):
        train(init, mu, M_STAR, noisy_loss(target), cfg)


def test_plain_ti_is_adamw_on_the_free_vectors_from_their_own_norms():
    """method "ti" (the authors' baseline): the step function gets the vectors as they are, starting at
    ``init`` with its norms; each step is torch's AdamW (betas 0.9/0.999, weight decay 1e-2) on the
    gradient, with no prior and no projection, so the norms leave m*."""
    from dti_core.training import TI_BETAS, TI_WEIGHT_DECAY
    init, mu, target = setup()
    seen = []

    def step_fn(embeds, step):
        seen.append({k: e.detach().clone() for k, e in embeds.items()})
        return noisy_loss(target)(embeds, step)

    cfg = TrainConfig(steps=30, lr=0.02, kappa=1.0, method="ti")  # (kappa is not used by TI)
    result = train(init, mu, M_STAR, step_fn, cfg)
    for k in init:
        assert torch.equal(seen[0][k], init[k].float())
    # the same run, by hand: AdamW on parameters that start at init
    ref = {k: torch.nn.Parameter(init[k].float().clone()) for k in sorted(init)}
    opt = torch.optim.AdamW([ref[k] for k in sorted(init)], lr=0.02, betas=TI_BETAS, weight_decay=TI_WEIGHT_DECAY,
                            eps=1e-8)
    for step in range(30):
        opt.zero_grad()
        noisy_loss(target)(ref, step).backward()
        opt.step()
    for k in init:
        assert torch.allclose(result.vectors[k], ref[k].detach(), atol=1e-6, rtol=0)
        norms = result.vectors[k].norm(dim=-1)
        assert (abs(norms - init[k].norm(dim=-1)) > 0.01).all(), norms  # free norms: they moved
        assert result.history.norms[k][-1] == pytest.approx(norms.tolist(), abs=1e-5)
    assert result.history.loss[-1] < result.history.loss[0]


def test_plain_ti_does_not_resume_from_a_step():
    init, mu, target = setup()
    with pytest.raises(ValueError, match="plain-TI run cannot resume"):
        train(init, mu, M_STAR, noisy_loss(target), TrainConfig(steps=10, method="ti"), start_step=5)


def _fp16_loss(target, factor=2.0**-26):
    """A loss computed in fp16 whose gradients (about 2^-26) underflow fp16 unless scaled."""
    def step_fn(embeds, step):
        return sum(((e.half() - (M_STAR[k] * target[k]).half()) ** 2).sum().float() * factor
                   for k, e in embeds.items())
    return step_fn


def _fp32_loss(target, factor=2.0**-26):
    def step_fn(embeds, step):
        return sum(((e - M_STAR[k] * target[k]) ** 2).sum() * factor for k, e in embeds.items())
    return step_fn


def test_loss_scale_keeps_fp16_gradients_and_leaves_fp32_runs_exactly_as_they_were():
    init, mu, target = setup()
    config = TrainConfig(steps=3, lr=0.05, kappa=1e-4)
    ref = train(init, mu, M_STAR, _fp32_loss(target), config).vectors
    # a power-of-two scale divides out exactly: the same fp32 run, bit for bit (a number or a function)
    for scale in (2.0**10, lambda: 2.0**10):
        same = train(init, mu, M_STAR, _fp32_loss(target), config, loss_scale=scale).vectors
        assert all(torch.equal(same[k], ref[k]) for k in ref)
    # fp16 compute: unscaled, every gradient entry underflows and the run does not follow fp32's
    plain = train(init, mu, M_STAR, _fp16_loss(target), config).vectors
    assert not all(torch.allclose(plain[k], ref[k], atol=1e-3) for k in ref)
    scaled = train(init, mu, M_STAR, _fp16_loss(target), config, loss_scale=2.0**20).vectors
    for k in ref:
        assert torch.allclose(scaled[k], ref[k], atol=1e-3), k


def test_a_loss_scale_that_overflows_is_lowered_and_the_step_computed_again(caplog):
    init, mu, target = setup()
    config = TrainConfig(steps=3, lr=0.05, kappa=1e-4)
    big = 2.0**60  # gradients near 2^60: scaled by 2^80 they overflow fp32, by 2^64 they do not
    ref = train(init, mu, M_STAR, _fp32_loss(target, big), config).vectors
    calls = []

    def counted(embeds, step):
        calls.append(step)
        return _fp32_loss(target, big)(embeds, step)

    with caplog.at_level("INFO", logger="ComfyUI-DTI"):
        got = train(init, mu, M_STAR, counted, config, loss_scale=2.0**80).vectors
    assert calls[0] == 0 and calls.count(0) > 1 and calls.count(1) == 1 and calls.count(2) == 1
    assert "overflowed at step 1" in caplog.text
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in ref)


def test_first_step_check_sees_the_first_steps_gradients_once_before_the_optimizer_moves():
    init, mu, target = setup()
    calls = []

    def check(grads, error):
        # the optimizer has not moved yet: the step's gradients are there, nothing was stepped
        calls.append(({k: None if g is None else g.clone() for k, g in grads.items()}, error, len(steps)))

    steps = []
    train(init, mu, M_STAR, noisy_loss(target), TrainConfig(steps=3, lr=0.05, kappa=0.0),
          on_step=lambda s, *_: steps.append(s), first_step_check=check)
    assert len(calls) == 1
    grads, error, steps_before = calls[0]
    assert error is None and steps_before == 0 and set(grads) == set(init)
    for k in init:
        assert grads[k] is not None and grads[k].abs().sum() > 0
    # the check changes nothing in the run
    r1 = train(init, mu, M_STAR, noisy_loss(target), TrainConfig(steps=3, lr=0.05, kappa=0.0))
    r2 = train(init, mu, M_STAR, noisy_loss(target), TrainConfig(steps=3, lr=0.05, kappa=0.0),
               first_step_check=lambda g, e: None)
    for k in init:
        assert torch.equal(r1.vectors[k], r2.vectors[k])


def test_first_step_check_runs_at_a_resumed_runs_first_step():
    init, mu, target = setup()
    calls = []
    train(init, mu, M_STAR, noisy_loss(target), TrainConfig(steps=5, lr=0.05, kappa=0.0), start_step=3,
          first_step_check=lambda g, e: calls.append((sorted(g), e)))
    assert calls == [(sorted(init), None)]


def test_first_step_check_can_replace_a_first_step_error_with_a_clearer_one():
    init, mu, target = setup()

    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("op x has no backward")

    def step_fn(embeds, step):
        return noisy_loss(target)({**embeds, "clip_g": NoBackward.apply(embeds["clip_g"])}, step)

    seen = []

    def check(grads, error):
        seen.append((grads, str(error)))
        raise ValueError("clip_g's encoder has an op without a backward")

    with pytest.raises(ValueError, match="without a backward"):
        train(init, mu, M_STAR, step_fn, TrainConfig(steps=3, kappa=0.0), first_step_check=check)
    assert seen == [({}, "op x has no backward")]
    # a check that returns lets the step's own error through
    with pytest.raises(RuntimeError, match="op x has no backward"):
        train(init, mu, M_STAR, step_fn, TrainConfig(steps=3, kappa=0.0), first_step_check=lambda g, e: None)
    # a non-finite loss is the run's own error, not the check's
    with pytest.raises(NonFiniteError):
        train(init, mu, M_STAR, lambda e, s: torch.tensor(float("nan"), requires_grad=True) * e["clip_l"].sum(),
              TrainConfig(steps=3, kappa=0.0), first_step_check=lambda g, e: seen.append("called"))
    assert "called" not in seen


def test_first_step_check_gets_a_missing_gradient_before_the_run_refuses_it():
    init, mu, target = setup()
    seen = []

    def detached_g(embeds, step):
        return noisy_loss(target)(dict(embeds, clip_g=embeds["clip_g"].detach()), step)

    with pytest.raises(RuntimeError, match="no gradient reached the clip_g vector"):
        train(init, mu, M_STAR, detached_g, TrainConfig(steps=3, kappa=0.0),
              first_step_check=lambda g, e: seen.append({k: v is None for k, v in g.items()}))
    assert seen == [{"clip_g": True, "clip_l": False}]
