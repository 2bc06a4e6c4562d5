import io
import math

import pytest
import torch

from dti_core.optim import DTIOptimizer
from dti_core.sphere import angle, normalize


def reference_update(v, grad, mu, state, lr, kappa, beta, eps):
    """The update of dti-method.md, written out one vector at a time with plain Python maths."""
    out = []
    for i in range(v.shape[0]):
        vi, gi = v[i].tolist(), grad[i].tolist()
        if mu is not None:
            gi = [g - kappa * m for g, m in zip(gi, mu[i].tolist())]
        dot = sum(g * x for g, x in zip(gi, vi))
        gi = [g - dot * x for g, x in zip(gi, vi)]
        sq = sum(g * g for g in gi)
        state["avg"][i] = beta * state["avg"][i] + (1 - beta) * sq
        corrected = state["avg"][i] / (1 - beta ** state["t"])
        gi = [g / (math.sqrt(corrected) + eps) for g in gi]
        vi = [x - lr * g for x, g in zip(vi, gi)]
        n = math.sqrt(sum(x * x for x in vi))
        out.append([x / n for x in vi])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("kappa", [0.0, 1e-4])
def test_matches_independent_implementation_over_200_steps(beta, kappa):
    gen = torch.Generator().manual_seed(42)
    widths = {"clip_l": (3, 12), "clip_g": (2, 20)}  # several vectors, two groups
    params, mus, ref, ref_state = {}, {}, {}, {}
    for key, shape in widths.items():
        params[key] = torch.nn.Parameter(normalize(torch.randn(*shape, generator=gen, dtype=torch.float64)))
        mus[key] = normalize(torch.randn(*shape, generator=gen, dtype=torch.float64))
        ref[key] = params[key].detach().clone()
        ref_state[key] = {"avg": [0.0] * shape[0], "t": 0}
    lrs = {"clip_l": 0.04, "clip_g": 0.02}
    opt = DTIOptimizer(
        [{"params": [params[k]], "mu": [mus[k]], "lr": lrs[k]} for k in widths], kappa=kappa, beta=beta
    )
    for _ in range(200):
        for key in widths:
            # gradients of widely varying size, to exercise the normalisation
            scale = 10 ** float(torch.empty(1).uniform_(-4, 1, generator=gen))
            grad = torch.randn(*widths[key], generator=gen, dtype=torch.float64) * scale
            params[key].grad = grad.clone()
            ref_state[key]["t"] += 1
            ref[key] = reference_update(ref[key], grad, mus[key], ref_state[key], lrs[key], kappa, beta, 1e-8)
        opt.step()
        for key in widths:
            assert torch.allclose(params[key].detach(), ref[key], atol=1e-6, rtol=0)
            # invariant: unit norm after every step
            assert torch.allclose(params[key].detach().norm(dim=-1), torch.ones(widths[key][0], dtype=torch.float64))
    assert (params["clip_l"] - ref["clip_l"]).abs().max() < 1e-6


def test_beta_zero_moves_each_vector_by_lr_along_the_tangent():
    v = torch.nn.Parameter(normalize(torch.randn(4, 32, dtype=torch.float64)))
    start = v.detach().clone()
    opt = DTIOptimizer([v], lr=0.01, kappa=0.0)
    v.grad = torch.randn(4, 32, dtype=torch.float64) * 3.0
    opt.step()
    # before retraction the step had length lr exactly, so the angle is atan(lr)
    assert torch.allclose(angle(v.detach(), start), torch.full((4,), math.atan(0.01), dtype=torch.float64), atol=1e-9)
    # and the retraction put it back on the sphere (unretracted, |v| = sqrt(1 + lr^2) = 1 + 5e-5)
    assert torch.allclose(v.detach().norm(dim=-1), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_prior_alone_pulls_toward_mu():
    mu = normalize(torch.randn(2, 16, dtype=torch.float64))
    v = torch.nn.Parameter(normalize(torch.randn(2, 16, dtype=torch.float64)))
    opt = DTIOptimizer([{"params": [v], "mu": [mu]}], lr=0.05, kappa=1.0)
    before = (v.detach() * mu).sum(-1)
    for _ in range(50):
        v.grad = torch.zeros_like(v)
        opt.step()
    after = (v.detach() * mu).sum(-1)
    assert (after > before).all() and (after > 0.99).all()


def test_converges_on_a_toy_objective():
    target = normalize(torch.randn(3, 24, dtype=torch.float64))
    v = torch.nn.Parameter(normalize(torch.randn(3, 24, dtype=torch.float64)))
    opt = DTIOptimizer([v], lr=0.05, kappa=0.0, beta=0.9)
    for step in range(400):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (1 - step / 400) + 1e-3
        opt.zero_grad()
        loss = -(v * target).sum()
        loss.backward()
        opt.step()
    assert ((v.detach() * target).sum(-1) > 0.999).all()


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    mu = normalize(torch.randn(2, 8))
    v1 = torch.nn.Parameter(normalize(torch.randn(2, 8)))
    opt1 = DTIOptimizer([{"params": [v1], "mu": [mu]}], lr=0.03, kappa=1e-2, beta=0.9)
    grads = [torch.randn(2, 8) for _ in range(10)]
    for g in grads[:5]:
        v1.grad = g.clone()
        opt1.step()
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    v2 = torch.nn.Parameter(v1.detach().clone())
    opt2 = DTIOptimizer([{"params": [v2], "mu": [torch.ones(2, 8)]}], lr=0.5, kappa=0.0, beta=0.0)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for g in grads[5:]:
        v1.grad, v2.grad = g.clone(), g.clone()
        opt1.step()
        opt2.step()
    assert torch.equal(v1.detach(), v2.detach())


def test_rejects_bad_settings():
    p = torch.nn.Parameter(normalize(torch.randn(1, 4)))
    with pytest.raises(ValueError):
        DTIOptimizer([p], lr=-1)
    with pytest.raises(ValueError):
        DTIOptimizer([p], kappa=-1e-4)
    with pytest.raises(ValueError):
        DTIOptimizer([p], beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        DTIOptimizer([{"params": [p], "mu": [torch.ones(2, 4)]}])
