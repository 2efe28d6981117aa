"""Export a (contracted) model for deployment: ONNX, ``torch.export`` (.pt2), TorchScript.

* ``pt2`` (the default): ``torch.export.export`` -> ``torch.export.save`` (``stem.pt2``); load
  it back with ``torch.export.load(path).module()``. Needs no extra package.
* ``onnx``: ``torch.onnx.export`` (``stem.onnx``), batch dimension dynamic; needs ``onnx`` (and
  ``onnxscript`` for torch's default exporter since 2.9). With ``onnxruntime`` installed the file is
  run and compared with the PyTorch model.
* ``torchscript``: ``torch.jit.trace`` (``stem.ts``), kept for C++/mobile runtimes that still load
  it; deprecated since torch 2.10 (``torch.jit.load`` warns), so never the default.

Every format is checked after writing: the file is loaded back (onnxruntime for ONNX when it is
installed) and its outputs compared with the model's (:func:`check_export`).
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn

FORMATS = ("pt2", "onnx", "torchscript")
DEFAULT_FORMATS = ("pt2",)
_SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "torchscript": ".ts"}

__all__ = ["DEFAULT_FORMATS", "FORMATS", "check_export", "check_formats", "export_model", "load_exported"]


def check_formats(formats, argname: str = "format") -> list:
    """Validate a list of export format names (raises ValueError naming ``argname``)."""
    if isinstance(formats, str):
        formats = [formats]
    out = []
    for f in formats:
        f = "pt2" if f in ("torch.export", "export") else f
        if f not in FORMATS:
            raise ValueError(f"unknown {argname} {f!r}; choose from {', '.join(FORMATS)}")
        out.append(f)
    return out


def _example(example: torch.Tensor) -> torch.Tensor:
    # two samples: torch.export specialises a dimension of size 1, so batch 1 cannot stay dynamic
    example = example.detach().cpu().float().contiguous()
    return example[:2] if example.shape[0] >= 2 else torch.cat([example, example])


def export_model(model: nn.Module, stem: str, fmt: str, example: torch.Tensor, log: Callable = print,
                 check: bool = True, tol: float = 1e-4) -> Optional[str]:
    """Export ``model`` (in eval mode, on the CPU) to ``stem`` + the format's suffix; returns the path.

    ``fmt``: ``"pt2"`` (torch.export), ``"onnx"`` or ``"torchscript"``. ``example``: an input
    batch (its first one or two samples are used). The batch dimension stays dynamic for pt2 and
    ONNX. With ``check`` the written file is loaded back and compared (relative max difference
    ``<= tol``, else RuntimeError). Returns None, with a log line, when ONNX export is asked but
    ``onnx`` is not installed.
    """
    (fmt,) = check_formats([fmt])
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a Tensor, got {type(example).__name__}")
    model = copy.deepcopy(model).cpu().eval()
    example = _example(example)
    path = stem + _SUFFIX[fmt]
    if fmt == "pt2":
        batch = torch.export.Dim("batch", min=1)
        with torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, path)
    elif fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            log("[export] onnx is not installed: skipping ONNX export (pip install onnx onnxscript)")
            return None
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's advice about dynamic_axes vs dynamic_shapes
            torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, verbose=False)
    else:
        with torch.no_grad(), warnings.catch_warnings():
            # torch >= 2.10 marks TorchScript deprecated; it is still what C++/mobile runtimes load
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.trace(model, example).save(path)
    log(f"[export] wrote {path}")
    if check:
        err = check_export(model, path, example)
        if err is None:
            log(f"[export] {path}: onnxruntime is not installed, outputs not checked")
        elif not err <= tol:
            raise RuntimeError(f"[export] {path}: the exported model's outputs differ from the model's "
                               f"(relative max difference {err:.2e} > {tol:.0e})")
        else:
            log(f"[export] {path}: outputs match the model (relative max difference {err:.1e})")
    return path


def load_exported(path: str):
    """A callable for an exported file: the pt2 program's module, the TorchScript module, or an
    onnxruntime session wrapped to take and return tensors."""
    if path.endswith(".pt2"):
        return torch.export.load(path).module()
    if path.endswith(".ts"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu")
    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

        return run
    raise ValueError(f"path {path!r}: unknown export suffix (expected .pt2, .onnx or .ts)")


def check_export(model: nn.Module, path: str, example: torch.Tensor) -> Optional[float]:
    """Relative max difference between ``model`` and the exported file on ``example`` and on a batch
    of another size (the batch dimension is dynamic); None for ONNX without onnxruntime."""
    if path.endswith(".onnx"):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return None
    loaded = load_exported(path)
    model = model.cpu().eval()
    worst = 0.0
    other = torch.cat([example, example[:1]])  # 3 samples: not the traced batch size
    for x in (example, other) if not path.endswith(".ts") else (example,):
        with torch.no_grad():
            ref = model(x)
            out = loaded(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst
