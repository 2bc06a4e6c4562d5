"""The DTI training loop over an abstract step.

The host (ComfyUI glue, or a test) supplies ``step_fn(embeds, step) -> loss``:
given the current embeddings ``{encoder: m* . v}`` it returns the scalar loss.
This module owns everything else: parameterisation on the sphere, the optimizer,
the prior, non-finite guards, history, checkpoints and resumption.

Randomness inside a step should come from :func:`step_generator` so a run resumed
from a step-K checkpoint draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from .optim import DTIOptimizer
from .sphere import normalize

log = logging.getLogger("ComfyUI-DTI")


class NonFiniteError(RuntimeError):
    """The loss, a gradient or a vector became NaN/inf; the run stops, nothing is saved."""


METHODS = ("dti", "ti")
# The authors' plain-TI baseline (their ti_sdxl / ti_sana launchers: --optimizer=adamw, no magnitude
# decomposition, kappa 0): AdamW with the trainer's defaults.
TI_BETAS = (0.9, 0.999)
TI_WEIGHT_DECAY = 1e-2


@dataclass
class TrainConfig:
    steps: int = 400
    lr: float = 0.04  # already scaled by batch size (0.01 x 4), as the reference does
    kappa: float = 1e-4
    beta: float = 0.0
    eps: float = 1e-8
    seed: int = 0
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    # "dti": directions on the sphere at m*, Riemannian SGD with the vMF prior. "ti": the plain-TI
    # baseline, free vectors (starting at the initializer rows, their own norms), AdamW, no prior.
    method: str = "dti"

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise ValueError(f"learning rate must be in (0, 10], got {self.lr!r}")
        if not (math.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"kappa must be a finite number >= 0, got {self.kappa!r}")
        if not (0 <= self.beta < 1):
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint interval must be a whole number >= 0, got {self.checkpoint_every!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass
class History:
    """Per-step loss and, per encoder, the norm of each saved vector."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    norms: dict[str, list[list[float]]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"steps": list(self.steps), "loss": list(self.loss), "norms": {k: list(v) for k, v in self.norms.items()}}


@dataclass
class TrainResult:
    vectors: dict[str, torch.Tensor]  # m* . v per encoder, float32 on the CPU
    history: History
    optimizer_state: dict[str, list[float]]  # EMA of squared tangent norms per encoder
    steps_done: int


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, step)`` alone, so a resumed run repeats the same draws."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
    return g


