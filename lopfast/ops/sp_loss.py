"""Similarity-preserving distillation loss (paper Sec. 2.2, Eq. 7-11): reference, registration, dispatch.

For each (student, teacher) layer pair with batch b: Q = activation as (b, -1), G = Q Q^T,
every row of G divided by its L2 norm (``F.normalize``, eps 1e-12: a zero row stays zero),
and ``L = sum_pairs ||G_T - G_S||_F^2 / b^2``, a float32 scalar whatever the input dtype
(accumulation in fp32, under ``torch.autocast`` too; in float64 for float64 features, which run
the reference). Gradients flow to the student features only.

Layers of this file, top to bottom:

* input handling: ``row_view`` turns any activation whose samples are each one dense block of
  memory (contiguous NCHW, channels_last, any permutation) into a (b, F) view *without a copy*
  (the Gram does not depend on the feature order within a sample); only non-sample-dense
  inputs are copied. The Triton path does not even build the view: its launchers read such a
  tensor directly (``kernels/sp_gram.py``: ``sample_layout``).
* the PyTorch reference (``backend="torch"``, and what CPU tensors run): plain differentiable
  torch code in fp32 with autocast switched off for its products (under bf16 autocast a matmul
  of fp32 operands runs in bf16: the reference, which the measured dispatch judges every
  candidate against, then computed bf16 Grams and rejected the exact kernels, issue 16).
* the Triton path: ``kernels/sp_gram.py`` launchers wired as opaque ``torch.library.custom_op``
  ops ``lopfast::sp_gram``, ``lopfast::sp_loss_fwd``, ``lopfast::sp_loss_bwd`` with fake
  implementations (CPU kernels = the reference, autograd registered). torch.compile,
  ``fullgraph=True`` and dynamic shapes included, records one call per op and never analyses the
  Triton launches; at run time the ops get real tensors and take the same path as eager code.
  Plus an ``autograd.Function`` calling the same launchers directly: what runs for
  ``backend="triton"`` on CPU tensors under ``TRITON_INTERPRET=1`` (the registered CPU kernel
  would otherwise take CPU tensors away from Triton) and on torch < 2.4 (no ``custom_op``).
* on CUDA the Triton launchers walk all pairs of a call in one launch per dtype through a
  device-side pair table (per pair: ``data_ptr``, sizes, strides, element offset from the first
  pair's tensor) when there are at least 9 pairs (``kernels/sp_gram.py``: ``TABLE_MIN_PAIRS``,
  ``USE_TABLE``), else one launch per 8 pairs. The tables and each call's launch plan are built
  once per address set and reused: a training step whose activations sit where the previous
  step's did does no host work beyond a key per tensor. This is an internal choice of the
  "triton" backend: the backend names and the measured dispatch's candidates are unchanged.
  Under CUDA-graph capture the per-pair launches run (their addresses are launch arguments a
  graph replays as they were), and so do the eager warm-up steps before a capture
  (``lopfast.graphs.planned``: the kernels a graph records are compiled and loaded before it);
  on CPU (the interpreter) auto keeps the per-pair launches too.
* ``_resolve`` (the one place that chooses an implementation) and the public functions
  ``sp_loss``, ``sp_gram`` and ``sp_loss_from_gram``.

Policies, read once per public call (in Python, before any launch) and passed down as plain
arguments, so a traced graph holds them as constants (``lopfast.ops._precision``):

* float64 features run the reference: ``tl.dot`` has no fp64 form on sm_90 (``"auto"`` routes
  them there, and the measured dispatch does not offer Triton for them; an explicit
  ``backend="triton"`` with float64 raises a ValueError).
* fp32 products are IEEE fp32 unless TF32 was allowed through PyTorch's switch
  (``torch.backends.cuda.matmul.fp32_precision = "tf32"``; ``allow_tf32`` on torch < 2.9).
* under ``torch.use_deterministic_algorithms(True)`` the Gram's split-K atomics are replaced by a
  fixed-order two-stage reduction: loss and gradients are bitwise repeatable.

A sample whose features are all zero (a zero row of G) gets F.normalize's gradient D / eps, about
1e12 |D|, in every backend: finite in fp32 / bf16, beyond fp16's range, where it is +-inf (the
exact value rounded to fp16; an fp16 run's ``GradScaler`` skips such a step).
"""
import contextlib
import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from lopfast import dispatch as _dispatch
from lopfast import graphs
from lopfast.backend import cuda_extension, is_auto, resolve_backend
from lopfast.ops._precision import deterministic, fp32_matmul_precision

