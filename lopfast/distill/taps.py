"""Record the outputs of named modules during a forward pass (forward hooks, removed cleanly)."""
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from lopfast.checks import InvalidArgumentType
from lopfast.distill.pairs import unwrap


class FeatureTaps:
    """Forward hooks on the modules ``names`` of ``model`` that record their outputs.

    ``transform(name, output)`` (optional) is applied inside the hook and only its result is
    kept, so a large activation can be reduced at once (the teacher's Gram) and freed. If a
    module runs several times in one forward, the last call wins. A context manager; ``close()``
    removes every hook (idempotent).

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
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except Exception:  # pragma: no cover - leave nothing behind
            self.close()
            raise

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"tapped module {name!r} returned {type(output).__name__}, expected a Tensor")
            self.outputs[name] = output if self._transform is None else self._transform(name, output)
        return hook

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
