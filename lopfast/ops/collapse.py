"""The collapse op: effective kernels W = W3.W2.W1 of expanded convs, one layer or many at once.

Entry points:
    ``collapse(w1, w2, w3, groups, backend=None)``   one layer, differentiable
    ``collapse_many([(w1, w2, w3, groups), ...])``   every layer of a model in one grouped call

Backends (``lopfast.backend.resolve_backend``): ``"torch"`` is the reference
(``lopfast.layers.decompose.collapse``, a few einsums per layer); ``"triton"`` packs all
layers' factors into one flat buffer and runs the table-driven kernel of
``lopfast.kernels.collapse``: 1 launch forward and 1 backward for any number of layers (2 each
when a big layer is split, see the kernel module), plus one ``torch.cat`` each way;
``"cuda"`` runs the CUDA C++ fallback (``lopfast._C``), one layer at a time.

The Triton path is the torch.library op ``lopfast::collapse_packed`` (a ``triton_op`` with
``register_autograd``; its backward is ``lopfast::collapse_packed_backward``), so
torch.compile sees through it. It has deliberately NO separate CPU kernel: the backend is
chosen in Python before the op is called, so a forced ``backend="triton"`` on CPU tensors
under ``TRITON_INTERPRET=1`` really runs the Triton kernel (through the interpreter) instead
of being routed to a reference. On torch < 2.6 (no ``triton_op``) the same launchers run
inside a plain ``torch.autograd.Function``.

Flat layout (documented choice): the op concatenates the factors every call (one
``torch.cat``, a copy of all factors) rather than requiring them to be views into one flat
parameter buffer. The copy is one launch and O(parameters) bytes: measured for the 15-conv
ResNet-ish net of bench/bench_collapse.py at rate 3 (45 factors, 1.7 M floats) it takes
0.3 ms on one CPU thread against 14 ms for the reference collapse fwd+bwd of the same layers
(on an H100, 13.6 MB of traffic is ~10 us). It keeps every ``nn.Parameter`` an ordinary
tensor that optimizers, checkpoints, DDP buckets and ``expand``/``contract`` handle as before;
views into one flat buffer would save the copy but break as soon as anything re-assigns a
parameter (``load_state_dict(assign=True)``, ``surgery``, optimizer state restore). For
models with hundreds of millions of factor entries the copy becomes visible (~0.3 ms per
100 M floats on an H100) and a flat-parameter mode would be the next step. The gradient
comes back as one flat buffer whose per-factor pieces are views (``torch.split``'s backward
is a single ``cat``; its forward split is free), and ``AccumulateGrad`` stores them without a
copy: with ``zero_grad(set_to_none=True)`` all factor gradients share that one buffer.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lopfast import dispatch as _dispatch
from lopfast.backend import cuda_extension, is_auto, resolve_backend
from lopfast.layers.decompose import collapse as _reference_collapse

Layer = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]

from lopfast.kernels import HAS_TRITON  # noqa: E402

# Registering a triton_op without triton installed makes torch log a warning at import time
# (and the op could never run): register only where triton imports.
_HAS_TRITON_OP = HAS_TRITON and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")

_options = threading.local()


def _plan_opts() -> Tuple[int, str]:
    return getattr(_options, "block", 32), getattr(_options, "split", "auto")


@contextlib.contextmanager
def plan_options(block: int = 32, split: str = "auto") -> Iterator[None]:
    """Tuning knob of the Triton path: tile ``block`` (power of two >= 16) and ``split``
    ("auto", "never" = always one launch, "always" = two-stage everywhere). Mostly for tests
    and benchmarks; the defaults are what training should use."""
    old = _plan_opts()
    _options.block, _options.split = block, split
    try:
        yield
    finally:
        _options.block, _options.split = old


def reference_collapse(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The PyTorch reference (``lopfast.layers.decompose.collapse``)."""
    return _reference_collapse(w1, w2, w3, groups)


# ----------------------------------------------------------------------------- Triton op
def _kernels():
    from lopfast.kernels import collapse as kc  # imported lazily: triton is optional

    return kc


def _wrap():
    return torch.library.wrap_triton if _HAS_TRITON_OP else (lambda k: k)


def _packed_forward(flat: torch.Tensor, fwd_desc: torch.Tensor, fwd_tiles: torch.Tensor, fwd_split: int,
                    fwd_ws: int, out_numel: int, block: int) -> torch.Tensor:
    out = torch.empty(out_numel, device=flat.device, dtype=flat.dtype)
    return _kernels().launch_chain3(flat, flat, out, fwd_desc, fwd_tiles, fwd_split, fwd_ws, block, _wrap())


