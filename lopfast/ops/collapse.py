"""The collapse op: effective kernels W = W3.W2.W1 of expanded convs, one layer or many at once.

Entry points:
    ``collapse(w1, w2, w3, groups, backend=None)``   one layer, differentiable
    ``collapse_many([(w1, w2, w3, groups), ...])``   every layer of a model in one grouped call
    ``reference_collapse(w1, w2, w3, groups)``       the PyTorch reference (a few einsums)

Backends:

``"torch"``   the reference, two einsums per layer (their backward: four more).
``"matmul"``  folded GEMMs on torch.matmul (``lopfast.ops.collapse_gemm``): the kernel taps folded
              into a GEMM dimension, layers bucketed by shape class, one batched matmul per class
              and product; cuBLAS-class on large layers, few launches for many small ones, and
              plain torch code (compiles under ``torch.compile(fullgraph=True)``).
``"triton"``  the same folded products as one persistent grouped-GEMM launch per phase over all
              layers of the model (``lopfast.kernels.collapse``): forward 2 launches, backward
              4 (more only when both association orders or unaligned layers occur), plus the
              packing copies. fp32/fp16/bf16; fp64 goes to "matmul" (no fp64 ``tl.dot`` on sm_90).
``"cuda"``    the CUDA C++ fallback (``lopfast._C``), one layer at a time.
``"auto"``    on CUDA, routed per shape class by the measured dispatch (``route``): each class of
              layers goes to the backend that ran it fastest (``lopfast.dispatch.choose``, key =
              that class's shapes and dtype), and every class that chose "triton" shares one
              grouped launch per phase. Typically the many small classes of a model take the
              grouped Triton GEMM and its large ones cuBLAS ("matmul"). On CPU: the reference.
              With ``LOPFAST_DISPATCH=off``: ``lopfast.backend.resolve_backend`` (Triton on
              CUDA) for every class. Under torch.compile: "matmul" (see ``collapse_many``).

Launches of one ``collapse_many`` call (one device and dtype), kernels only (the packing copies
come on top: "triton" 1 cat + 1 W2 stack per class + 1 unpack copy per class; "matmul" up to 3
stacking copies + 1 layout copy per class):

    ================  ===========================================  ==========================
    route             forward                                      backward
    ================  ===========================================  ==========================
    all "triton"      2 (3-4 with both association orders or       4 (up to 8 likewise)
                      unaligned widths), whatever the layer count
    all "matmul"      2 per shape class                            4 per shape class
    auto (hybrid)     2 per "matmul" class + the grouped Triton's  4 per "matmul" class + 4
                      2 for all "triton" classes together          (up to 8) for the Triton
    ================  ===========================================  ==========================

"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lopfast import dispatch as _dispatch
from lopfast import graphs
from lopfast.backend import cuda_extension, is_auto, op_backends, register_backend, resolve_backend
from lopfast.ops.collapse_gemm import Layer, bucket, matmul_many, shape_class

# "matmul" exists for the collapse only: declared to the shared resolver, so backend="matmul"
# and use_backend("matmul") reach it, and the measured dispatch may pick it.
register_backend("collapse", "matmul")

from lopfast.kernels import HAS_TRITON  # noqa: E402

# Registering a triton_op without triton installed makes torch log a warning at import time
# (and the op could never run): register only where triton imports.
_HAS_TRITON_OP = HAS_TRITON and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")

from lopfast.ops._precision import fp32_matmul_precision  # noqa: E402


def reference_collapse(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The PyTorch reference: effective kernel of the 1x1 -> kxk -> 1x1 chain: W = W3 . W2 . W1 per tap and group.

    Differentiable; the contraction order is chosen by cost (it matters when n and m differ).
    Returns a tensor of shape (n, m_g, kh, kw) in the dtype of the inputs.
    """
    # the same shape check and association rule as the folded GEMMs (collapse_gemm.ShapeClass)
    c = shape_class(w1, w2, w3, groups)
    G, n_g, m_g, p_g, q_g, kh, kw = c.G, c.n, c.m, c.p, c.q, c.kh, c.kw
    a1 = w1.reshape(G, p_g, m_g)
    a2 = w2.reshape(G, q_g, p_g, kh * kw)
    a3 = w3.reshape(G, n_g, q_g)
    if c.left:  # (W3 W2) W1: n q p + n p m per tap, against W3 (W2 W1): q p m + n q m
        t = torch.einsum("gnq,gqpt->gnpt", a3, a2)
        out = torch.einsum("gnpt,gpm->gnmt", t, a1)
    else:
        t = torch.einsum("gqpt,gpm->gqmt", a2, a1)
        out = torch.einsum("gnq,gqmt->gnmt", a3, t)
    return out.reshape(G * n_g, m_g, kh, kw)



