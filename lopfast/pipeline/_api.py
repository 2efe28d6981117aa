"""Access to the lopfast APIs the pipeline builds on, with a clear error when one is missing.

``lopfast.prune`` / ``lopfast.SPDistiller`` / ``lopfast.save`` live in other subpackages of
lopfast; looking them up at call time (not import time) keeps ``lopfast.pipeline`` importable
and lets every method that does not need a missing piece still run.
"""
from __future__ import annotations

import lopfast


class MissingAPIError(RuntimeError):
    """A lopfast API that a pipeline step needs is not available in this installation."""


def require(name: str, needed_for: str):
    """Return ``lopfast.<name>`` or raise :class:`MissingAPIError` saying what needs it."""
    obj = getattr(lopfast, name, None)
    if obj is None:
        raise MissingAPIError(
            f"{needed_for} needs lopfast.{name}, which this lopfast installation does not provide "
            f"(its subpackage is missing or failed to import); update lopfast, or choose a method that does not need it"
        )
    return obj


def has(name: str) -> bool:
    return getattr(lopfast, name, None) is not None