def _packed_backward(flat: torch.Tensor, grad: torch.Tensor, bwd_desc: torch.Tensor, bwd_tiles: torch.Tensor,
                     bwd_split: int, bwd_ws: int, block: int) -> torch.Tensor:
    out = torch.empty(flat.shape[0], device=flat.device, dtype=flat.dtype)
    # the incoming gradient may be expanded (stride 0, e.g. from .sum()) or in another dtype
    grad = grad.to(flat.dtype).contiguous()
    return _kernels().launch_chain3(flat, grad, out, bwd_desc, bwd_tiles, bwd_split, bwd_ws, block, _wrap())


if _HAS_TRITON_OP:

    @torch.library.triton_op("lopfast::collapse_packed_backward", mutates_args=())
    def collapse_packed_backward(flat: torch.Tensor, grad: torch.Tensor, bwd_desc: torch.Tensor,
                                 bwd_tiles: torch.Tensor, bwd_split: int, bwd_ws: int,
                                 block: int) -> torch.Tensor:
        """Flat factor gradients from the flat effective-kernel gradient (see kernels.collapse)."""
        return _packed_backward(flat, grad, bwd_desc, bwd_tiles, bwd_split, bwd_ws, block)

    @torch.library.triton_op("lopfast::collapse_packed", mutates_args=())
    def collapse_packed(flat: torch.Tensor, fwd_desc: torch.Tensor, fwd_tiles: torch.Tensor, fwd_split: int,
                        fwd_ws: int, bwd_desc: torch.Tensor, bwd_tiles: torch.Tensor, bwd_split: int,
                        bwd_ws: int, out_numel: int, block: int) -> torch.Tensor:
        """Flat effective kernels of all layers packed in ``flat`` (tables from ``plan_collapse``).

        The backward tables ride along so that the autograd formula has them."""
        return _packed_forward(flat, fwd_desc, fwd_tiles, fwd_split, fwd_ws, out_numel, block)

    def _setup_context(ctx, inputs, output):
        flat, _, _, _, _, bwd_desc, bwd_tiles, bwd_split, bwd_ws, _, block = inputs
        ctx.save_for_backward(flat, bwd_desc, bwd_tiles)
        ctx.bwd_split, ctx.bwd_ws, ctx.block = bwd_split, bwd_ws, block

    def _backward(ctx, grad):
        flat, bwd_desc, bwd_tiles = ctx.saved_tensors
        g = collapse_packed_backward(flat, grad, bwd_desc, bwd_tiles, ctx.bwd_split, ctx.bwd_ws, ctx.block)
        return (g,) + (None,) * 10

    collapse_packed.register_autograd(_backward, setup_context=_setup_context)

    def _apply_packed(flat, plan):
        return collapse_packed(flat, plan.fwd_desc, plan.fwd_tiles, plan.fwd_split, plan.fwd_ws,
                               plan.bwd_desc, plan.bwd_tiles, plan.bwd_split, plan.bwd_ws,
                               plan.out_numel, plan.block)

else:  # torch < 2.6: same launchers, plain autograd

    class _CollapsePacked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, flat, plan):
            ctx.save_for_backward(flat)
            ctx.plan = plan
            return _packed_forward(flat, plan.fwd_desc, plan.fwd_tiles, plan.fwd_split, plan.fwd_ws,
                                   plan.out_numel, plan.block)

        @staticmethod
        def backward(ctx, grad):
            (flat,) = ctx.saved_tensors
            p = ctx.plan
            return _packed_backward(flat, grad, p.bwd_desc, p.bwd_tiles, p.bwd_split, p.bwd_ws, p.block), None

    def _apply_packed(flat, plan):
        return _CollapsePacked.apply(flat, plan)


_plan_cache: Dict[tuple, object] = {}


def _get_plan(shapes, device: torch.device):
    block, split = _plan_opts()
    key = (shapes, block, split, str(device))
    plan = _plan_cache.get(key)
    if plan is None:
        # planning is pure Python over the shapes; cached, so it runs once per model
        plan = _kernels().plan_collapse(shapes, block=block, split=split).to(device)
        if len(_plan_cache) > 256:
            _plan_cache.clear()
        _plan_cache[key] = plan
    return plan


def _triton_many(layers: Sequence[Layer]) -> List[torch.Tensor]:
    kc = _kernels()
    shapes = tuple(kc.layer_shape(w1.shape, w2.shape, w3.shape, g) for w1, w2, w3, g in layers)
    plan = _get_plan(shapes, layers[0][0].device)
    flat = torch.cat([w.reshape(-1) for w1, w2, w3, _ in layers for w in (w1, w2, w3)])
    out = _apply_packed(flat, plan)
    pieces = torch.split(out, [s.out_numel for s in shapes])
    return [piece.view(s.G * s.n_g, s.m_g, s.kh, s.kw) for piece, s in zip(pieces, shapes)]


