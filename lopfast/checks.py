"""What lopfast checks at its entry points, with one message style: the argument, its value, what is accepted.

Every public entry point (the API functions and classes, each CLI subcommand, each pipeline
stage) checks its arguments here before it starts work, so a mistake costs a second, not an
hour, and never passes silently. The README's "Reliability" section lists what is checked
where.

* :class:`InvalidArgument` (a ``ValueError``) and :class:`InvalidArgumentType` (also a
  ``TypeError``) carry ``name`` / ``value`` / ``accepted``: the CLI rewrites ``name`` into the
  flag that set it (``momentum`` -> ``--momentum``).
* The ``check_*`` helpers validate one value and return it (normalised).
* :func:`nonfinite` / :func:`check_finite_module` find NaN / inf in a model's parameters and
  buffers (the boundaries: prune, expand, load, the pipeline stages). The hot ops (``sp_loss``,
  ``collapse``) do not check: a check there would cost a host sync per step; NaN flows through
  them as through any PyTorch op, and training checks once per epoch instead.
* :class:`TrainingDiverged`: training stopped on a non-finite loss or non-finite weights.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "InvalidArgument",
    "InvalidArgumentType",
    "NonFiniteValues",
    "TrainingDiverged",
    "check_bool",
    "check_latency_budget",
    "check_choice",
    "check_finite_module",
    "check_finite_tensors",
    "check_int",
    "check_module",
    "check_number",
    "check_str",
    "check_str_list",
    "closest",
    "nonfinite",
    "range_words",
]


class InvalidArgument(ValueError):
    """A bad argument, named: ``"<name> must be <accepted>, got <value>"`` (+ a hint)."""

    def __init__(self, name: str, value: Any, accepted: str, hint: str = "") -> None:
        self.name, self.value, self.accepted, self.hint = name, value, accepted, hint
        super().__init__(self.message(name))

    def message(self, name: str) -> str:
        """The message with the argument called ``name`` (the CLI passes the flag)."""
        text = f"{name} must be {self.accepted}, got {_show(self.value)}"
        return f"{text}; {self.hint}" if self.hint else text

    def __reduce__(self):  # picklable across processes (reproduce --parallel)
        return (type(self), (self.name, self.value, self.accepted, self.hint))


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong type (catchable as ``TypeError`` and as ``ValueError``)."""


