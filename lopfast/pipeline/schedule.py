"""Learning-rate schedules as one table of per-step multipliers.

:func:`lr_factors` turns a training configuration into a float64 CPU tensor with one entry per
optimizer step: the factor that multiplies every parameter group's base LR at that step. The
training loop (or a captured training step, which indexes the table with a device-side step
counter) reads it; nothing else about the schedule lives in the loop, and a run resumed at step
``s`` continues from entry ``s`` with no scheduler state to restore.

Schedules (``cfg.schedule``), each after an optional linear warm-up of ``cfg.warmup_epochs``
epochs (factor ``(s + 1) / W`` at step ``s < W``, ``W = round(warmup_epochs * steps_per_epoch)``):

* ``multistep``: ``cfg.lr_decay ** (number of milestones <= epoch)``, constant within an epoch:
  exactly what ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per epoch gives (the
  paper's schedules, ``lopfast.pipeline.train.PRESETS``).
* ``linear``: from 1 down to 0 in a straight line over the steps after the warm-up (the last
  step gets ``1 / (T - W)``). With a warm-up this is the triangular schedule of the fast
  CIFAR-10 trainers (Page's DAWNBench ResNet; airbench's ``triangle``).
* ``onecycle``: cosine annealing from 1 to 0 after the warm-up: the shape of
  ``torch.optim.lr_scheduler.OneCycleLR`` with ``anneal_strategy="cos"`` (Smith and Topin's
  one-cycle policy), except that the warm-up is linear from ``1 / W`` rather than from
  ``1 / div_factor``, and that momentum is not cycled (SGD momentum stays ``cfg.momentum``).

``cfg`` is anything with ``epochs``, ``schedule``, ``warmup_epochs``, ``milestones`` and
``lr_decay`` attributes (:class:`lopfast.pipeline.train.TrainConfig`).
"""
from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "check_schedule", "lr_factors", "warmup_steps"]

SCHEDULES = ("multistep", "linear", "onecycle")


def check_schedule(schedule: object, warmup_epochs: object, epochs: object = None, *, prefix: str = "") -> None:
    """Raise ValueError naming the bad setting: an unknown schedule, or a warm-up that is negative,
    not finite, or not shorter than ``epochs`` (when given). ``prefix`` goes before the names
    (e.g. ``"--"`` for command-line flags)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{prefix}schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if (isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, (int, float))
            or not math.isfinite(warmup_epochs) or warmup_epochs < 0):
        raise ValueError(f"{prefix}warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    if epochs is not None and warmup_epochs > 0 and not warmup_epochs < epochs:
        raise ValueError(f"{prefix}warmup_epochs ({warmup_epochs:g}) must be shorter than the {epochs} epochs of "
                         "the stage it warms up")


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Steps of linear warm-up: ``round(warmup_epochs * steps_per_epoch)`` (at least 1 when > 0)."""
    if warmup_epochs <= 0:
        return 0
    return max(1, int(round(warmup_epochs * steps_per_epoch)))


def lr_factors(cfg, steps_per_epoch: int) -> torch.Tensor:
    """The LR multiplier of every optimizer step: float64 CPU tensor of ``cfg.epochs * steps_per_epoch``.

    Entry ``s`` is the factor in force for step ``s`` (0-based): the optimizer's ``s``-th update
    uses ``base_lr * factors[s]`` in every parameter group.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    epochs = cfg.epochs
    schedule = getattr(cfg, "schedule", "multistep")
    warmup = getattr(cfg, "warmup_epochs", 0.0)
    check_schedule(schedule, warmup, epochs)
    total = epochs * steps_per_epoch
    steps = torch.arange(total, dtype=torch.float64)
    # check_schedule keeps warmup_epochs < epochs, so only rounding (a half-epoch warm-up of a
    # one-step epoch) can reach the whole run; it then ends one step early, so the last step
    # always follows the schedule rather than the ramp.
    w = min(warmup_steps(warmup, steps_per_epoch), total - 1)
    if schedule == "multistep":
        epoch = torch.div(steps, steps_per_epoch, rounding_mode="floor")
        ms = torch.tensor(sorted(getattr(cfg, "milestones", ())), dtype=torch.float64)
        passed = (ms.view(1, -1) <= epoch.view(-1, 1)).sum(1) if len(ms) else torch.zeros(total, dtype=torch.int64)
        f = torch.full((total,), float(cfg.lr_decay), dtype=torch.float64).pow(passed.to(torch.float64))
    else:
        # progress through the steps after the warm-up, in [0, 1): the last step keeps a non-zero LR
        p = ((steps - w) / (total - w)).clamp_min(0.0)
        f = 1.0 - p if schedule == "linear" else 0.5 * (1.0 + torch.cos(math.pi * p))
    if w:
        f = f * ((steps + 1) / w).clamp(max=1.0)
    return f
