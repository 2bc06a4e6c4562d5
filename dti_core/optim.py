"""The DTI optimizer: Riemannian SGD on the unit sphere with a von Mises-Fisher prior.

For each vector ``v`` (a row of a parameter, ``||v|| = 1``) one step is, as in
``docs/dti-method`` and the authors' ``SphericalSGD``:

1. ``g = grad - kappa * mu``          (MAP term of ``p(v) ~ exp(kappa mu.v)``)
2. ``g = g - (g.v) v``                (tangent projection)
3. ``s = beta s + (1 - beta) ||g||^2``, ``g = g / (sqrt(s / (1 - beta^t)) + eps)``
4. ``v = v - lr g``, then ``v = v / ||v||`` (retraction)

With the default ``beta = 0`` step 3 is ``g / ||g||``: every vector moves by ``lr``
along the sphere regardless of the loss scale.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

from .sphere import project_to_tangent, retract


class DTIOptimizer(Optimizer):
    """Riemannian SGD for unit-norm vectors with a vMF prior toward ``mu``.

    Each parameter is a ``(n, d)`` (or ``(d,)``) tensor of unit rows. A parameter
    group may carry ``mu``: a list of tensors, one per parameter and of its shape,
    with the unit prior direction of each row (the initializer token). Use one
    group per text encoder so each has its own ``mu`` (and, if wanted, ``lr``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.04,
        kappa: float = 1e-4,
        beta: float = 0.0,
        eps: float = 1e-8,
    ):
        if not (lr >= 0.0):
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not (kappa >= 0.0):
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not (eps > 0.0):
            raise ValueError(f"eps must be > 0, got {eps}")
        super().__init__(params, dict(lr=lr, kappa=kappa, beta=beta, eps=eps, mu=None))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        mu = group.get("mu")
        if mu is None:
            return
        if isinstance(mu, torch.Tensor):
            mu = [mu]
        mu = list(mu)
        if len(mu) != len(group["params"]):
            raise ValueError(f"mu has {len(mu)} tensors for {len(group['params'])} parameters")
        for m, p in zip(mu, group["params"]):
            if m.shape != p.shape:
                raise ValueError(f"mu shape {tuple(m.shape)} does not match parameter {tuple(p.shape)}")
        # The prior is a direction: store it unit-norm, detached, on the parameter's device.
        group["mu"] = [
            (m.detach() / m.detach().norm(dim=-1, keepdim=True)).to(p.device, p.dtype)
            for m, p in zip(mu, group["params"])
        ]

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mus = group.get("mu") or [None] * len(group["params"])
            for p, mu in zip(group["params"], mus):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["sq_norm_avg"] = torch.zeros((*p.shape[:-1], 1), device=p.device, dtype=p.dtype)
                state["step"] += 1
                g = p.grad
                if mu is not None and group["kappa"] > 0:
                    g = g - group["kappa"] * mu
                g = project_to_tangent(p, g)
                beta = group["beta"]
                avg = state["sq_norm_avg"]
                avg.mul_(beta).add_(g.square().sum(dim=-1, keepdim=True), alpha=1 - beta)
                denom = (avg / (1 - beta ** state["step"])).sqrt().add_(group["eps"])
                p.sub_(g / denom, alpha=group["lr"])
                p.copy_(retract(p))
        return loss
