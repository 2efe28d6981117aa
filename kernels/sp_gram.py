"""Fused similarity-preserving (SP) distillation kernels: batched Gram, row normalisation, loss, backward.

Tensors in, tensors out: no ``torch.nn``, no lopfast imports. Every feature tensor is handed in
as a 2-D *row view* ``Q`` of shape (b, F) whose rows are dense (``Q.stride(1) == 1``) and whose
sample stride ``Q.stride(0)`` may be anything; the caller builds that view without a copy for
any layout where each sample is one block of memory (NCHW, channels_last, ...): the Gram
``Q Q^T`` does not depend on the order of the features inside a sample.

Maths (paper Sec. 2.2, Eq. 7-11), per layer pair p with b samples::

    Gr = Q Q^T                   (b x b, fp32 accumulation)
    n_i = ||Gr_i||,  G_i = Gr_i / max(n_i, eps)          (F.normalize, eps = 1e-12)
    L = sum_p ||G_T - G_S||_F^2 / b^2

    backward, D = dL/dG_S = 2 g (G_S - G_T) / b^2 (g: incoming grad of L)
    dGr_i = (D_i - <D_i, G_i> G_i) / n_i     if n_i > eps      (else D_i / eps, as F.normalize)
    dQ = (dGr + dGr^T) Q

Launch plan (honest count, P = number of pairs, T = ``MAX_TENSORS`` = 8):

* ``gram``: the raw Grams of up to T tensors of *different* shapes and dtypes in ONE launch.
  The kernel takes T (pointer, F, sample-stride) argument triples; the grid's first axis walks
  the feature chunks of all T tensors back to back (chunk boundaries passed as scalars), the
  second the (i, j) b-tiles of the Gram (only i <= j is computed; off-diagonal tiles are
  mirrored). Partial Grams of each feature chunk are reduced with fp32 atomics into a slot of
  one (P, b, b) buffer (zeroed first). So all P Grams take ceil(P / T) launches: 7 for the 55
  pairs of a ResNet-56. Why not one launch with a table of data pointers: the Triton interpreter
  (our CPU CI) cannot load through loaded pointers, and separate allocations (the activations of
  a network) cannot be addressed from one base pointer without one. Scalar argument lists
  work everywhere.
* ``sp_finish``: row norms of the student Grams, normalisation, difference to the (already
  normalised) teacher Grams and the loss of all P pairs in ONE launch (all Grams are b x b,
  since b is shared), reduced into a single fp32 scalar with atomics.
* ``row_normalize``: teacher Grams -> normalised Grams, all pairs in ONE launch.
* backward: ``sp_grad_gram`` (ONE launch, all pairs: dGr from the saved raw Gram, the teacher
  Gram and the incoming scalar gradient, read from device memory: no host sync) and
  ``sp_grad_features`` (ceil(P / T) launches, same multi-tensor scheme as ``gram``): each
  program owns a block of feature columns and a block of rows and computes
  ``dQ[rows, cols] = sum_j (dGr + dGr^T)[rows, j] Q[j, cols]``; with b <= BLOCK_I (128 on
  GPU) every student activation is read once and its gradient written once.

Totals: forward ceil(P/T) + 1 kernel launches (+2 memsets) for the student given the teacher
Grams; the teacher Grams cost ceil(P/T) + 1 more. Backward 1 + ceil(P/T).

Feature offsets are int64 (rows * sample-stride and chunk * CHUNK are widened before use), so
a single tensor may exceed 2**31 elements. fp32 inputs use ``input_precision="ieee"`` in
``tl.dot`` (PyTorch's fp32 matmul default) unless ``allow_tf32`` is passed; fp16/bf16 inputs
are multiplied natively with fp32 accumulation. The atomics make the fp32 summation order
nondeterministic on the GPU (differences at the 1e-7 relative level).

Every launcher takes ``wrap``: ``torch.library.wrap_triton`` when called from a ``triton_op``
(so torch.compile can trace the launch), None for a direct launch (interpreter, old torch).
``LAUNCHES`` counts kernel launches per kernel name (tests use it to prove a kernel ran).
"""
from __future__ import annotations