class NonFiniteValues(InvalidArgument):
    """NaN or inf where lopfast needs finite numbers; ``tensors`` names the offending ones."""

    def __init__(self, name: str, tensors: Sequence[str], hint: str = "") -> None:
        self.tensors = list(tensors)
        super().__init__(name, self.tensors, "finite (no NaN or inf)", hint)

    def message(self, name: str) -> str:
        text = f"{name} holds NaN or infinite values (in {_list(self.tensors)})"
        return f"{text}; {self.hint}" if self.hint else text

    def __reduce__(self):
        return (type(self), (self.name, self.tensors, self.hint))


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss, weights or buffers; the stage stopped.

    ``stage`` (e.g. ``"pretrain"``, ``"lop"``), ``epoch`` (1-based) and ``checkpoint`` (the last
    good epoch checkpoint, or None) say where.
    """

    def __init__(self, message: str, *, stage: str = "", epoch: int = 0, checkpoint: Optional[str] = None) -> None:
        super().__init__(message)
        self.stage, self.epoch, self.checkpoint = stage, epoch, checkpoint

    def __reduce__(self):
        return (_rebuild_diverged, (str(self), self.stage, self.epoch, self.checkpoint))


def _rebuild_diverged(message, stage, epoch, checkpoint):
    return TrainingDiverged(message, stage=stage, epoch=epoch, checkpoint=checkpoint)


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        text = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    elif isinstance(value, nn.Module):
        text = f"a {type(value).__name__}"
    else:
        text = repr(value)
        if text.startswith("<"):  # <object at 0x...>: the type says more
            text = f"a {type(value).__name__}"
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------------------- scalars
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(value: Any, name: str, *, min: Optional[int] = None, max: Optional[int] = None,
              none: bool = False) -> Optional[int]:
    """An ``int`` (not a bool) in ``[min, max]``; ``None`` passes when ``none``."""
    if value is None and none:
        return None
    accepted = range_words("int", min, max) + (" or None" if none else "")
    if not _is_int(value):
        raise InvalidArgumentType(name, value, accepted)
    if (min is not None and value < min) or (max is not None and value > max):
        raise InvalidArgument(name, value, accepted)
    return value


def check_number(value: Any, name: str, *, min: Optional[float] = None, max: Optional[float] = None,
                 min_open: bool = False, max_open: bool = False, none: bool = False,
                 accepted: Optional[str] = None, hint: str = "") -> Optional[float]:
    """A finite real number (int or float, not a bool) in the given interval; returned as given."""
    if value is None and none:
        return None
    words = accepted or range_words("number", min, max, min_open, max_open) + (" or None" if none else "")
    if not _is_number(value):
        raise InvalidArgumentType(name, value, words, hint)
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgument(name, value, words, hint)
    if min is not None and (v < min or (min_open and v == min)):
        raise InvalidArgument(name, value, words, hint)
    if max is not None and (v > max or (max_open and v == max)):
        raise InvalidArgument(name, value, words, hint)
    return value


def range_words(noun: str, lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    """What an int or number check accepts, in words: "a positive int", "a finite number >= 0", "a number in [0, 1)" ... (``noun``: int or number)."""
    a = "an int" if noun == "int" else "a finite number"
    if hi is None and ((noun == "int" and lo == 1) or (noun != "int" and lo == 0 and lo_open)):
        return f"a positive {noun}"
    if lo is not None and hi is not None:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"{'an int' if noun == 'int' else 'a number'} in {left}{lo!r}, {hi!r}{right}"
    if lo is not None:
        return f"{a} {'>' if lo_open else '>='} {lo!r}"
    if hi is not None:
        return f"{a} {'<' if hi_open else '<='} {hi!r}"
    return a


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentType(name, value, "True or False")
    return value


def check_str(value: Any, name: str, *, none: bool = False, empty: bool = False) -> Optional[str]:
    if value is None and none:
        return None
    accepted = ("a string" if empty else "a non-empty string") + (" or None" if none else "")
    if not isinstance(value, str):
        raise InvalidArgumentType(name, value, accepted)
    if not value and not empty:
        raise InvalidArgument(name, value, accepted)
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    if value not in choices:
        words = "one of " + ", ".join(repr(c) for c in choices)
        hint = ""
        if isinstance(value, str):
            near = closest(value, [c for c in choices if isinstance(c, str)])
            hint = f"did you mean {near!r}?" if near else ""
        raise InvalidArgument(name, value, words, hint)
    return value


def check_str_list(value: Any, name: str, *, none: bool = False, empty: bool = False,
                   unique: bool = True, split: bool = True) -> Optional[List[str]]:
    """A list of non-empty strings (a comma-separated string is split when ``split``); no duplicates
    when ``unique``; may be empty only when ``empty``."""
    if value is None and none:
        return None
    accepted = "a list of names" + (" or None" if none else "")
    if isinstance(value, str) and split:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgumentType(name, value, accepted)
    value = list(value)
    if not value and not empty:
        raise InvalidArgument(name, value, "a non-empty list of names")
    if unique:
        dup = sorted({v for v in value if value.count(v) > 1})
        if dup:
            raise InvalidArgument(name, value, "a list of distinct names", f"{dup} appear more than once")
    return value


def check_latency_budget(latency: bool, allocation: Optional[str], global_pruning: bool, *,
                         target: Any = None, target_name: str = "target",
                         budget_name: str = "target_speedup") -> Optional[str]:
    """The one rule of a latency budget (``lopfast.prune(budget="latency")``, ``--target-speedup``):
    the netadapt allocation meets it from per-layer latencies, so it takes no other allocation, no
    global pruning and no parameter target (``target``, when given explicitly); and netadapt serves
    a latency budget only. Returns the allocation to use. ``budget_name`` / ``target_name`` are how
    the caller spells the budget and the target in its messages."""
    why = "a latency budget is met by the netadapt allocation (per-layer latencies)"
    if not latency:
        if allocation == "netadapt":
            raise InvalidArgument("allocation", allocation, f"netadapt only with {budget_name}",
                                  f"netadapt meets a latency budget: pass {budget_name}")
        return allocation
    if allocation not in (None, "netadapt"):
        raise InvalidArgument("allocation", allocation, f"unset with {budget_name}", why)
    if global_pruning:
        raise InvalidArgument("global_pruning", True, f"unset with {budget_name}", why)
    if target is not None:
        raise InvalidArgument(target_name, target, f"unset with {budget_name}",
                              "the latency budget decides how much to remove; give one of the two")
    return "netadapt"


def check_module(value: Any, name: str) -> nn.Module:
    if not isinstance(value, nn.Module):
        hint = ""
        if isinstance(value, str):
            hint = "build the model first (e.g. lopfast.build_model(name) or lopfast.load(path))"
        raise InvalidArgumentType(name, value, "an nn.Module", hint)
    return value


def closest(word: str, names: Iterable[str], n: int = 1) -> Optional[str]:
    """The name in ``names`` closest to ``word`` (for "did you mean" hints), or None."""
    import difflib

    hits = difflib.get_close_matches(word, list(names), n=n, cutoff=0.6)
    return hits[0] if hits else None


# ---------------------------------------------------------------------------- finite tensors
def nonfinite(named: Iterable[Tuple[str, Any]]) -> List[str]:
    """Names of the floating-point tensors of ``named`` that hold a NaN or an infinity.

    One device-to-host transfer in all (the per-tensor flags are stacked), not one per tensor.
    """
    items = [(n, t) for n, t in named
             if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not t.is_meta
             and t.numel()]
    if not items:
        return []
    with torch.no_grad():
        flags = [torch.isfinite(t).all() for _, t in items]
        ok = [bool(f) for f in torch.stack([f.to(flags[0].device) for f in flags]).tolist()]
    return [n for (n, _), good in zip(items, ok) if not good]


def _list(names: List[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def check_finite_tensors(named: Iterable[Tuple[str, Any]], name: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteValues` naming ``name`` and its non-finite tensors, if any."""
    bad = nonfinite(named)
    if bad:
        raise NonFiniteValues(name, bad, hint)


def check_finite_module(model: nn.Module, name: str = "model", hint: str = "") -> None:
    """Every floating parameter and buffer of ``model`` finite, or an error naming ``name`` and them."""
    check_finite_tensors(_named_state(model), name, hint)


def _named_state(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()