def train(
    init: dict[str, torch.Tensor],
    mu: dict[str, torch.Tensor],
    m_star: dict[str, float],
    step_fn: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    start_step: int = 0,
    optimizer_state: dict[str, list[float]] | None = None,
    on_step: Callable[[int, float, dict[str, list[float]]], None] | None = None,
    on_checkpoint: Callable[[int, "TrainResult"], None] | None = None,
    on_vectors: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
    loss_scale: float | Callable[[], float] = 1.0,
    first_step_check: Callable[[dict[str, torch.Tensor | None], BaseException | None], None] | None = None,
) -> TrainResult:
    """Learn the directions of ``init`` (``{encoder: (n, width)}``) and return ``m* . v``.

    ``mu`` holds the prior directions per encoder, ``m_star`` the fixed norms. With
    ``config.method == "ti"`` the vectors themselves learn (plain TI: ``init`` as given, norms
    included; AdamW; ``mu``, ``m_star`` and kappa unused; no resumption) and are returned as they are.
    ``on_step(step, loss, norms)`` runs after every step (it may raise to cancel);
    ``on_checkpoint(step, result)`` every ``config.checkpoint_every`` steps before the last.
    ``on_vectors(step, vectors)`` runs after ``on_step`` with detached copies of the current ``m* . v``
    (for previews; it must not touch the run's random streams).
    ``loss_scale`` (a number, or a function read after each step's forward): the loss is multiplied by
    it before backward and the vectors' fp32 gradients divided by it before the optimizer, so fp16
    compute keeps small gradients from underflowing; 1 leaves the run exactly as unscaled. A power
    of two keeps the division exact. If a scaled gradient overflows, the step is computed again
    (``step_fn`` draws from ``step``'s own stream) at a sixteenth of the scale, down to 1.
    ``first_step_check(grads, error)`` runs once, at this run's first step, before the optimizer moves
    anything: with the vectors' gradients after its backward (``error`` None), or with the error its
    forward or backward raised (``grads`` empty). It may raise a clearer error; when it returns, the run
    goes on (or the step's error propagates).
    """
    config.validate()
    if set(init) != set(mu) or set(init) != set(m_star):
        raise ValueError("init, mu and m_star must name the same encoders")
    if not 0 <= start_step <= config.steps:
        raise ValueError(f"resume step {start_step} is outside 0..{config.steps}")
    keys = sorted(init)
    ti = config.method == "ti"
    if ti and start_step:
        raise ValueError("a plain-TI run cannot resume from a step checkpoint (AdamW's moments are not saved); "
                         "start it again")
    if ti:
        params = {k: torch.nn.Parameter(init[k].detach().to(device, torch.float32).clone()) for k in keys}
        scales = {k: 1.0 for k in keys}
        optimizer = torch.optim.AdamW([params[k] for k in keys], lr=config.lr, betas=TI_BETAS,
                                      weight_decay=TI_WEIGHT_DECAY, eps=config.eps)
    else:
        params = {k: torch.nn.Parameter(normalize(init[k].detach().to(device, torch.float32)).clone()) for k in keys}
        scales = {k: float(m_star[k]) for k in keys}
        optimizer = DTIOptimizer(
            [{"params": [params[k]], "mu": [mu[k].to(device, torch.float32)]} for k in keys],
            lr=config.lr,
            kappa=config.kappa,
            beta=config.beta,
            eps=config.eps,
        )
    if optimizer_state and start_step > 0:
        for k in keys:
            if k in optimizer_state:
                optimizer.state[params[k]] = {
                    "step": start_step,
                    "sq_norm_avg": torch.tensor(optimizer_state[k], dtype=torch.float32, device=device).view(-1, 1),
                }
    history = History(norms={k: [] for k in keys})

    def snapshot(done: int) -> TrainResult:
        vectors = {k: (scales[k] * params[k].detach()).float().cpu() for k in keys}
        ema = {}
        for k in keys:
            st = optimizer.state.get(params[k], {})
            if "sq_norm_avg" in st:
                ema[k] = st["sq_norm_avg"].flatten().cpu().tolist()
        return TrainResult(vectors=vectors, history=history, optimizer_state=ema, steps_done=done)

    def forward_backward(step: int) -> float:
        nonlocal lowered
        while True:
            optimizer.zero_grad(set_to_none=True)
            embeds = {k: scales[k] * params[k] for k in keys}
            loss = step_fn(embeds, step)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"the loss became {loss_value} at step {step + 1}; nothing was saved from this run")
            scale = max(1.0, float(loss_scale() if callable(loss_scale) else loss_scale) / lowered)
            if scale == 1.0:
                loss.backward()
                return loss_value
            (loss * scale).backward()
            for k in keys:
                if params[k].grad is not None:
                    params[k].grad.div_(scale)
            if all(params[k].grad is None or bool(torch.isfinite(params[k].grad).all()) for k in keys):
                return loss_value
            lowered *= 16.0
            log.info("DTI: the fp16 loss scale %g overflowed at step %d; computing the step again at %g",
                     scale, step + 1, max(1.0, scale / 16.0))

    lowered = 1.0  # the factor overflows divided the host's scale by
    for step in range(start_step, config.steps):
        if first_step_check is not None and step == start_step:
            try:
                loss_value = forward_backward(step)
            except NonFiniteError:
                raise
            except RuntimeError as e:
                traceback.clear_frames(e.__traceback__)  # the failed step's graph, freed before the check runs
                optimizer.zero_grad(set_to_none=True)
                first_step_check({}, e)
                raise
            first_step_check({k: params[k].grad for k in keys}, None)
        else:
            loss_value = forward_backward(step)
        for k in keys:
            if params[k].grad is None:
                # The optimizer would skip it and the run would "finish" with that encoder untrained.
                raise RuntimeError(f"no gradient reached the {k} vector at step {step + 1}: the step function "
                                   f"detached it or never used it; please report this")
            if not bool(torch.isfinite(params[k].grad).all()):
                raise NonFiniteError(f"the gradient for {k} became non-finite at step {step + 1}; nothing was saved")
        optimizer.step()
        for k in keys:
            if not bool(torch.isfinite(params[k]).all()):
                raise NonFiniteError(f"the {k} vector became non-finite at step {step + 1}; nothing was saved")
        done = step + 1
        norms = {k: (scales[k] * params[k].detach()).norm(dim=-1).cpu().tolist() for k in keys}
        history.steps.append(done)
        history.loss.append(loss_value)
        for k in keys:
            history.norms[k].append(norms[k])
        if on_step is not None:
            on_step(done, loss_value, norms)
        if on_vectors is not None:
            on_vectors(done, {k: (scales[k] * params[k].detach()).clone() for k in keys})
        if on_checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            on_checkpoint(done, snapshot(done))
    return snapshot(config.steps)