import collections
import os
from typing import Callable, List, Optional, Sequence

import torch
import triton
import triton.language as tl

MAX_TENSORS = 8
EPS = 1e-12
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

LAUNCHES: "collections.Counter[str]" = collections.Counter()

# Tile sizes. Under the interpreter small tiles keep numpy work small; on the GPU larger ones.
GRAM_BLOCK_B = 16 if _INTERPRET else 64
GRAM_BLOCK_K = 16 if _INTERPRET else 64
GRAM_K_ITERS = 2 if _INTERPRET else 8  # feature chunk of one program = BLOCK_K * K_ITERS
GRAD_BLOCK_J = 16 if _INTERPRET else 32
GRAD_BLOCK_K = 16 if _INTERPRET else 64
GRAD_MAX_BLOCK_I = 32 if _INTERPRET else 128
ROW_BLOCK = 8 if _INTERPRET else 16
GRAD_NUM_WARPS = 4 if _INTERPRET else 8  # (BLOCK_I x BLOCK_K) fp32 accumulator: 64 registers a thread at 8 warps


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ----------------------------------------------------------------------------- Gram


@triton.jit
def _gram_part(q_ptr, F, stride_b, chunk, g_ptr, b, ti, tj,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
               PRECISION: tl.constexpr):
    rows_i = ti * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_j = tj * BLOCK_B + tl.arange(0, BLOCK_B)
    mi = rows_i < b
    mj = rows_j < b
    off_i = rows_i.to(tl.int64) * stride_b
    off_j = rows_j.to(tl.int64) * stride_b
    k0 = chunk.to(tl.int64) * (BLOCK_K * K_ITERS)
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for it in range(K_ITERS):
        ks = k0 + it * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = ks < F
        a = tl.load(q_ptr + off_i[:, None] + ks[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        bt = tl.load(q_ptr + off_j[None, :] + ks[:, None], mask=mk[:, None] & mj[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    gi = rows_i.to(tl.int64) * b
    gj = rows_j.to(tl.int64) * b
    mask = mi[:, None] & mj[None, :]
    tl.atomic_add(g_ptr + gi[:, None] + rows_j[None, :], acc, mask=mask)
    if ti != tj:  # mirror the tile: G is symmetric
        tl.atomic_add(g_ptr + gj[None, :] + rows_i[:, None], acc, mask=mask)


# b is never specialised: Triton turns an int argument equal to 1 into a constexpr (b = 1 is legal)
@triton.jit(do_not_specialize=["b"])
def _gram_kernel(
    g_ptr, b, slot0,
    p0, p1, p2, p3, p4, p5, p6, p7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    s0, s1, s2, s3, s4, s5, s6, s7,
    c1, c2, c3, c4, c5, c6, c7,
    NT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.program_id(1)
    nt = tl.cdiv(b, BLOCK_B)
    ti = tid // nt
    tj = tid % nt
    bb = b.to(tl.int64) * b
    if ti <= tj:
        # one branch per tensor (NT is a constexpr: unused branches are not compiled)
        if pid < c1:
            _gram_part(p0, f0, s0, pid, g_ptr + (slot0 + 0) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 1:
            if (pid >= c1) & (pid < c2):
                _gram_part(p1, f1, s1, pid - c1, g_ptr + (slot0 + 1) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 2:
            if (pid >= c2) & (pid < c3):
                _gram_part(p2, f2, s2, pid - c2, g_ptr + (slot0 + 2) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 3:
            if (pid >= c3) & (pid < c4):
                _gram_part(p3, f3, s3, pid - c3, g_ptr + (slot0 + 3) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 4:
            if (pid >= c4) & (pid < c5):
                _gram_part(p4, f4, s4, pid - c4, g_ptr + (slot0 + 4) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 5:
            if (pid >= c5) & (pid < c6):
                _gram_part(p5, f5, s5, pid - c5, g_ptr + (slot0 + 5) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 6:
            if (pid >= c6) & (pid < c7):
                _gram_part(p6, f6, s6, pid - c6, g_ptr + (slot0 + 6) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)
        if NT > 7:
            if pid >= c7:
                _gram_part(p7, f7, s7, pid - c7, g_ptr + (slot0 + 7) * bb, b, ti, tj, BLOCK_B, BLOCK_K, K_ITERS, PRECISION)


def _precision(qs: Sequence[torch.Tensor], allow_tf32: bool) -> str:
    # only fp32 operands are affected: "ieee" = PyTorch's default fp32 matmul; fp16/bf16 dots run on
    # tensor cores with fp32 accumulation whatever this says ("tf32" is Triton's default setting)
    if any(q.dtype == torch.float32 for q in qs) and not allow_tf32:
        return "ieee"
    return "tf32"


def _launch(kernel, wrap: Optional[Callable]):
    return wrap(kernel) if wrap is not None else kernel


def _groups(n: int) -> List[range]:
    return [range(s, min(s + MAX_TENSORS, n)) for s in range(0, n, MAX_TENSORS)]


def _multi_args(qs: Sequence[torch.Tensor], chunk: int):
    """Pad the per-tensor (ptr, F, stride) lists to MAX_TENSORS and the chunk boundaries."""
    ps = list(qs) + [qs[0]] * (MAX_TENSORS - len(qs))
    fs = [q.shape[1] for q in qs] + [0] * (MAX_TENSORS - len(qs))
    ss = [q.stride(0) for q in qs] + [0] * (MAX_TENSORS - len(qs))
    bounds, total = [], 0
    for q in qs:
        total += triton.cdiv(q.shape[1], chunk)
        bounds.append(total)
    bounds = bounds + [total] * (MAX_TENSORS - len(qs))
    return ps, fs, ss, bounds[:MAX_TENSORS - 1], total


def gram(qs: Sequence[torch.Tensor], *, allow_tf32: bool = False, wrap: Optional[Callable] = None) -> torch.Tensor:
    """Raw Grams ``Q Q^T`` of every row view in ``qs`` (same b), as one fp32 (P, b, b) tensor."""
    b = qs[0].shape[0]
    out = torch.zeros((len(qs), b, b), device=qs[0].device, dtype=torch.float32)
    chunk = GRAM_BLOCK_K * GRAM_K_ITERS
    nt = triton.cdiv(b, GRAM_BLOCK_B)
    for grp in _groups(len(qs)):
        sub = [qs[i] for i in grp]
        ps, fs, ss, cs, total = _multi_args(sub, chunk)
        if total == 0:
            continue
        prec = _precision(sub, allow_tf32)
        LAUNCHES["gram"] += 1
        _launch(_gram_kernel, wrap)[(total, nt * nt)](
            out, b, grp.start, *ps, *fs, *ss, *cs,
            NT=len(sub), BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K, K_ITERS=GRAM_K_ITERS,
            PRECISION=prec,
        )
    return out


# ----------------------------------------------------------------------------- normalisation and loss


@triton.jit
def _row_normalize_kernel(g_ptr, out_ptr, b, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < b)[:, None] & (cols < b)[None, :]
    offs = p.to(tl.int64) * b * b + rows[:, None].to(tl.int64) * b + cols[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    n = tl.sqrt(tl.sum(g * g, axis=1))
    tl.store(out_ptr + offs, g / tl.maximum(n, eps)[:, None], mask=mask)


def row_normalize(g: torch.Tensor, *, wrap: Optional[Callable] = None) -> torch.Tensor:
    """Each row of each (b, b) slot of the fp32 (P, b, b) tensor ``g`` divided by its L2 norm."""
    P, b, _ = g.shape
    out = torch.empty_like(g)
    if P == 0:
        return out
    LAUNCHES["row_normalize"] += 1
    _launch(_row_normalize_kernel, wrap)[(P, triton.cdiv(b, ROW_BLOCK))](
        g, out, b, EPS, BLOCK_R=ROW_BLOCK, BLOCK_C=max(_next_pow2(b), 16))
    return out


@triton.jit
def _sp_finish_kernel(gs_ptr, gt_ptr, loss_ptr, b, eps, inv_b2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < b)[:, None] & (cols < b)[None, :]
    offs = p.to(tl.int64) * b * b + rows[:, None].to(tl.int64) * b + cols[None, :]
    gs = tl.load(gs_ptr + offs, mask=mask, other=0.0)
    gt = tl.load(gt_ptr + offs, mask=mask, other=0.0)
    n = tl.sqrt(tl.sum(gs * gs, axis=1))
    d = gt - gs / tl.maximum(n, eps)[:, None]
    tl.atomic_add(loss_ptr, tl.sum(tl.sum(d * d, axis=1), axis=0) * inv_b2)


def sp_finish(gs_raw: torch.Tensor, gt: torch.Tensor, *, wrap: Optional[Callable] = None) -> torch.Tensor:
    """fp32 scalar ``sum_p ||gt_p - normalize(gs_raw_p)||_F^2 / b^2`` for all pairs in one launch."""
    P, b, _ = gs_raw.shape
    loss = torch.zeros((), device=gs_raw.device, dtype=torch.float32)
    if P == 0:
        return loss
    LAUNCHES["sp_finish"] += 1
    _launch(_sp_finish_kernel, wrap)[(P, triton.cdiv(b, ROW_BLOCK))](
        gs_raw, gt, loss, b, EPS, 1.0 / (b * b), BLOCK_R=ROW_BLOCK, BLOCK_C=max(_next_pow2(b), 16))
    return loss


# ----------------------------------------------------------------------------- backward


@triton.jit
def _sp_grad_gram_kernel(grad_ptr, gs_ptr, gt_ptr, dg_ptr, b, eps, scale,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < b)[:, None] & (cols < b)[None, :]
    offs = p.to(tl.int64) * b * b + rows[:, None].to(tl.int64) * b + cols[None, :]
    g_out = tl.load(grad_ptr).to(tl.float32)
    gr = tl.load(gs_ptr + offs, mask=mask, other=0.0)
    gt = tl.load(gt_ptr + offs, mask=mask, other=0.0)
    n = tl.sqrt(tl.sum(gr * gr, axis=1))
    big = n > eps
    denom = tl.where(big, n, eps)
    gsn = gr / denom[:, None]
    d = (g_out * scale) * (gsn - gt)  # scale = 2 / b^2
    proj = tl.sum(d * gsn, axis=1)
    dg = tl.where(big[:, None], d - proj[:, None] * gsn, d) / denom[:, None]
    tl.store(dg_ptr + offs, dg, mask=mask)


def sp_grad_gram(grad: torch.Tensor, gs_raw: torch.Tensor, gt: torch.Tensor, *,
                 wrap: Optional[Callable] = None) -> torch.Tensor:
    """dL/dGr (P, b, b) fp32 of all pairs in one launch; ``grad`` is the 1-element incoming gradient."""
    P, b, _ = gs_raw.shape
    dg = torch.empty_like(gs_raw)
    if P == 0:
        return dg
    LAUNCHES["sp_grad_gram"] += 1
    _launch(_sp_grad_gram_kernel, wrap)[(P, triton.cdiv(b, ROW_BLOCK))](
        grad, gs_raw, gt, dg, b, EPS, 2.0 / (b * b), BLOCK_R=ROW_BLOCK, BLOCK_C=max(_next_pow2(b), 16))
    return dg


@triton.jit
def _grad_part(q_ptr, dq_ptr, F, stride_b, dstride_b, col_blk, dg_ptr, b, ti,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows_i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = rows_i < b
    ks = col_blk.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = ks < F
    gi = rows_i.to(tl.int64) * b
    acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, b, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        mj = rows_j < b
        mm = mi[:, None] & mj[None, :]
        # M = dGr + dGr^T, both read from the fp32 (b, b) slot
        m = tl.load(dg_ptr + gi[:, None] + rows_j[None, :], mask=mm, other=0.0)
        m += tl.load(dg_ptr + rows_j[None, :].to(tl.int64) * b + rows_i[:, None], mask=mm, other=0.0)
        q = tl.load(q_ptr + rows_j[:, None].to(tl.int64) * stride_b + ks[None, :],
                    mask=mj[:, None] & mk[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(m, q, acc, input_precision=PRECISION)
    tl.store(dq_ptr + rows_i[:, None].to(tl.int64) * dstride_b + ks[None, :],
             acc.to(dq_ptr.dtype.element_ty), mask=mi[:, None] & mk[None, :])


@triton.jit(do_not_specialize=["b"])
def _sp_grad_features_kernel(
    dg_ptr, b, slot0,
    p0, p1, p2, p3, p4, p5, p6, p7,
    d0, d1, d2, d3, d4, d5, d6, d7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    s0, s1, s2, s3, s4, s5, s6, s7,
    t0, t1, t2, t3, t4, t5, t6, t7,
    c1, c2, c3, c4, c5, c6, c7,
    NT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    ti = tl.program_id(1)
    bb = b.to(tl.int64) * b
    if pid < c1:
        _grad_part(p0, d0, f0, s0, t0, pid, dg_ptr + (slot0 + 0) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 1:
        if (pid >= c1) & (pid < c2):
            _grad_part(p1, d1, f1, s1, t1, pid - c1, dg_ptr + (slot0 + 1) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 2:
        if (pid >= c2) & (pid < c3):
            _grad_part(p2, d2, f2, s2, t2, pid - c2, dg_ptr + (slot0 + 2) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 3:
        if (pid >= c3) & (pid < c4):
            _grad_part(p3, d3, f3, s3, t3, pid - c3, dg_ptr + (slot0 + 3) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 4:
        if (pid >= c4) & (pid < c5):
            _grad_part(p4, d4, f4, s4, t4, pid - c4, dg_ptr + (slot0 + 4) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 5:
        if (pid >= c5) & (pid < c6):
            _grad_part(p5, d5, f5, s5, t5, pid - c5, dg_ptr + (slot0 + 5) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 6:
        if (pid >= c6) & (pid < c7):
            _grad_part(p6, d6, f6, s6, t6, pid - c6, dg_ptr + (slot0 + 6) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)
    if NT > 7:
        if pid >= c7:
            _grad_part(p7, d7, f7, s7, t7, pid - c7, dg_ptr + (slot0 + 7) * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION)


def sp_grad_features(dg: torch.Tensor, qs: Sequence[torch.Tensor], dqs: Sequence[torch.Tensor], *,
                     allow_tf32: bool = False, wrap: Optional[Callable] = None) -> None:
    """Write ``dqs[p] = (dg[p] + dg[p]^T) @ qs[p]`` for every pair (row views, dense rows)."""
    if not qs:
        return
    b = qs[0].shape[0]
    block_i = min(max(_next_pow2(b), 16), GRAD_MAX_BLOCK_I)
    for grp in _groups(len(qs)):
        sub = [qs[i] for i in grp]
        dsub = [dqs[i] for i in grp]
        ps, fs, ss, cs, total = _multi_args(sub, GRAD_BLOCK_K)
        if total == 0:
            continue
        pad = MAX_TENSORS - len(sub)
        ds = dsub + [dsub[0]] * pad
        ts = [d.stride(0) for d in dsub] + [0] * pad
        LAUNCHES["sp_grad_features"] += 1
        _launch(_sp_grad_features_kernel, wrap)[(total, triton.cdiv(b, block_i))](
            dg, b, grp.start, *ps, *ds, *fs, *ss, *ts, *cs,
            NT=len(sub), BLOCK_I=block_i, BLOCK_J=GRAD_BLOCK_J, BLOCK_K=GRAD_BLOCK_K,
            PRECISION="tf32" if allow_tf32 else "ieee", num_warps=GRAD_NUM_WARPS,
        )


__all__ = [
    "EPS", "LAUNCHES", "MAX_TENSORS", "gram", "row_normalize", "sp_finish", "sp_grad_features", "sp_grad_gram",
]
