"""Record the outputs of named modules during a forward pass (forward hooks, removed cleanly).

The hooks are small picklable objects that refer to their ``FeatureTaps`` weakly, and a copy of
a hooked model carries none that records: ``copy.deepcopy`` (an EMA or SWA copy made while
distilling) and pickling (``torch.save(model)``) turn each into :func:`inert_hook`, a module-level
function that does nothing. So the model can be saved or averaged mid-distillation, and its
copies never write into the taps (or keep them alive).
"""
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from lopfast.checks import InvalidArgumentType
from lopfast.distill.pairs import unwrap


def inert_hook(module: nn.Module, inputs: Any, output: Any) -> None:
    """The forward hook a ``FeatureTaps`` hook becomes in a copy of the model: records nothing."""
    return None


def _inert() -> Callable:
    return inert_hook


class _TapHook:
    """The forward hook of one tapped module: hands the output to its ``FeatureTaps`` while that
    exists. Deep copies and unpickled copies are :func:`inert_hook`."""

    def __init__(self, taps: "FeatureTaps", name: str) -> None:
        self.taps = weakref.ref(taps)
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        taps = self.taps()
        if taps is not None:
            taps._record(self.name, output)

    def __deepcopy__(self, memo) -> Callable:
        return inert_hook

    def __reduce__(self):
        return (_inert, ())


class FeatureTaps:
    """Forward hooks on the modules ``names`` of ``model`` that record their outputs.

    ``transform(name, output)`` (optional) is applied inside the hook and only its result is
    kept, so a large activation can be reduced at once (the teacher's Gram) and freed. If a
    module runs several times in one forward, the last call wins. A context manager; ``close()``
    removes every hook (idempotent). The hooked model stays picklable while tapped, and its deep
    copies are not tapped (module docstring).

    >>> with FeatureTaps(model, ["layer1", "layer2"]) as taps:
    ...     model(x)
    ...     feats = taps.collect()          # outputs in the order of ``names``
    """

    def __init__(self, model: nn.Module, names: Iterable[str],
                 transform: Optional[Callable[[str, Any], Any]] = None):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentType("model", model, "an nn.Module")
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise InvalidArgumentType("names", names, "a list of module names")
        self.names: List[str] = list(names)
        self.outputs: Dict[str, Any] = {}
        self._transform = transform
        self._handles = []
        inner = unwrap(model)
        modules = dict(inner.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing} in {type(inner).__name__}")
        try:
            for name in self.names:
                self._handles.append(modules[name].register_forward_hook(_TapHook(self, name)))
        except Exception:  # pragma: no cover - leave nothing behind
            self.close()
            raise

    def _record(self, name: str, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"tapped module {name!r} returned {type(output).__name__}, expected a Tensor")
        self.outputs[name] = output if self._transform is None else self._transform(name, output)

    def collect(self, clear: bool = True, names: Optional[Iterable[str]] = None) -> List[Any]:
        """The recorded outputs in the order of ``names`` (default: every tapped name); raises if
        one of them did not run."""
        names = self.names if names is None else list(names)
        missing = [n for n in names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"tapped modules {missing} did not run during the forward pass")
        out = [self.outputs[n] for n in names]
        if clear:
            self.clear()
        return out

    def ran(self) -> List[str]:
        """The tapped names whose module ran since the last ``clear``, in the order of ``names``."""
        return [n for n in self.names if n in self.outputs]

    def clear(self) -> None:
        self.outputs = {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
