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
  second the upper-triangle (i <= j) b-tiles of the Gram only (no idle programs; off-diagonal
  tiles are mirrored when stored). The chunk length (split-K) is sized per launch so that the
  launch has about ``GRAM_WAVES`` = 3 waves of programs on the device's SMs (``gram_plan``):
  long chunks (few atomics) for big Grams, short ones when there is little else to spread.
  Partial Grams of each feature chunk are reduced with fp32 atomics into a slot of
  one (P, b, b) buffer (zeroed first). So all P Grams take ceil(P / T) launches: 7 for the 55
  pairs of a ResNet-56. Why not one launch with a table of data pointers: the Triton interpreter
  (our CPU CI) cannot load through loaded pointers, and separate allocations (the activations of
  a network) cannot be addressed from one base pointer without one. Scalar argument lists
  work everywhere.
* ``sp_finish``: row norms of the student Grams, normalisation, difference to the (already
  normalised) teacher Grams and the loss of all P pairs in ONE launch (all Grams are b x b,
  since b is shared), one partial per program summed in a fixed order (no atomics).
* ``row_normalize``: teacher Grams -> normalised Grams, all pairs in ONE launch.
* backward: ``sp_grad_gram`` (ONE launch, all pairs: dGr from the saved raw Gram, the teacher
  Gram and the incoming scalar gradient, read from device memory: no host sync) and
  ``sp_grad_features`` (M = dGr + dGr^T formed once, then ceil(P / T) launches, same
  multi-tensor scheme as ``gram``): each program owns a block of feature columns and a block
  of rows and computes ``dQ[rows, cols] = sum_j M[rows, j] Q[j, cols]`` on tensor cores (bf16
  inputs: two bf16 MMAs with M split into hi + lo bf16 parts; fp32/fp16: fp32 dot in the
  policy's precision); with b <= BLOCK_I (128) every student activation is read once and its
  gradient written once.

Totals: forward ceil(P/T) + 1 kernel launches (+2 memsets) for the student given the teacher
Grams; the teacher Grams cost ceil(P/T) + 1 more. Backward 1 + ceil(P/T).

Feature offsets are int64 (rows * sample-stride and chunk * CHUNK are widened before use), so
a single tensor may exceed 2**31 elements. fp32 inputs use ``input_precision="ieee"`` in
``tl.dot`` (PyTorch's fp32 matmul default) unless ``precision="tf32"`` is passed (the caller
reads PyTorch's switch, ``lopfast.ops._precision``); fp16/bf16 inputs are multiplied natively
with fp32 accumulation. float64 is not supported (``tl.dot`` has no fp64 form on sm_90: the op
layer routes it to the PyTorch reference); the launchers refuse it.

Determinism: the split-K atomics of ``gram`` make the fp32 summation order vary between runs.
``deterministic=True`` (what the op passes when ``torch.are_deterministic_algorithms_enabled()``)
stores each chunk's partial Gram instead and sums the partials of each tensor in chunk order
(a second, fixed-order stage). Every other kernel is atomic-free (the loss of ``sp_finish`` is
reduced from one partial per program in a fixed order), so the whole loss and its gradient are
then bitwise repeatable.

Specialisation (compile count): Triton specialises every integer argument on ``% 16 == 0`` (and
formerly ``== 1``), which would compile a new variant for each combination of batch size, feature
counts and strides a model presents. Every integer argument is ``do_not_specialize``; instead the
launcher passes one constexpr ``ALIGN`` (16 when every feature count and row stride of the launch
is a multiple of 16, else 1) and the kernel re-asserts the divisibility with ``tl.multiple_of``:
at most two variants per (kernel, tensor count, dtype, precision, mode), and the aligned one
keeps vectorised loads. ``aot_variants()`` lists what runtime can compile (for the AOT report).

Every launcher takes ``wrap``: ``torch.library.wrap_triton`` when called from a ``triton_op``
(so torch.compile can trace the launch), None for a direct launch (interpreter, old torch).
``LAUNCHES`` counts kernel launches per kernel name (tests use it to prove a kernel ran).
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

MAX_TENSORS = 8
EPS = 1e-12

LAUNCHES: "collections.Counter[str]" = collections.Counter()

# Tile sizes: the GPU's, also under the interpreter, so CPU tests run exactly the tiling (row tiles,
# split-K chunks, mirrored tiles) the GPU runs; bigger tiles mean fewer interpreted programs.
GRAM_BLOCK_B = 64
GRAM_BLOCK_K = 64
GRAM_WAVES = 3  # split-K: about this many waves of programs over the GPU's SMs per Gram launch
NUM_SMS: Optional[int] = None  # None: the device's SM count (CPU / interpreter: INTERPRETER_SMS)
INTERPRETER_SMS = 16  # the interpreter pays per program: fewer, longer chunks on CPU
GRAM_NUM_WARPS = 8  # 4 warps spill (64x64 fp32 accumulator + two mirrored epilogue tiles)
GRAD_BLOCK_J = 32
GRAD_BLOCK_K = 64
GRAD_MAX_BLOCK_I = 128
GRAD_NUM_WARPS = 8  # (BLOCK_I x BLOCK_K) fp32 accumulator: 32 registers a thread at 8 warps
ROW_BLOCK = 16
NUM_STAGES = 3


def _gram_stages(fp32: bool) -> int:
    # fp32 operand tiles are twice as big: 3 stages with the runtime split-K loop spill a little
    # (AOT report), 2 do not; 16-bit operands keep 3
    return 2 if fp32 else NUM_STAGES


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ----------------------------------------------------------------------------- Gram


@triton.jit
def _gram_part(q_ptr, F, stride_b, chunk, k_iters, g_ptr, b, ti, tj,
               BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, ALIGN: tl.constexpr, ATOMIC: tl.constexpr):
    if ALIGN > 1:  # the launcher checked it; restores the vectorised loads specialisation would give
        F = tl.multiple_of(F, ALIGN)
        stride_b = tl.multiple_of(stride_b, ALIGN)
    rows_i = ti * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_j = tj * BLOCK_B + tl.arange(0, BLOCK_B)
    mi = rows_i < b
    mj = rows_j < b
    off_i = rows_i.to(tl.int64) * stride_b
    off_j = rows_j.to(tl.int64) * stride_b
    k0 = chunk.to(tl.int64) * k_iters * BLOCK_K
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for it in range(0, k_iters):
        ks = k0 + it * BLOCK_K + tl.arange(0, BLOCK_K)
        mk = ks < F
        # both operands read along the dense feature axis (coalesced); the transpose is a layout change
        a = tl.load(q_ptr + off_i[:, None] + ks[None, :], mask=mi[:, None] & mk[None, :], other=0.0)
        bq = tl.load(q_ptr + off_j[:, None] + ks[None, :], mask=mj[:, None] & mk[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(bq), acc, input_precision=PRECISION)
    # offsets inside one (b, b) slot fit int32 (the launcher checks b * b < 2**31): 32-bit offset
    # tiles instead of 64-bit pointer tiles keep the epilogue out of local memory
    mask = mi[:, None] & mj[None, :]
    offs = rows_i[:, None] * b + rows_j[None, :]
    if ATOMIC:
        tl.atomic_add(g_ptr + offs, acc, mask=mask)
        if ti != tj:  # mirror the tile: G is symmetric
            tl.atomic_add(g_ptr + (rows_j[None, :] * b + rows_i[:, None]), acc, mask=mask)
    else:  # g_ptr is this chunk's own partial Gram: plain stores, summed later in chunk order
        tl.store(g_ptr + offs, acc, mask=mask)
        if ti != tj:
            tl.store(g_ptr + (rows_j[None, :] * b + rows_i[:, None]), acc, mask=mask)


# Integer arguments are never specialised (see the module docstring: ALIGN stands in for them)
_GRAM_INTS = ["b", "slot0", "k_iters"] + [f"f{i}" for i in range(8)] + [f"s{i}" for i in range(8)] + [f"c{i}" for i in range(1, 8)]


@triton.jit(do_not_specialize=_GRAM_INTS)
def _gram_kernel(
    g_ptr, b, slot0, k_iters,
    p0, p1, p2, p3, p4, p5, p6, p7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    s0, s1, s2, s3, s4, s5, s6, s7,
    c1, c2, c3, c4, c5, c6, c7,
    NT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ALIGN: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.program_id(1)
    # the grid holds the upper-triangle tiles only, column by column: tid = tj (tj + 1) / 2 + ti,
    # ti <= tj (the float sqrt is exact enough for any tile count; the two steps fix a rounding)
    tj = ((tl.sqrt(8.0 * tid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > tid, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= tid, tj + 1, tj)
    ti = tid - tj * (tj + 1) // 2
    bb = b.to(tl.int64) * b
    # atomic mode: slot t of the (P, b, b) output; deterministic mode: g_ptr is the launch's
    # (chunks, b, b) partial buffer and every program owns the slot of its global chunk pid
    if ATOMIC:
        base = (slot0 + tl.zeros((), tl.int64)) * bb
        step = bb
    else:
        base = pid.to(tl.int64) * bb
        step = 0
    # one branch per tensor (NT is a constexpr: unused branches are not compiled)
    if pid < c1:
        _gram_part(p0, f0, s0, pid, k_iters, g_ptr + base, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 1:
        if (pid >= c1) & (pid < c2):
            _gram_part(p1, f1, s1, pid - c1, k_iters, g_ptr + base + 1 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 2:
        if (pid >= c2) & (pid < c3):
            _gram_part(p2, f2, s2, pid - c2, k_iters, g_ptr + base + 2 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 3:
        if (pid >= c3) & (pid < c4):
            _gram_part(p3, f3, s3, pid - c3, k_iters, g_ptr + base + 3 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 4:
        if (pid >= c4) & (pid < c5):
            _gram_part(p4, f4, s4, pid - c4, k_iters, g_ptr + base + 4 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 5:
        if (pid >= c5) & (pid < c6):
            _gram_part(p5, f5, s5, pid - c5, k_iters, g_ptr + base + 5 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 6:
        if (pid >= c6) & (pid < c7):
            _gram_part(p6, f6, s6, pid - c6, k_iters, g_ptr + base + 6 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)
    if NT > 7:
        if pid >= c7:
            _gram_part(p7, f7, s7, pid - c7, k_iters, g_ptr + base + 7 * step, b, ti, tj, BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)


def _dot_precision(qs: Sequence[torch.Tensor], precision: str) -> str:
    # only fp32 operands are affected: "ieee" = PyTorch's default fp32 matmul; fp16/bf16 dots run on
    # tensor cores with fp32 accumulation whatever this says ("tf32" is Triton's default setting)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if any(q.dtype == torch.float32 for q in qs):
        return precision
    return "tf32"


def _check_rows(qs: Sequence[torch.Tensor], argname: str) -> None:
    for i, q in enumerate(qs):
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            # tl.dot has no fp64 (or other) form on sm_90; the op layer sends float64 to the reference
            raise TypeError(f"{argname}[{i}]: the Triton SP kernels take float32/float16/bfloat16, got {q.dtype}")
        if q.dim() != 2 or (q.shape[1] > 1 and q.stride(1) != 1):
            raise ValueError(f"{argname}[{i}] must be a (b, F) row view with dense rows")


def _launch(kernel, wrap: Optional[Callable]):
    return wrap(kernel) if wrap is not None else kernel


def _groups(n: int) -> List[range]:
    return [range(s, min(s + MAX_TENSORS, n)) for s in range(0, n, MAX_TENSORS)]


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if NUM_SMS is not None:
        return NUM_SMS
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


def gram_plan(qs: Sequence[torch.Tensor]) -> Tuple[int, int]:
    """(k_iters, programs) of one Gram launch over ``qs``: the split-K is sized so that the launch
    has about ``GRAM_WAVES`` waves of programs on the device's SMs (fewer, longer chunks when the
    Grams are large; more, shorter ones for few tensors or few tiles)."""
    b = qs[0].shape[0]
    nt = triton.cdiv(b, GRAM_BLOCK_B)
    tiles = nt * (nt + 1) // 2
    blocks = sum(triton.cdiv(q.shape[1], GRAM_BLOCK_K) for q in qs)
    k_iters = max(1, triton.cdiv(blocks * tiles, GRAM_WAVES * _num_sms(qs[0].device)))
    chunk = GRAM_BLOCK_K * k_iters
    return k_iters, sum(triton.cdiv(q.shape[1], chunk) for q in qs) * tiles


def _align(*ints: int) -> int:
    """16 when every feature count / row stride of a launch is a multiple of 16, else 1."""
    return 16 if all(int(v) % 16 == 0 for v in ints) else 1


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


def gram(qs: Sequence[torch.Tensor], *, precision: str = "ieee", deterministic: bool = False,
         wrap: Optional[Callable] = None) -> torch.Tensor:
    """Raw Grams ``Q Q^T`` of every row view in ``qs`` (same b), as one fp32 (P, b, b) tensor.

    ``precision`` ("ieee" or "tf32") applies to fp32 inputs; ``deterministic`` replaces the split-K
    atomics by per-chunk partial Grams summed in chunk order (bitwise repeatable)."""
    _check_rows(qs, "qs")
    b = qs[0].shape[0]
    if b * b >= 2**31:  # the kernel's in-slot offsets are int32
        raise ValueError(f"qs: batch size {b} too large for the Triton Gram kernel (b * b must be < 2**31)")
    dev = qs[0].device
    # atomic mode accumulates into one zeroed (P, b, b) buffer; deterministic mode builds the result
    # from per-group partial buffers without writing into views (functional under torch.compile)
    out = None if deterministic else torch.zeros((len(qs), b, b), device=dev, dtype=torch.float32)
    pieces: List[torch.Tensor] = []
    nt = triton.cdiv(b, GRAM_BLOCK_B)
    for grp in _groups(len(qs)):
        sub = [qs[i] for i in grp]
        k_iters, _ = gram_plan(sub)
        ps, fs, ss, cs, total = _multi_args(sub, GRAM_BLOCK_K * k_iters)
        if total == 0:  # every tensor of the group has 0 features: Grams are 0
            pieces += [torch.zeros((b, b), device=dev, dtype=torch.float32) for _ in sub]
            continue
        target = out if not deterministic else torch.empty((total, b, b), device=dev, dtype=torch.float32)
        LAUNCHES["gram"] += 1
        LAUNCHES["gram_deterministic"] += int(deterministic)
        _launch(_gram_kernel, wrap)[(total, nt * (nt + 1) // 2)](
            target, b, grp.start, k_iters, *ps, *fs, *ss, *cs,
            NT=len(sub), BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K,
            PRECISION=_dot_precision(sub, precision), ALIGN=_align(*fs, *ss), ATOMIC=not deterministic,
            num_warps=GRAM_NUM_WARPS, num_stages=_gram_stages(any(q.dtype == torch.float32 for q in sub)),
        )
        if deterministic:  # second stage: each tensor's chunk partials, summed in chunk order
            lo = 0
            for hi in [*cs[:len(sub) - 1], total]:
                pieces.append(target[lo:hi].sum(dim=0) if hi > lo
                              else torch.zeros((b, b), device=dev, dtype=torch.float32))
                lo = hi
    return torch.stack(pieces) if deterministic else out


# ----------------------------------------------------------------------------- normalisation and loss


def _row_block(b: int) -> Tuple[int, int]:
    """(rows per program, padded row length): at most 4096 fp32 values a tile, no spills."""
    block_c = max(_next_pow2(b), 16)
    return max(1, min(ROW_BLOCK, 4096 // block_c)), block_c


@triton.jit(do_not_specialize=["b"])
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
    br, bc = _row_block(b)
    LAUNCHES["row_normalize"] += 1
    _launch(_row_normalize_kernel, wrap)[(P, triton.cdiv(b, br))](g, out, b, EPS, BLOCK_R=br, BLOCK_C=bc)
    return out


@triton.jit(do_not_specialize=["b"])
def _sp_finish_kernel(gs_ptr, gt_ptr, part_ptr, b, eps, inv_b2, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    rb = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < b)[:, None] & (cols < b)[None, :]
    offs = p.to(tl.int64) * b * b + rows[:, None].to(tl.int64) * b + cols[None, :]
    gs = tl.load(gs_ptr + offs, mask=mask, other=0.0)
    gt = tl.load(gt_ptr + offs, mask=mask, other=0.0)
    n = tl.sqrt(tl.sum(gs * gs, axis=1))
    d = gt - gs / tl.maximum(n, eps)[:, None]
    # one partial per program, summed afterwards in a fixed order: no atomics, bitwise repeatable
    tl.store(part_ptr + p * tl.num_programs(1) + rb, tl.sum(tl.sum(d * d, axis=1), axis=0) * inv_b2)


def sp_finish(gs_raw: torch.Tensor, gt: torch.Tensor, *, wrap: Optional[Callable] = None) -> torch.Tensor:
    """fp32 scalar ``sum_p ||gt_p - normalize(gs_raw_p)||_F^2 / b^2`` for all pairs in one launch."""
    P, b, _ = gs_raw.shape
    if P == 0:
        return torch.zeros((), device=gs_raw.device, dtype=torch.float32)
    br, bc = _row_block(b)
    nrb = triton.cdiv(b, br)
    part = torch.empty((P, nrb), device=gs_raw.device, dtype=torch.float32)
    LAUNCHES["sp_finish"] += 1
    _launch(_sp_finish_kernel, wrap)[(P, nrb)](
        gs_raw, gt, part, b, EPS, 1.0 / (b * b), BLOCK_R=br, BLOCK_C=bc)
    return part.sum()


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["b"])
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
    br, bc = _row_block(b)
    LAUNCHES["sp_grad_gram"] += 1
    _launch(_sp_grad_gram_kernel, wrap)[(P, triton.cdiv(b, br))](
        grad, gs_raw, gt, dg, b, EPS, 2.0 / (b * b), BLOCK_R=br, BLOCK_C=bc)
    return dg


@triton.jit
def _grad_part(q_ptr, dq_ptr, F, stride_b, dstride_b, col_blk, m_ptr, b, ti,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, ALIGN: tl.constexpr, SPLIT_BF16: tl.constexpr):
    if ALIGN > 1:
        F = tl.multiple_of(F, ALIGN)
        stride_b = tl.multiple_of(stride_b, ALIGN)
        dstride_b = tl.multiple_of(dstride_b, ALIGN)
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
        # M = dGr + dGr^T, formed once by the launcher (fp32 (b, b) slot)
        m = tl.load(m_ptr + gi[:, None] + rows_j[None, :], mask=mm, other=0.0)
        q = tl.load(q_ptr + rows_j[:, None].to(tl.int64) * stride_b + ks[None, :],
                    mask=mj[:, None] & mk[None, :], other=0.0)
        if SPLIT_BF16:
            # bf16 tensor cores: Q is exact in bf16 and M = hi + lo in two bf16 parts, so two bf16
            # MMAs give M Q to about 2**-16 relative (one bf16 M would round it to 2**-8)
            m_hi = m.to(tl.bfloat16)
            m_lo = (m - m_hi.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(m_hi, q, acc)
            acc = tl.dot(m_lo, q, acc)
        else:
            acc = tl.dot(m, q.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(dq_ptr + rows_i[:, None].to(tl.int64) * dstride_b + ks[None, :],
             acc.to(dq_ptr.dtype.element_ty), mask=mi[:, None] & mk[None, :])


_GRAD_INTS = ["b", "slot0"] + [f"{c}{i}" for c in "fst" for i in range(8)] + [f"c{i}" for i in range(1, 8)]


@triton.jit(do_not_specialize=_GRAD_INTS)
def _sp_grad_features_kernel(
    m_ptr, b, slot0,
    p0, p1, p2, p3, p4, p5, p6, p7,
    d0, d1, d2, d3, d4, d5, d6, d7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    s0, s1, s2, s3, s4, s5, s6, s7,
    t0, t1, t2, t3, t4, t5, t6, t7,
    c1, c2, c3, c4, c5, c6, c7,
    NT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ALIGN: tl.constexpr, SPLIT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    ti = tl.program_id(1)
    bb = b.to(tl.int64) * b
    base = (slot0 + tl.zeros((), tl.int64)) * bb
    if pid < c1:
        _grad_part(p0, d0, f0, s0, t0, pid, m_ptr + base, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 1:
        if (pid >= c1) & (pid < c2):
            _grad_part(p1, d1, f1, s1, t1, pid - c1, m_ptr + base + 1 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 2:
        if (pid >= c2) & (pid < c3):
            _grad_part(p2, d2, f2, s2, t2, pid - c2, m_ptr + base + 2 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 3:
        if (pid >= c3) & (pid < c4):
            _grad_part(p3, d3, f3, s3, t3, pid - c3, m_ptr + base + 3 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 4:
        if (pid >= c4) & (pid < c5):
            _grad_part(p4, d4, f4, s4, t4, pid - c4, m_ptr + base + 4 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 5:
        if (pid >= c5) & (pid < c6):
            _grad_part(p5, d5, f5, s5, t5, pid - c5, m_ptr + base + 5 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 6:
        if (pid >= c6) & (pid < c7):
            _grad_part(p6, d6, f6, s6, t6, pid - c6, m_ptr + base + 6 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)
    if NT > 7:
        if pid >= c7:
            _grad_part(p7, d7, f7, s7, t7, pid - c7, m_ptr + base + 7 * bb, b, ti, BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)


def _grad_block_i(b: int) -> int:
    return min(max(_next_pow2(b), 16), GRAD_MAX_BLOCK_I)


def sp_grad_features(dg: torch.Tensor, qs: Sequence[torch.Tensor], dqs: Sequence[torch.Tensor], *,
                     precision: str = "ieee", wrap: Optional[Callable] = None) -> None:
    """Write ``dqs[p] = (dg[p] + dg[p]^T) @ qs[p]`` for every pair (row views, dense rows).

    M = dg + dg^T is formed once (one elementwise pass over the small (P, b, b) tensor), so each
    program reads one M tile per step instead of two. bf16 inputs multiply on bf16 tensor cores
    (M split into two bf16 parts); fp32 and fp16 inputs multiply M by Q in fp32 (``precision``)."""
    if not qs:
        return
    _check_rows(qs, "qs")
    b = qs[0].shape[0]
    block_i = _grad_block_i(b)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    m = dg + dg.transpose(1, 2)
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
        # fp32/fp16: fp32 M times Q converted to fp32, so the precision applies to both
        _launch(_sp_grad_features_kernel, wrap)[(total, triton.cdiv(b, block_i))](
            m, b, grp.start, *ps, *ds, *fs, *ss, *ts, *cs,
            NT=len(sub), BLOCK_I=block_i, BLOCK_J=GRAD_BLOCK_J, BLOCK_K=GRAD_BLOCK_K,
            PRECISION=precision, ALIGN=_align(*fs, *ss, *ts),
            SPLIT_BF16=all(q.dtype == torch.bfloat16 for q in sub), num_warps=GRAD_NUM_WARPS, num_stages=NUM_STAGES,
        )


# ----------------------------------------------------------------------------- AOT variants

_TRITON_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# NT = 8 (eight inlined copies of the per-tensor body) takes 10-30 s to compile each; the copies are
# identical to NT = 1's, so registers match (checked: 191-222 vs 170-195, no spills): CI compiles
# the 8-tensor form for the two training dtypes (fp32 default, bf16 autocast) only
_NT8_TAGS = ("fp32_ieee", "bf16")


def aot_variants() -> List[dict]:
    """Every kernel configuration runtime can compile (tests/test_aot.py compiles them for sm_90).

    Axes: input dtype and, for fp32, the dot precision; ALIGN 16/1; atomic or deterministic Gram;
    the padded row length of the (b, b) kernels for b in {16, 256, 1024}; grad row tile 16 and
    128. The tensor count NT only adds identical per-tensor branches, so NT = 8 is compiled for
    the aligned atomic fp32-IEEE and bf16 variants and NT = 1 for the rest. All pointers are 16-byte aligned (torch's
    allocations; row views of sliced tensors can be less, which only drops that hint).
    """
    out: List[dict] = []
    gram_args = _gram_kernel.arg_names
    for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32")):
        tag = dt if dt != "fp32" else f"fp32_{prec}"
        for align in (16, 1):
            for atomic in (True, False):
                nts = (1, 8) if (align == 16 and atomic and tag in _NT8_TAGS) else (1,)
                for nt in nts:
                    sig = {a: "i32" for a in gram_args}
                    sig["g_ptr"] = "*fp32"
                    for i in range(8):
                        sig[f"p{i}"] = _TRITON_DTYPES[dt]
                    consts = dict(NT=nt, BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K,
                                  PRECISION=prec, ALIGN=align, ATOMIC=atomic)
                    for k in consts:
                        sig[k] = "constexpr"
                    out.append(dict(
                        name=f"sp_gram_{tag}_nt{nt}_align{align}_{'atomic' if atomic else 'det'}",
                        fn=_gram_kernel, signature=sig, constexprs=consts,
                        divisible_by_16=["g_ptr"] + [f"p{i}" for i in range(8)],
                        num_warps=GRAM_NUM_WARPS, num_stages=_gram_stages(dt == "fp32")))
        for align in (16, 1):
            for block_i in (16, GRAD_MAX_BLOCK_I):
                nts = (1, 8) if (align == 16 and block_i == GRAD_MAX_BLOCK_I and tag in _NT8_TAGS) else (1,)
                for nt in nts:
                    sig = {a: "i32" for a in _sp_grad_features_kernel.arg_names}
                    sig["m_ptr"] = "*fp32"
                    for i in range(8):
                        sig[f"p{i}"] = sig[f"d{i}"] = _TRITON_DTYPES[dt]
                    consts = dict(NT=nt, BLOCK_I=block_i, BLOCK_J=GRAD_BLOCK_J, BLOCK_K=GRAD_BLOCK_K,
                                  PRECISION=prec, ALIGN=align, SPLIT_BF16=dt == "bf16")
                    for k in consts:
                        sig[k] = "constexpr"
                    out.append(dict(
                        name=f"sp_grad_features_{tag}_nt{nt}_bi{block_i}_align{align}",
                        fn=_sp_grad_features_kernel, signature=sig, constexprs=consts,
                        divisible_by_16=["m_ptr"] + [f"{c}{i}" for c in "pd" for i in range(8)],
                        num_warps=GRAD_NUM_WARPS, num_stages=NUM_STAGES))
    for b in (16, 256, 1024):
        br, bc = _row_block(b)
        consts = dict(BLOCK_R=br, BLOCK_C=bc)
        for name, fn, ptrs in (("sp_row_normalize", _row_normalize_kernel, ["g_ptr", "out_ptr"]),
                               ("sp_finish", _sp_finish_kernel, ["gs_ptr", "gt_ptr", "part_ptr"]),
                               ("sp_grad_gram", _sp_grad_gram_kernel, ["grad_ptr", "gs_ptr", "gt_ptr", "dg_ptr"])):
            sig = {a: "fp32" for a in fn.arg_names}
            sig.update({p: "*fp32" for p in ptrs}, b="i32", BLOCK_R="constexpr", BLOCK_C="constexpr")
            out.append(dict(name=f"{name}_c{bc}", fn=fn, signature=sig, constexprs=dict(consts),
                            divisible_by_16=list(ptrs), num_warps=4, num_stages=NUM_STAGES))
    return out


__all__ = [
    "EPS", "LAUNCHES", "MAX_TENSORS", "aot_variants", "gram", "row_normalize", "sp_finish", "sp_grad_features",
    "sp_grad_gram",
]
