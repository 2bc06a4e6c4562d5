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


def test_same_seed_same_result_and_resume_reproduces_uninterrupted_run():
    init, mu, target = setup()
    cfg = TrainConfig(steps=20, lr=0.03, kappa=1e-2, beta=0.9, checkpoint_every=7)
    checkpoints = {}
    full = train(init, mu, M_STAR, noisy_loss(target), cfg, on_checkpoint=lambda s, r: checkpoints.setdefault(s, r))
    assert sorted(checkpoints) == [7, 14]
    again = train(init, mu, M_STAR, noisy_loss(target), cfg)
    for k in full.vectors:
        assert torch.equal(full.vectors[k], again.vectors[k])
    ck = checkpoints[14]
    resumed = train(ck.vectors, mu, M_STAR, noisy_loss(target), cfg, start_step=14, optimizer_state=ck.optimizer_state)
    for k in full.vectors:
        assert torch.allclose(resumed.vectors[k], full.vectors[k], atol=1e-6)


def test_non_finite_loss_stops_the_run():
    init, mu, _ = setup()

    def bad(embeds, step):
        loss = sum(e.sum() for e in embeds.values())
        return loss * float("nan") if step == 3 else loss

    steps = []
    with pytest.raises(NonFiniteError, match="step 4"):
        train(init, mu, M_STAR, bad, TrainConfig(steps=10), on_step=lambda s, *_: steps.append(s))
    assert steps == [1, 2, 3]


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
                                          ("kappa", -1e-4), ("beta", 1.0), ("checkpoint_every", -1)])
def test_bad_settings_are_refused(field, value):
    init, mu, target = setup()
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "lr" else "learning rate"):
        train(init, mu, M_STAR, noisy_loss(target), cfg)