EPS = 1e-12
_OP = "sp_loss"

Features = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = ["row_view", "sp_gram", "sp_loss", "sp_loss_from_gram", "sp_loss_reference"]


# ----------------------------------------------------------------------------- input handling


def row_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (b, F) matrix with dense rows, a view of ``t`` whenever each sample is one block.

    The features of a sample are ordered by memory position (dims sorted by stride), so
    contiguous and channels_last activations are both read as they lie. Only an input whose
    samples are not each one dense block (e.g. a transposed batch) is copied.
    """
    b = t.shape[0]
    if t.dim() == 1:
        return t.reshape(b, 1)
    inner = sorted(range(1, t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    v = t.permute(0, *inner)
    try:
        q = v.view(b, -1)
    except RuntimeError:
        q = v.reshape(b, -1)  # copies
    if q.shape[1] > 1 and q.stride(1) != 1:
        q = q.contiguous()
    return q


def _as_list(x: Features, argname: str) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        raise TypeError(f"{argname} must be a Tensor or a sequence of Tensors, got {type(x).__name__}")
    out = list(x)
    if not out:
        raise ValueError(f"{argname} is empty: at least one layer pair is needed")
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{argname}[{i}] must be a Tensor, got {type(t).__name__}")
    return out


def _check_features(feats: List[torch.Tensor], argname: str, b: Optional[int], device) -> Tuple[int, torch.device]:
    for i, t in enumerate(feats):
        if t.dim() < 1:
            raise ValueError(f"{argname}[{i}] must have a batch dimension, got a 0-d tensor")
        if not (t.is_floating_point()):
            raise TypeError(f"{argname}[{i}] must be a floating point tensor, got {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{argname}[{i}] has batch size 0: the SP loss compares the samples of a batch")
        if b is None:
            b = t.shape[0]
        elif t.shape[0] != b:
            raise ValueError(
                f"{argname}[{i}] has batch size {t.shape[0]}, expected {b}: every student and teacher "
                "feature of one step must come from the same mini-batch")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{argname}[{i}] is on {t.device}, expected {device}")
    return b, device  # type: ignore[return-value]


def _check_gram(gram: torch.Tensor, n: int, b: int, device) -> None:
    if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (n, b, b):
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"teacher_gram must have shape ({n}, {b}, {b}) (pairs, batch, batch), got {shape}")
    if gram.device != device:
        raise ValueError(f"teacher_gram is on {gram.device}, expected {device}")


# ----------------------------------------------------------------------------- PyTorch reference


def _fp32_region(t: torch.Tensor):
    """Autocast off for the reference's products: under ``torch.autocast`` a matmul of fp32
    operands runs in bf16/fp16, which made the "fp32 accumulation" reference a bf16 one (its
    gradient then rounding noise wherever teacher and student Grams nearly agree; the measured
    dispatch, which judges every candidate against it, rejected the exact kernels)."""
    try:
        on = torch.is_autocast_enabled(t.device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know (meta), or an old torch
        on = False
    return torch.autocast(t.device.type, enabled=False) if on else contextlib.nullcontext()


def _gram32(t: torch.Tensor) -> torch.Tensor:
    # fp32 products (fp64 for float64 features: the float64 reference and the CUDA extension's
    # double path then agree to float64 precision)
    q = row_view(t)
    q = q if q.dtype in (torch.float32, torch.float64) else q.float()
    with _fp32_region(q):
        return q @ q.t()


def reference_gram(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Normalised Grams (P, b, b), fp32 (float64 when a feature is float64; differentiable; the
    teacher side is detached by callers)."""
    return torch.stack([F.normalize(_gram32(t), p=2.0, dim=1, eps=EPS) for t in features])


