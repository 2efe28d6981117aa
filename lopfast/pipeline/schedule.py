"""Learning-rate schedules as a table: the multiplier of every optimizer step, computed up front.

The training-step engine (``lopfast.pipeline.step``) moves this table to the device once and
indexes it with a device step counter inside the step, so a step captured as one CUDA graph
follows the schedule without a host value per step; a resumed run restores the counter.

Kinds (``TrainConfig.schedule``):

``"multistep"``  the paper's: ``lr_decay ** (number of milestones <= epoch)``, constant within an
                 epoch (what ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch gives).

``warmup_epochs`` > 0 multiplies the first ``round(warmup_epochs * steps_per_epoch)`` steps by a
linear ramp ``(step + 1) / warm-up steps``.
"""
from __future__ import annotations

import torch

__all__ = ["SCHEDULES", "lr_factors"]

SCHEDULES = ("multistep",)


def lr_factors(cfg, steps_per_epoch: int) -> torch.Tensor:
    """The multiplier of each param group's base lr at each optimizer step of the run.

    Args:
        cfg: a ``TrainConfig`` (``epochs``, ``schedule``, ``milestones``, ``lr_decay``).
        steps_per_epoch: optimizer steps in one epoch (the last, short batch included).

    Returns a float64 CPU tensor of length ``cfg.epochs * steps_per_epoch``.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    kind = getattr(cfg, "schedule", "multistep")
    if kind != "multistep":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    epoch = torch.arange(cfg.epochs, dtype=torch.float64)
    ms = torch.tensor(sorted(cfg.milestones), dtype=torch.float64)
    passed = (ms.view(1, -1) <= epoch.view(-1, 1)).sum(1) if len(ms) else torch.zeros(cfg.epochs)
    per_epoch = torch.tensor(float(cfg.lr_decay), dtype=torch.float64) ** passed.to(torch.float64)
    out = per_epoch.repeat_interleave(steps_per_epoch)
    warm = min(len(out), round(float(getattr(cfg, "warmup_epochs", 0.0)) * steps_per_epoch))
    if warm > 0:
        out[:warm] *= torch.arange(1, warm + 1, dtype=torch.float64) / warm
    return out