# ----------------------------------------------------------------------------- public API
def _check_layer(layer, i: int) -> Layer:
    try:
        w1, w2, w3, groups = layer
    except (TypeError, ValueError):
        raise TypeError(f"layer {i} must be a tuple (w1, w2, w3, groups), got {type(layer).__name__}") from None
    for name, w, dim in (("w1", w1, 4), ("w2", w2, 4), ("w3", w3, 4)):
        if not isinstance(w, torch.Tensor) or w.dim() != dim:
            raise ValueError(f"layer {i}: {name} must be a 4-d tensor, got {getattr(w, 'shape', type(w))}")
    if w1.dtype != w2.dtype or w2.dtype != w3.dtype or w1.device != w2.device or w2.device != w3.device:
        raise ValueError(f"layer {i}: w1, w2, w3 must share dtype and device")
    if w1.shape[2:] != (1, 1) or w3.shape[2:] != (1, 1):
        raise ValueError(f"layer {i}: w1 and w3 must be 1x1 kernels, got {tuple(w1.shape)} and {tuple(w3.shape)}")
    return w1, w2, w3, int(groups)


def _auto_candidates() -> Dict[str, object]:
    """The collapse backends that can run on CUDA here, each ``fn(layers) -> [W_eff, ...]``."""
    from lopfast.ops.cuda_ext import CollapseCuda

    cands: Dict[str, object] = {"torch": lambda ls: [reference_collapse(*layer) for layer in ls]}
    if HAS_TRITON:
        cands["triton"] = _triton_many
    if cuda_extension() is not None:
        cands["cuda"] = lambda ls: [CollapseCuda.apply(*layer) for layer in ls]
    return cands


def collapse_many(layers: Sequence[Layer], *, backend: Optional[str] = None) -> List[torch.Tensor]:
    """Effective kernels of many expanded convs at once, differentiable.

    ``layers``: a sequence of ``(w1, w2, w3, groups)`` (the factor shapes of
    ``ExpandedConv2d``: W1 (p, m_g, 1, 1), W2 (q, p_g, kh, kw), W3 (n, q_g, 1, 1)). Returns one
    (n, m_g, kh, kw) tensor per layer, in the factors' dtype. On the Triton backend all layers
    of one device and dtype are collapsed by one kernel launch (and differentiated by one).
    """
    checked = [_check_layer(layer, i) for i, layer in enumerate(layers)]
    if not checked:
        return []
    if torch.compiler.is_compiling():
        # Backend choice (a ContextVar) and planning (Python loops building int64 tables)
        # are host-side work dynamo cannot trace without graph breaks. Under torch.compile
        # the reference einsums are traced instead and Inductor generates their kernels;
        # to compile the Triton op itself, call torch.ops.lopfast.collapse_packed with a
        # plan built outside the compiled region.
        return [reference_collapse(*layer) for layer in checked]
    results: List[Optional[torch.Tensor]] = [None] * len(checked)
    buckets: Dict[tuple, List[int]] = {}
    for i, (w1, _, _, _) in enumerate(checked):
        buckets.setdefault((w1.device, w1.dtype), []).append(i)
    for (device, _), idx in buckets.items():
        name = resolve_backend(backend, device, "collapse")
        if _dispatch.tunable(device) and is_auto(backend, "collapse"):  # measured choice (lopfast.dispatch)
            group = [checked[i] for i in idx]
            name = _dispatch.choose(op="collapse", key=_dispatch.shape_key(group), device=device,
                                    candidates=_auto_candidates(), reference="torch", args=(group,), static=name)
        if name == "triton":
            outs = _triton_many([checked[i] for i in idx])
        elif name == "cuda":
            from lopfast.ops.cuda_ext import CollapseCuda

            outs = [CollapseCuda.apply(*checked[i]) for i in idx]
        else:
            outs = [reference_collapse(*checked[i]) for i in idx]
        for i, o in zip(idx, outs):
            results[i] = o
    return results  # type: ignore[return-value]


def collapse(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int = 1, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """Effective kernel W3.W2.W1 (per tap and group) of one expanded conv, differentiable.

    Same maths and shapes as ``lopfast.layers.decompose.collapse``; ``backend`` picks the
    implementation (None/"auto": Triton on CUDA tensors, the reference elsewhere).
    """
    return collapse_many([(w1, w2, w3, groups)], backend=backend)[0]


__all__ = ["collapse", "collapse_many", "plan_options", "reference_collapse"]