# ----------------------------------------------------------------------------- Triton op
def _kernels():
    from lopfast.kernels import collapse as kc  # imported lazily: triton is optional

    return kc


def _wrap():
    return torch.library.wrap_triton if _HAS_TRITON_OP else (lambda k: k)


def _fwd_impl(x, tables, fwd, sizes, prec):
    return _kernels().collapse_forward(x, tables, fwd, sizes, prec, _wrap())


def _bwd_impl(x, ws, grad, tables, bwd, sizes, prec):
    return _kernels().collapse_backward(x, ws, grad, tables, bwd, sizes, prec, _wrap())


if _HAS_TRITON_OP:

    @torch.library.triton_op("lopfast::collapse_grouped_backward", mutates_args=())
    def collapse_grouped_backward(x: torch.Tensor, ws: torch.Tensor, grad: torch.Tensor, tables: torch.Tensor,
                                  bwd: List[int], sizes: List[int], prec: str) -> torch.Tensor:
        """Gradient of the packed factors from the gradient of the packed canonical kernels."""
        return _bwd_impl(x, ws, grad, tables, bwd, sizes, prec)

    @torch.library.triton_op("lopfast::collapse_grouped", mutates_args=())
    def collapse_grouped(x: torch.Tensor, tables: torch.Tensor, fwd: List[int], bwd: List[int],
                         sizes: List[int], prec: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed canonical effective kernels of all layers packed in ``x`` (tables from
        ``lopfast.kernels.collapse.plan_collapse``), and the forward workspace the backward reuses.

        The backward launch list rides along so that the autograd formula has it."""
        return _fwd_impl(x, tables, fwd, sizes, prec)

    def _setup_context(ctx, inputs, output):
        x, tables, _, bwd, sizes, prec = inputs
        ctx.save_for_backward(x, output[1], tables)
        ctx.bwd, ctx.sizes, ctx.prec = bwd, sizes, prec

    def _backward(ctx, grad, _grad_ws):
        x, ws, tables = ctx.saved_tensors
        return collapse_grouped_backward(x, ws, grad, tables, ctx.bwd, ctx.sizes, ctx.prec), None, None, None, None, None

    collapse_grouped.register_autograd(_backward, setup_context=_setup_context)

    def _apply_grouped(x, plan, prec):
        return collapse_grouped(x, plan.tables.view(-1), plan.fwd, plan.bwd, plan.sizes, prec)[0]

else:  # torch < 2.6: same launchers, plain autograd

    class _CollapseGrouped(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, plan, prec):
            out, ws = _fwd_impl(x, plan.tables.view(-1), plan.fwd, plan.sizes, prec)
            ctx.save_for_backward(x, ws)
            ctx.plan, ctx.prec = plan, prec
            return out

        @staticmethod
        def backward(ctx, grad):
            x, ws = ctx.saved_tensors
            p = ctx.plan
            return _bwd_impl(x, ws, grad, p.tables.view(-1), p.bwd, p.sizes, ctx.prec), None, None

    def _apply_grouped(x, plan, prec):
        return _CollapseGrouped.apply(x, plan, prec)


_plan_cache: Dict[tuple, object] = {}
_zero_cache: Dict[tuple, torch.Tensor] = {}


_PLAN_CACHE_SIZE = 256


def _get_plan(specs, device: torch.device):
    """The launch plan of ``specs`` on ``device`` (its tables on the device), cached: planning is
    pure Python over the shapes and runs once per model. The cache drops its oldest plan past
    ``_PLAN_CACHE_SIZE``; a plan whose tables a captured graph reads stays alive with that graph
    (``_TritonPack.run`` retains it), whatever the cache does."""
    key = (specs, str(device))
    plan = _plan_cache.pop(key, None)
    if plan is None:
        plan = _kernels().plan_collapse(specs).to(device)
        while len(_plan_cache) >= _PLAN_CACHE_SIZE:
            del _plan_cache[next(iter(_plan_cache))]
    _plan_cache[key] = plan  # most recently used last
    return plan


def _zeros(n: int, like: torch.Tensor) -> torch.Tensor:
    """A slice of a cached zero buffer: padding pieces for the pack without a launch each."""
    key = (like.device, like.dtype)
    z = _zero_cache.get(key)
    if z is None:
        z = _zero_cache[key] = torch.zeros(_kernels().ALIGN, device=like.device, dtype=like.dtype)
    return z[:n]


class _TritonPack:
    """The grouped Triton launch for one list of layer shapes, planned once: shape classes, the
    launch plan (its tables already on the device) and where each factor goes in the packed
    buffer. ``run(layers, dtype)`` only packs, launches and unpacks."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        kc = _kernels()
        self.groups = [(c, idx) for (c, _, _), idx in bucket(layers).items()]
        specs = tuple(kc.ClassSpec(len(idx), c.G, c.n, c.m, c.p, c.q, c.T, c.left) for c, idx in self.groups)
        self.plan = _get_plan(specs, layers[0][0].device)

    def run(self, layers: Sequence[Layer], dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
        """Kernels of ``layers`` (of the planned shapes) computed in ``dtype`` (None: the factors')."""
        groups, plan = self.groups, self.plan
        ref = layers[0][0]
        # pack: per class all W1, all W2 in the canonical (q, T, p) layout, all W3; 16-aligned segments
        pieces: List[torch.Tensor] = []
        pos = 0

        def put(t: torch.Tensor, at: int) -> None:
            nonlocal pos
            if at > pos:
                pieces.append(_zeros(at - pos, ref))
            pieces.append(t)
            pos = at + t.numel()

        for (c, idx), lay in zip(groups, plan.layouts):
            G, n, m, p, q, T = c.G, c.n, c.m, c.p, c.q, c.T
            for k, i in enumerate(idx):
                put(layers[i][0].reshape(-1), lay.w1 + k * G * p * m)
            w2c = torch.stack([layers[i][1].reshape(G, q, p, T).transpose(-1, -2) for i in idx])
            put(w2c.reshape(-1), lay.w2)
            for k, i in enumerate(idx):
                put(layers[i][2].reshape(-1), lay.w3 + k * G * n * q)
        if plan.x_numel > pos:
            pieces.append(_zeros(plan.x_numel - pos, ref))
        x = torch.cat(pieces)
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype)  # one cast of the whole pack (its backward: one cast of the packed gradient)
        graphs.retain(plan)  # under capture: the graph reads plan.tables at every replay
        out = _apply_grouped(x, plan, fp32_matmul_precision() if x.dtype == torch.float32 else "ieee")
        results: List[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
        for (c, idx), lay in zip(groups, plan.layouts):
            L, G, n, m, T = len(idx), c.G, c.n, c.m, c.T
            w = out[lay.out:lay.out + L * G * n * T * m].view(L, G * n, T, m).transpose(-1, -2)
            w = w.contiguous().view(L, G * n, m, c.kh, c.kw)
            for i, wi in zip(idx, w.unbind(0)):
                results[i] = wi
        return results


def _triton_many(layers: Sequence[Layer], dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """All layers (one device, fp32/fp16/bf16) through the grouped Triton GEMM, computed in
    ``dtype`` (None: the factors' dtype) with fp32 accumulation."""
    return _TritonPack(layers).run(layers, dtype)


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
    try:
        groups = operator.index(groups)
    except TypeError:
        raise TypeError(f"layer {i}: groups must be an int, got {groups!r}") from None
    try:
        shape_class(w1, w2, w3, groups)
    except ValueError as exc:
        raise ValueError(f"layer {i}: {exc}") from None
    return w1, w2, w3, groups


BACKENDS = op_backends("collapse")  # every name backend= accepts here, "matmul" included


def available_backends(device: torch.device, dtype: torch.dtype) -> Tuple[str, ...]:
    """Collapse backends that run natively on tensors of ``device``/``dtype`` on this machine:
    the candidates a measured ``auto`` (lopfast.dispatch) times against the reference. "cuda"
    (the C++ fallback) is left to the caller, since probing it may build the extension.
    ``dtype`` is the dtype the collapse computes in."""
    from lopfast.backend import triton_interpreting

    names = ["torch", "matmul"]
    on_triton = device.type == "cuda" or triton_interpreting()
    if HAS_TRITON and on_triton and dtype in (torch.float32, torch.float16, torch.bfloat16):
        names.append("triton")  # fp64 would run on "matmul" anyway: not a separate candidate
    return tuple(names)


def _cast_layers(layers: Sequence[Layer], dtype: Optional[torch.dtype]) -> List[Layer]:
    if dtype is None:
        return list(layers)
    return [(w1.to(dtype), w2.to(dtype), w3.to(dtype), g) for w1, w2, w3, g in layers]


def _run(name: str, layers: Sequence[Layer], dtype: Optional[torch.dtype] = None,
         pack: Optional[_TritonPack] = None) -> List[torch.Tensor]:
    """``layers`` on backend ``name``, computed in ``dtype`` (None: the factors' dtype); "triton"
    through ``pack`` when the caller planned it already."""
    if name == "triton":
        return (pack or _TritonPack(layers)).run(layers, dtype)
    if name == "matmul":
        return matmul_many(layers, dtype=dtype)
    if name == "cuda":
        from lopfast.ops.cuda_ext import CollapseCuda

        return [CollapseCuda.apply(*layer) for layer in _cast_layers(layers, dtype)]
    return [reference_collapse(*layer) for layer in _cast_layers(layers, dtype)]


def _auto_candidates(device: torch.device, factor_dtype: torch.dtype,
                     dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """The collapse backends the measured dispatch times here, each ``fn(layers) -> [W_eff, ...]``
    computing in ``dtype`` (None: the factors' dtype ``factor_dtype``)."""
    names = list(available_backends(device, dtype or factor_dtype))
    if device.type == "cuda" and cuda_extension() is not None:
        names.append("cuda")
    return {name: (lambda ls, name=name: _run(name, ls, dtype)) for name in names}


def _resolve(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The collapse implementation for an explicit ``backend`` (or the static default of ``auto``)
    on ``device``/``dtype``; fp64 never goes to Triton (no fp64 ``tl.dot`` on sm_90)."""
    name = resolve_backend(backend, device, "collapse")  # "matmul" is registered for the collapse
    if name == "triton" and dtype == torch.float64:
        name = "matmul"  # sm_90 has no fp64 tl.dot: the folded GEMMs on torch.matmul instead
    return name


def _compute_dtype(dtype: Optional[torch.dtype], factor_dtype: torch.dtype) -> Optional[torch.dtype]:
    """None when the collapse computes in the factors' own dtype."""
    return None if dtype is None or dtype == factor_dtype else dtype


def route(layers: Sequence[Layer], backend: Optional[str] = None,
          dtype: Optional[torch.dtype] = None) -> Dict[str, List[int]]:
    """Which backend runs which layers of ``collapse_many(layers, backend=backend, dtype=dtype)``:
    a dict from backend name to layer indices (layers of one device and dtype, already validated).

    An explicit backend (argument or ``use_backend``) takes every layer. ``auto`` on a device
    the dispatch measures (CUDA) routes per *shape class* (``lopfast.ops.collapse_gemm.bucket``):
    ``lopfast.dispatch.choose`` times the candidates on that class's own layers (key: their
    shapes, strides, dtype and the compute dtype) and the class goes where it ran fastest. All
    classes that chose "triton" then share ONE grouped launch per phase, so small classes pay the
    launch cost once for the whole model while large ones can take cuBLAS ("matmul"). Elsewhere
    (CPU): the reference, untimed.
    """
    w1 = layers[0][0]
    device = w1.device
    cd = _compute_dtype(dtype, w1.dtype)
    static = _resolve(backend, device, cd or w1.dtype)
    if not (_dispatch.tunable(device) and is_auto(backend, "collapse")):
        return {static: list(range(len(layers)))}
    cands = _auto_candidates(device, w1.dtype, cd)
    routes: Dict[str, List[int]] = {}
    for _, idx in bucket(layers).items():
        sub = [layers[i] for i in idx]
        key = _dispatch.shape_key(sub) if cd is None else (_dispatch.shape_key(sub), cd)
        name = _dispatch.choose(op="collapse", key=key, device=device,
                                candidates=cands, reference="torch", args=(sub,), static=static)
        routes.setdefault(name, []).extend(idx)
    return {name: sorted(idx) for name, idx in routes.items()}


def _check_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    return dtype


class CollapseProgram:
    """``collapse_many`` prepared once for one list of layers (the host out of the hot path).

    Built from the layer list, it validates the layers, and at its first call routes them (the
    measured dispatch may time candidates there, on that call's own factors) and plans the
    grouped Triton launch (shape classes, launch tables uploaded to the device once, where each
    factor goes in the pack). Every later call only packs, launches and unpacks: no validation,
    no routing, no planning. ``signature`` says what the program was built for (factor
    identities, addresses, shapes, dtypes, ``requires_grad``, groups) and ``context`` under which
    settings (``backend``, ``dtype``, ``lopfast.use_backend``, ``LOPFAST_DISPATCH``, the
    dispatch's timing mode); a caller that holds a program rebuilds it when either changes
    (``lopfast.CollapsedForward`` does, and costs about 1 us per factor per call to check).
    """

    def __init__(self, layers: Sequence[Layer], *, backend: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.backend, self.dtype = backend, _check_dtype(dtype)
        checked = [_check_layer(layer, i) for i, layer in enumerate(layers)]
        self.signature = self.signature_of(checked)
        self.context = self.context_of(backend, dtype)
        self.n = len(checked)
        self._runs: Optional[List[Tuple[List[int], object]]] = None

    @staticmethod
    def signature_of(layers: Sequence[Layer]) -> tuple:
        """What a program (or a captured graph) of ``layers`` depends on: which tensors, their
        addresses, shapes, strides, dtypes and ``requires_grad``, and the groups. (A new dtype or
        device means new storage, hence a new address.)"""
        return tuple((id(w), w.data_ptr(), w.requires_grad, w.shape, w.stride())
                     for layer in layers for w in layer[:3]) + tuple(int(layer[3]) for layer in layers)

    @staticmethod
    def context_of(backend: Optional[str], dtype: Optional[torch.dtype]) -> tuple:
        """The settings a program's routing depends on besides its layers."""
        from lopfast.backend import get_backend

        return (backend, dtype, get_backend(), _dispatch._env_mode(), _dispatch.timing_mode())

    def __call__(self, layers: Sequence[Layer]) -> List[torch.Tensor]:
        """The effective kernels of ``layers`` (the layers the program was built for; checked
        only by length here: see ``signature``)."""
        if len(layers) != self.n:
            raise ValueError(f"this CollapseProgram was built for {self.n} layers, got {len(layers)}")
        if self._runs is None:
            self._runs = _plan_runs(layers, self.backend, self.dtype)
        return _execute(self._runs, layers)


def _plan_runs(layers: Sequence[Layer], backend: Optional[str], dtype: Optional[torch.dtype]) -> List[tuple]:
    """``[(layer indices, fn(those layers) -> kernels), ...]``: the routed backends of ``layers``
    (validated), by device and dtype; the Triton route planned (``_TritonPack``)."""
    runs: List[tuple] = []
    buckets: Dict[tuple, List[int]] = {}
    for i, (w1, _, _, _) in enumerate(layers):
        buckets.setdefault((w1.device, w1.dtype), []).append(i)
    for idx in buckets.values():
        group = [layers[i] for i in idx]
        cd = _compute_dtype(dtype, group[0][0].dtype)
        for name, sub in route(group, backend, dtype).items():
            members = [idx[j] for j in sub]
            pack = _TritonPack([layers[i] for i in members]) if name == "triton" else None
            runs.append((members, lambda ls, name=name, cd=cd, pack=pack: _run(name, ls, cd, pack)))
    return runs


def _execute(runs: List[tuple], layers: Sequence[Layer]) -> List[torch.Tensor]:
    results: List[Optional[torch.Tensor]] = [None] * len(layers)
    for members, run in runs:
        for i, o in zip(members, run([layers[i] for i in members])):
            results[i] = o
    return results  # type: ignore[return-value]


def collapse_many(layers: Sequence[Layer], *, backend: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Effective kernels of many expanded convs at once, differentiable.

    ``layers``: a sequence of ``(w1, w2, w3, groups)`` (the factor shapes of
    ``ExpandedConv2d``: W1 (p, m_g, 1, 1), W2 (q, p_g, kh, kw), W3 (n, q_g, 1, 1)). Returns one
    (n, m_g, kh, kw) tensor per layer. ``backend``: see the module docstring; on "matmul" each
    shape class costs one batched GEMM per product, on "triton" all layers of one device and
    dtype share 2 grouped-GEMM launches forward and 4 backward (a few more when both
    association orders or unaligned widths occur). ``auto`` on CUDA routes each shape class to
    its measured fastest backend (``route``). An explicit backend (argument or
    ``lopfast.use_backend``) runs every layer on exactly that backend. NaN / inf in the factors
    propagate to the kernels as in PyTorch ops (no check in a hot op: it would cost a host sync);
    ``lopfast.expand`` and training check at their boundaries.

    ``dtype``: the precision the products run in (None: the factors' dtype). With fp32 factors
    and ``dtype=torch.bfloat16`` (what a bf16 autocast step asks for: ``lopfast.CollapsedForward``
    and ``ExpandedConv2d`` pass autocast's dtype) the factors are rounded to bf16, multiplied with
    fp32 accumulation, the kernels come out in bf16 (the dtype the autocast conv would cast them
    to anyway) and the factor gradients go back in fp32. fp32 products are IEEE unless TF32 is
    allowed (``lopfast.ops._precision.fp32_matmul_precision``).

    A caller that collapses the same layers every step can hold a ``CollapseProgram`` instead,
    which does the validation, routing and planning once.
    """
    _check_dtype(dtype)
    checked = [_check_layer(layer, i) for i, layer in enumerate(layers)]
    if not checked:
        return []
    if torch.compiler.is_compiling():
        # Backend choice (a ContextVar) and the Triton planning (Python loops building int64
        # tables) are host-side work dynamo cannot trace without graph breaks. Under
        # torch.compile the folded GEMMs ("matmul", plain differentiable torch ops) are traced
        # instead, or the einsum reference when backend="torch" is asked for explicitly.
        if backend == "torch":
            return [reference_collapse(*layer) for layer in _cast_layers(checked, dtype)]
        return matmul_many(checked, dtype=dtype)
    return _execute(_plan_runs(checked, backend, dtype), checked)


def collapse(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int = 1, *,
             backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Effective kernel W3.W2.W1 (per tap and group) of one expanded conv, differentiable.

    Same maths and shapes as ``reference_collapse``; ``backend`` picks the implementation
    (None/"auto": on CUDA the measured choice of lopfast.dispatch, with ``LOPFAST_DISPATCH=off``
    Triton; the reference on CPU); ``dtype`` the precision of the products (``collapse_many``).
    """
    return collapse_many([(w1, w2, w3, groups)], backend=backend, dtype=dtype)[0]


__all__ = ["BACKENDS", "CollapseProgram", "available_backends", "collapse", "collapse_many", "reference_collapse",
           "route"]
