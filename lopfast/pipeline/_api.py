"""Access to the lopfast APIs the pipeline builds on, with a clear error when one is missing.

``lopfast.prune`` / ``lopfast.SPDistiller`` / ``lopfast.save`` live in other subpackages of
lopfast; looking them up at call time (not import time) keeps ``lopfast.pipeline`` importable
and lets every method that does not need a missing piece still run.
"""
from __future__ import annotations

import importlib
import types

import lopfast


class MissingAPIError(RuntimeError):
    """A lopfast API that a pipeline step needs is not available in this installation."""


# where each API lives, for installations whose lopfast/__init__ does not re-export it yet
_HOMES = {"prune": "lopfast.prune", "SPDistiller": "lopfast.distill", "save": "lopfast.io", "load": "lopfast.io"}


def require(name: str, needed_for: str):
    """Return ``lopfast.<name>`` or raise :class:`MissingAPIError` saying what needs it."""
    obj = getattr(lopfast, name, None)
    if obj is None and name in _HOMES:
        try:
            obj = getattr(importlib.import_module(_HOMES[name]), name, None)
        except ImportError:
            obj = None
    if isinstance(obj, types.ModuleType):
        # `import lopfast.prune` binds the subpackage to lopfast.prune unless lopfast/__init__
        # re-exports the function: take the function of the same name from the subpackage
        obj = getattr(obj, name, None)
    if obj is None:
        raise MissingAPIError(
            f"{needed_for} needs lopfast.{name}, which this lopfast installation does not provide "
            f"(its subpackage is missing or failed to import); update lopfast, or choose a method that does not need it"
        )
    return obj


def has(name: str) -> bool:
    """Whether ``lopfast.<name>`` is available."""
    try:
        require(name, "")
    except MissingAPIError:
        return False
    return True