def sp_loss_reference(student: Sequence[torch.Tensor], teacher_gram: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch SP loss of the student features against normalised teacher Grams (P, b, b):
    computed in fp32 whatever the input dtype, autocast or not (in float64 for float64 features
    and Grams), returned as a float32 scalar."""
    b = student[0].shape[0]
    loss = torch.zeros((), device=teacher_gram.device, dtype=teacher_gram.dtype)
    for s, gt in zip(student, teacher_gram):
        d = gt - F.normalize(_gram32(s), p=2.0, dim=1, eps=EPS)
        loss = loss + (d * d).sum()
    return (loss / (b * b)).float()


def _ref_fwd(student: Sequence[torch.Tensor], teacher_gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # the op's contract: an fp32 raw Gram (what the Triton implementation saves for the backward)
    graw = torch.stack([_gram32(s).float() for s in student])
    d = teacher_gram - F.normalize(graw, p=2.0, dim=2, eps=EPS)
    b = graw.shape[1]
    return (d * d).sum() / (b * b), graw


def _ref_bwd(grad: torch.Tensor, student: Sequence[torch.Tensor], teacher_gram: torch.Tensor,
             graw: torch.Tensor) -> List[torch.Tensor]:
    b = graw.shape[1]
    n = graw.norm(dim=2, keepdim=True)
    big = n > EPS
    denom = torch.where(big, n, torch.full_like(n, EPS))
    gsn = graw / denom
    d = grad.float().reshape(()) * (2.0 / (b * b)) * (gsn - teacher_gram)
    proj = (d * gsn).sum(dim=2, keepdim=True)
    dg = torch.where(big, d - proj * gsn, d) / denom
    m = dg + dg.transpose(1, 2)
    out = []
    for p, s in enumerate(student):
        with _fp32_region(s):
            dq = m[p] @ s.reshape(b, -1).float()  # the features in their logical order
        g = _empty_grad(s)
        g.copy_(dq.view(s.shape))
        out.append(g)
    return out


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    """The gradient buffer of a feature, with dense samples: ``empty_like`` (a dense input keeps
    its strides, so channels_last stays so; anything else becomes dense), contiguous where that
    puts the batch inside a sample (a batch-transposed input). The same function in the real and
    the fake (traced) implementation, so the strides a compiled graph assumes are the ones it gets."""
    g = torch.empty_like(like)
    b = like.shape[0] if like.dim() else 1
    if like.dim() >= 2 and b > 1 and g.numel() > 0 and g.stride(0) * b != g.numel():
        g = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return g


# ----------------------------------------------------------------------------- Triton path

try:
    from lopfast.kernels import HAS_TRITON
    if HAS_TRITON:
        from lopfast.kernels import sp_gram as _K
    else:  # pragma: no cover
        _K = None
except Exception:  # pragma: no cover - a broken triton install
    _K = None


@functools.lru_cache(maxsize=4096)
def _order(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> Tuple[int, ...]:
    # the order of a sample's dims in memory (outermost first; size-1 dims carry no order)
    return tuple(sorted((d for d in range(1, len(shape)) if shape[d] != 1), key=lambda d: -stride[d]))


def _gram_input(t: torch.Tensor) -> torch.Tensor:
    """What the Gram kernels read: the feature itself when its samples are dense blocks (no copy;
    the order of a sample's features does not matter to Q Q^T), else its row view (a copy)."""
    return t if _K.sample_layout(t) is not None else row_view(t)


def _grad_input(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """What the dQ kernel reads for feature ``t`` whose gradient lands in ``g`` (``_empty_grad``):
    the kernel pairs the k-th feature of a sample of Q with the k-th of dQ in memory order, so Q
    must lay out a sample's dims as ``g`` does. True for every dense input (``g`` keeps its
    strides) and for NCHW / channels_last ones with gaps between samples; otherwise a copy of
    ``t`` in ``g``'s layout."""
    ts = t.stride()
    if ts == g.stride():  # a dense input: g kept its strides (and g's samples are dense blocks)
        return t
    if _K.sample_layout(t) is not None and _order(tuple(t.shape), ts) == _order(tuple(g.shape), g.stride()):
        return t
    return torch.empty_like(g).copy_(t)


def _table() -> Optional[bool]:
    """The launchers' ``table`` argument: None (their choice: the device-side pair table on CUDA
    from 9 pairs on), or False while a CUDA graph's warm-up or capture is under way
    (``lopfast.graphs.planned``): a capture records the per-pair launches only, so the warm-up
    steps run those too and the capture compiles and loads nothing."""
    return False if graphs.capture_planned() else None


def _triton_gram(features: Sequence[torch.Tensor], precision: str, determ: bool) -> torch.Tensor:
    qs = [_gram_input(t) for t in features]
    return _K.row_normalize(_K.gram(qs, precision=precision, deterministic=determ, table=_table()))


def _triton_fwd(student: Sequence[torch.Tensor], teacher_gram: torch.Tensor, precision: str, determ: bool):
    graw = _K.gram([_gram_input(s) for s in student], precision=precision, deterministic=determ, table=_table())
    return _K.sp_finish(graw, teacher_gram), graw


def _triton_bwd(grad: torch.Tensor, student: Sequence[torch.Tensor], teacher_gram: torch.Tensor,
                graw: torch.Tensor, precision: str) -> List[torch.Tensor]:
    # an expanded (stride-0) incoming gradient is made a real 1-element tensor first
    grad = grad.reshape(()).to(device=graw.device, dtype=torch.float32).contiguous()
    dg = _K.sp_grad_gram(grad, graw, teacher_gram)
    grads = [_empty_grad(s) for s in student]
    _K.sp_grad_features(dg, [_grad_input(s, g) for s, g in zip(student, grads)], grads, precision=precision,
                        table=_table())
    return grads


class _SPLossTritonFn(torch.autograd.Function):
    """Direct launches of the Triton kernels (CPU tensors under the interpreter, torch < 2.4)."""

    @staticmethod
    def forward(ctx, teacher_gram, precision, determ, *student):
        loss, graw = _triton_fwd(student, teacher_gram, precision, determ)
        ctx.save_for_backward(teacher_gram, graw, *student)
        ctx.precision = precision
        return loss

    @staticmethod
    def backward(ctx, grad):
        teacher_gram, graw, *student = ctx.saved_tensors
        grads = _triton_bwd(grad, student, teacher_gram, graw, ctx.precision)
        return (None, None, None, *[g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])])


class _Ops:
    """The torch.library ops of one namespace (``lopfast``; tests build a second one without CPU kernels).

    Opaque custom ops (``torch.library.custom_op``) with fake implementations: torch.compile,
    ``fullgraph=True`` and dynamic shapes included, records one call per op and never looks
    inside (Inductor's analysis of Triton kernels, which the launchers' host-side planning and
    device tables cannot go through, never runs), and at run time the op receives real tensors:
    the compiled graph takes the same launch path as eager code, the device-side pair table
    included."""

    def __init__(self, namespace: str, cpu_reference: bool = True):
        custom_op = torch.library.custom_op

        # the precision ("ieee"/"tf32") and the deterministic switch are op arguments: read once by
        # the caller, they are constants of a traced graph, not state read inside the kernel launch
        @custom_op(f"{namespace}::sp_gram", mutates_args=())
        def sp_gram_op(features: List[torch.Tensor], precision: str, deterministic: bool) -> torch.Tensor:
            return _triton_gram(features, precision, deterministic)

        @sp_gram_op.register_fake
        def _(features, precision, deterministic):
            b = features[0].shape[0]
            return features[0].new_empty((len(features), b, b), dtype=torch.float32)

        @custom_op(f"{namespace}::sp_loss_fwd", mutates_args=())
        def fwd_op(student: List[torch.Tensor], teacher_gram: torch.Tensor, precision: str,
                   deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
            return _triton_fwd(student, teacher_gram, precision, deterministic)

        @fwd_op.register_fake
        def _(student, teacher_gram, precision, deterministic):
            return (teacher_gram.new_empty((), dtype=torch.float32),
                    teacher_gram.new_empty(teacher_gram.shape, dtype=torch.float32))

        @custom_op(f"{namespace}::sp_loss_bwd", mutates_args=())
        def bwd_op(grad: torch.Tensor, student: List[torch.Tensor], teacher_gram: torch.Tensor,
                   gram: torch.Tensor, precision: str) -> List[torch.Tensor]:
            return _triton_bwd(grad, student, teacher_gram, gram, precision)

        @bwd_op.register_fake
        def _(grad, student, teacher_gram, gram, precision):
            return [_empty_grad(s) for s in student]

        if cpu_reference:
            @sp_gram_op.register_kernel("cpu")
            def _(features, precision, deterministic):
                return reference_gram(features)

            @fwd_op.register_kernel("cpu")
            def _(student, teacher_gram, precision, deterministic):
                return _ref_fwd(student, teacher_gram)

            @bwd_op.register_kernel("cpu")
            def _(grad, student, teacher_gram, gram, precision):
                return _ref_bwd(grad, student, teacher_gram, gram)

        def setup_context(ctx, inputs, output):
            student, teacher_gram, precision, _ = inputs
            ctx.precision = precision
            ctx.save_for_backward(teacher_gram, output[1], *student)

        def backward(ctx, grad_loss, grad_gram):
            teacher_gram, graw, *student = ctx.saved_tensors
            return list(bwd_op(grad_loss, student, teacher_gram, graw, ctx.precision)), None, None, None

        fwd_op.register_autograd(backward, setup_context=setup_context)
        self.sp_gram, self.sp_loss_fwd, self.sp_loss_bwd = sp_gram_op, fwd_op, bwd_op

    def gram(self, features: Sequence[torch.Tensor], precision: str = "ieee",
             determ: bool = False) -> torch.Tensor:
        return self.sp_gram(list(features), precision, determ)

    def loss(self, student: Sequence[torch.Tensor], teacher_gram: torch.Tensor, precision: str = "ieee",
             determ: bool = False) -> torch.Tensor:
        return self.sp_loss_fwd(list(student), teacher_gram, precision, determ)[0]


HAS_OP = _K is not None and hasattr(torch.library, "custom_op")
OPS: Optional[_Ops] = _Ops("lopfast") if HAS_OP else None


# ----------------------------------------------------------------------------- dispatch and public API


@torch.compiler.assume_constant_result
def _resolve_name(backend: Optional[str], device_type: str, has_fp64: bool) -> str:
    # Dynamo cannot trace ContextVar.get (lopfast.use_backend): under torch.compile the choice is
    # made once, when the graph is traced (backend, device type and dtypes are constants there)
    name = resolve_backend(backend, torch.device(device_type), _OP)
    if name == "triton" and has_fp64:
        requested = backend if backend not in (None, "auto") else None
        if requested is None:
            from lopfast.backend import get_backend

            requested = None if get_backend() == "auto" else get_backend()
        if requested == "triton":
            raise ValueError(
                "sp_loss: backend 'triton' does not take float64 features (tl.dot has no fp64 form on "
                "the GPU); use backend='auto' or 'torch' (the float64 reference)")
        return "torch"  # "auto": float64 runs the reference
    return name


def _has_fp64(*groups: Sequence[torch.Tensor]) -> bool:
    return any(t.dtype == torch.float64 for g in groups for t in g)


def _resolve(backend: Optional[str], device: torch.device, *groups: Sequence[torch.Tensor]) -> str:
    """The one place that decides which implementation runs: "torch" or "triton"."""
    name = _resolve_name(backend, device.type, _has_fp64(*groups))
    if name == "cuda":
        raise RuntimeError(
            "sp_gram / sp_loss_from_gram: backend 'cuda' (the CUDA C++ extension lopfast._C) only "
            "implements the whole loss (sp_loss); use backend='triton' or 'torch' here")
    if name == "triton" and _K is None:  # pragma: no cover
        raise RuntimeError("sp_loss: backend 'triton' requested but the Triton kernels failed to import")
    return name


def _measured(backend: Optional[str], device: torch.device, entry: str, args: tuple, impl, cuda=None,
              fp64: bool = False):
    """``backend`` itself, or for "auto" on CUDA the measured fastest backend of this call's
    shapes (``lopfast.dispatch``); ``impl(name, *args)`` runs the entry on backend ``name``.
    ``fp64``: float64 features, which Triton refuses by design (not a candidate then)."""
    if torch.compiler.is_compiling() or not _dispatch.tunable(device) or not is_auto(backend, _OP):
        # under torch.compile _resolve keeps the static default (dynamo cannot trace use_backend's
        # ContextVar, and the shape key may hold symbolic sizes)
        return backend
    cands = {"torch": functools.partial(impl, "torch")}
    if _K is not None and not fp64:
        cands["triton"] = functools.partial(impl, "triton")
    if cuda is not None and cuda_extension() is not None:
        cands["cuda"] = cuda
    return _dispatch.choose(op=f"{_OP}.{entry}", key=_dispatch.shape_key(*args), device=device,
                            candidates=cands, reference="torch", args=args)


def _use_op(device: torch.device) -> bool:
    # the registered op sends CPU tensors to its CPU (reference) kernel, so CPU tensors that must
    # reach Triton (interpreter) take the direct autograd.Function instead
    return OPS is not None and device.type != "cpu"


def _gram_impl(features: List[torch.Tensor], name: str, device) -> torch.Tensor:
    with torch.no_grad():
        if name == "torch":
            return reference_gram(features)
        precision, determ = fp32_matmul_precision(), deterministic()
        if _use_op(device):
            return OPS.gram(features, precision, determ)
        return _triton_gram(features, precision, determ)


def _loss_impl(student: List[torch.Tensor], gt: torch.Tensor, name: str, device) -> torch.Tensor:
    gt = gt.detach()
    if name == "torch":  # float64 features keep float64 teacher Grams (the float64 reference)
        keep64 = gt.dtype == torch.float64 and any(s.dtype == torch.float64 for s in student)
        return sp_loss_reference(student, gt if keep64 else gt.to(torch.float32))
    gt = gt.to(torch.float32)
    gt = gt.contiguous()
    precision, determ = fp32_matmul_precision(), deterministic()
    if _use_op(device):
        return OPS.loss(student, gt, precision, determ)
    return _SPLossTritonFn.apply(gt, precision, determ, *student)


def sp_gram(features: Features, *, backend: Optional[str] = "auto") -> torch.Tensor:
    """Row-normalised Gram matrices (P, b, b) of the features (no autograd: the teacher side), float32
    (float64 when a feature is float64: the float64 reference).

    ``features`` is one tensor or a sequence of P tensors of the same batch size b.
    """
    feats = _as_list(features, "features")
    b, device = _check_features(feats, "features", None, None)
    backend = _measured(backend, device, "gram", (feats,), lambda n, f: _gram_impl([t.detach() for t in f], n, device),
                        fp64=_has_fp64(feats))
    return _gram_impl([t.detach() for t in feats], _resolve(backend, device, feats), device)


def sp_loss_from_gram(student: Features, teacher_gram: torch.Tensor, *,
                      backend: Optional[str] = "auto") -> torch.Tensor:
    """SP loss of student features against precomputed normalised teacher Grams (``sp_gram``)."""
    s = _as_list(student, "student")
    b, device = _check_features(s, "student", None, None)
    _check_gram(teacher_gram, len(s), b, device)
    backend = _measured(backend, device, "from_gram", (s, teacher_gram), lambda n, a, g: _loss_impl(a, g, n, device),
                        fp64=_has_fp64(s))
    return _loss_impl(s, teacher_gram, _resolve(backend, device, s), device)


def sp_loss(student: Features, teacher: Features, *, backend: Optional[str] = "auto") -> torch.Tensor:
    """Similarity-preserving distillation loss, paper Eq. 7-11; a float32 scalar.

    Args:
        student: a Tensor or a sequence of Tensors (b, ...): the student's activations, one per
            layer pair. Gradients flow to them.
        teacher: the matching teacher activations (same length; channels and spatial size may
            differ from the student's, the batch size may not). Detached.
        backend: "auto" (Triton on CUDA tensors, the PyTorch reference elsewhere), "torch",
            "triton" (on CPU only under ``TRITON_INTERPRET=1``) or "cuda" (the CUDA C++ extension,
            csrc/sp_gram_kernels.cu). ``lopfast.use_backend`` sets the default.

    NaN / inf in the features propagate to the loss as in PyTorch ops: a hot op does not check
    (that would cost a host sync per step); training checks the loss once per epoch.

    >>> loss = lopfast.sp_loss([s1, s2], [t1, t2])   # sum over the two pairs
    """
    s = _as_list(student, "student")
    t = _as_list(teacher, "teacher")
    if len(s) != len(t):
        raise ValueError(f"student has {len(s)} feature tensors but teacher has {len(t)}: one per layer pair")
    b, device = _check_features(s, "student", None, None)
    _check_features(t, "teacher", b, device)
    backend = _measured(backend, device, "loss", (s, t), lambda n, a, b_: sp_loss(a, b_, backend=n),
                        cuda=lambda a, b_: sp_loss(a, b_, backend="cuda"), fp64=_has_fp64(s, t))
    if not torch.compiler.is_compiling() and resolve_backend(backend, device, _OP) == "cuda":
        # the CUDA C++ fallback (csrc/sp_gram_kernels.cu) covers the whole loss, not the Gram-only
        # entries; skipped while dynamo traces (an opaque extension call; _resolve decides there)
        from lopfast.ops.cuda_ext import sp_loss_cuda

        return sp_loss_cuda(s, t).float()
    name = _resolve(backend, device, s, t)
    gt = _gram_impl([x.detach() for x in t], name, device)
    return _loss_impl(s, gt, name, device)
