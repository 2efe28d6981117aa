"""Fused similarity-preserving (SP) distillation kernels: batched Gram, row normalisation, loss, backward.

Tensors in, tensors out: no ``torch.nn``, no lopfast imports. Every feature tensor is a (b, ...)
tensor whose samples are each one dense block of memory (NCHW, channels_last, any order of a
sample's dims, a slice along the batch or at an offset: ``sample_layout``); the kernels read it
as its (b, F) row view ``Q`` (sample stride anything, features dense) without building one: the
Gram ``Q Q^T`` does not depend on the order of the features inside a sample, and a gradient of
the same layout receives dQ in the same order.

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
  one (P, b, b) buffer (zeroed first). So all P Grams take ceil(P / T) launches on this path: 7
  for the 55 pairs of a ResNet-56. Scalar argument lists work everywhere, the interpreter (our
  CPU CI) included.
* ``gram`` on CUDA, the *table* path (``_gram_table_kernel``, section "device-side pair table"):
  an int64 device table holds per pair the row view's address, feature count, sample stride,
  output slot and element offset from pair 0's tensor (the kernel's one pointer argument),
  followed by a flattened work list of (pair, upper tile, split-K chunk, output offset). ONE
  launch per dtype covers every pair of the step (1 instead of 7 for ResNet-56), with the same
  tiles, split-K plan, atomic / deterministic modes, precision and 16-byte loads as above. The
  table is built from host metadata once per address set and kept on the device (an LRU; see
  that section): a step that repeats the previous one's addresses uploads nothing. CUDA-graph
  capture keeps the per-pair launches (``table_supported``); torch.compile never sees these
  launchers (the op layer registers opaque custom ops), so a compiled graph takes the same path
  as eager code at run time. Auto takes the table on CUDA from ``TABLE_MIN_PAIRS`` (9) pairs on,
  where it saves launches; the CPU tests run the table kernels through the interpreter with
  ``table=True`` (they add offsets to a real pointer: no loaded pointers, which the interpreter
  could not follow).
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
  gradient written once. On CUDA the table path does the same in ONE launch per dtype
  (``_sp_grad_features_table_kernel``: work list of (pair, feature column block)).

Totals, per-pair path: forward ceil(P/T) + 1 kernel launches (+ a memset, + the loss's sum) for
the student given the teacher Grams; the teacher Grams cost ceil(P/T) + 1 more (+ a memset).
Backward 1 + ceil(P/T) (+ M = dG + dG^T). Table path (CUDA, one dtype): forward 1 + 1, teacher
1 + 1, backward 1 + 1 (+ the same memsets, sum and M; no table copy once the tables are cached):
ResNet-56's 55 pairs go from 7 + 1 + 7 + 1 + 1 + 7 = 24 kernel launches a step to 6.

Host work: every launcher's plan (checks, layouts, dtype groups, split-K plan, padded argument
lists, device tables) is cached by the call's signature (section "call plans"), so a repeated
call costs about a microsecond a tensor, one lookup and the launches.

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
is a multiple of 16, else 1) and the kernel re-asserts the divisibility as ``x // ALIGN * ALIGN``
(the value is unchanged, and Triton's alignment analysis sees the multiple; ``tl.multiple_of`` on
a kernel argument is dropped: the AOT PTX then shows scalar loads): at most two variants per
(kernel, tensor count, dtype, precision, mode), and the aligned one keeps 16-byte ``cp.async``
loads (tests/test_sp_table.py checks the PTX). The tensor count is 1 or 8 (``_nt``: a launch of
2-7 tensors pads to 8 with featureless slots no program reaches), and a per-pair launch holds
tensors of one dtype (``_groups``), so a model's step compiles at most two per-pair variants per
kernel and dtype. ``aot_variants()`` derives every variant the launchers can pick from these
same rules (for the AOT report: each must compile for sm_90 without spilling).

Launches are direct (no ``torch.library.wrap_triton``): torch.compile records the op layer's
opaque custom ops with fake implementations and never analyses these launchers, whose host-side
plans and device tables could not be traced. Integer arguments are still cast with ``tl.cast``
(an analysis that passes them as Python ints, as Inductor's of triton 3.6 does, stays valid).
``LAUNCHES`` counts kernel launches per kernel name, and table builds and uploads (tests and the
benchmarks use it to prove a kernel ran and that nothing was rebuilt).
"""
from __future__ import annotations

import collections
import functools
import math
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

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
MAX_BATCH = 4096  # largest b of a Gram: the row kernels' padded row (BLOCK_C) goes up to this


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
        # (x // A) * A is x itself here, but Triton's alignment analysis sees a multiple of A;
        # tl.multiple_of on a kernel argument is dropped (AOT check: scalar 2-byte loads, no cp.async)
        F = F // ALIGN * ALIGN
        stride_b = stride_b // ALIGN * ALIGN
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
    bb = tl.cast(b, tl.int64) * b  # tl.cast: also when b arrives as a Python int (a traced launch)
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


def _precision_checked(precision: str) -> bool:
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    return True


def _dtype_checked(qs: Sequence[torch.Tensor], argname: str) -> None:
    for i, q in enumerate(qs):
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            # tl.dot has no fp64 (or other) form on sm_90; the op layer sends float64 to the reference
            raise TypeError(f"{argname}[{i}]: the Triton SP kernels take float32/float16/bfloat16, got {q.dtype}")


@functools.lru_cache(maxsize=4096)
def _layout(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> Optional[Tuple[int, int]]:
    if not shape:
        return None
    feats = 1
    for n in shape[1:]:
        feats *= n
    # the sample's dims by decreasing stride must tile one dense block (size-1 dims have no stride)
    expect = 1
    for st, n in sorted(((st, n) for n, st in zip(shape[1:], stride[1:]) if n != 1), reverse=True)[::-1]:
        if st != expect:
            return None
        expect *= n
    # one sample: its stride is never used (row 0); F keeps the alignment test meaningful
    return feats, (stride[0] if shape[0] > 1 else max(feats, 1))


def sample_layout(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """``(F, sample stride)`` of a (b, ...) tensor whose samples are each one dense block of memory
    (contiguous, channels_last, any permutation of the sample's dims, a slice along the batch or
    at an offset), else None. The kernels read such a tensor as its (b, F) row view without
    building one: the Gram does not depend on the order of the features inside a sample, and a
    gradient written in the same order lands in the same layout. Memoised by (shape, strides)."""
    return _layout(tuple(t.shape), t.stride())


def _rows(qs: Sequence[torch.Tensor], argname: str) -> List[Tuple[int, int]]:
    """Every tensor's (F, sample stride); refuses dtypes without a tensor-core form and tensors
    whose samples are not dense blocks (the op layer copies those)."""
    _dtype_checked(qs, argname)
    out = []
    for i, q in enumerate(qs):
        lay = _layout(tuple(q.shape), q.stride())
        if lay is None:
            raise ValueError(f"{argname}[{i}] must have dense samples (each sample one block of memory, "
                             f"e.g. a (b, F) row view, NCHW or channels_last); got shape {tuple(q.shape)}, "
                             f"strides {q.stride()}")
        out.append(lay)
    return out


def _groups(qs: Sequence[torch.Tensor]) -> List[range]:
    """The per-pair launches: runs of consecutive tensors of one dtype, at most ``MAX_TENSORS``
    each (one pointer type per launch: no mixed-dtype variant to compile; consecutive, so each
    launch's output slots are ``slot0 + k``)."""
    out, start = [], 0
    for i in range(1, len(qs) + 1):
        if i == len(qs) or i - start == MAX_TENSORS or qs[i].dtype != qs[start].dtype:
            out.append(range(start, i))
            start = i
    return out


def _nt(n: int) -> int:
    """The kernels' tensor count for a launch of ``n`` tensors: 1, or ``MAX_TENSORS`` with the
    unused slots padded (no feature, never reached): two compiled variants instead of eight."""
    return 1 if n == 1 else MAX_TENSORS


def grad_config(dtype: torch.dtype, precision: str) -> Tuple[str, int]:
    """(PRECISION, num_stages) of the dQ kernels for inputs of ``dtype`` under the fp32 matmul
    policy ``precision``: what the launchers pass and what ``aot_variants`` compiles. bf16 runs
    two bf16 MMAs whatever the policy (one variant); fp32 and fp16 multiply M by Q in fp32 as the
    policy says, except fp16 under "ieee": its IEEE fp32 dot (Q converted from fp16 in registers)
    spills on sm_90 at every pipelining depth under triton 3.6 or 3.8 (255 registers; AOT), so it
    runs 3xTF32 ("tf32x3": fp32-level error, ~2**-22, far below the fp16 rounding of the dQ it
    writes; no spills, at most 216 registers)."""
    if dtype == torch.bfloat16:
        return "tf32", NUM_STAGES
    if dtype == torch.float16 and precision == "ieee":
        return "tf32x3", NUM_STAGES
    return precision, NUM_STAGES


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if NUM_SMS is not None:
        return NUM_SMS
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


@functools.lru_cache(maxsize=1024)
def _plan(b: int, feats: Tuple[int, ...], sms: int) -> Tuple[int, int]:
    nt = triton.cdiv(b, GRAM_BLOCK_B)
    tiles = nt * (nt + 1) // 2
    blocks = sum(triton.cdiv(f, GRAM_BLOCK_K) for f in feats)
    k_iters = max(1, triton.cdiv(blocks * tiles, GRAM_WAVES * sms))
    chunk = GRAM_BLOCK_K * k_iters
    return k_iters, sum(triton.cdiv(f, chunk) for f in feats) * tiles


def gram_plan(qs: Sequence[torch.Tensor]) -> Tuple[int, int]:
    """(k_iters, programs) of one Gram launch over ``qs``: the split-K is sized so that the launch
    has about ``GRAM_WAVES`` waves of programs on the device's SMs (fewer, longer chunks when the
    Grams are large; more, shorter ones for few tensors or few tiles)."""
    feats = tuple(f for f, _ in _rows(qs, "qs"))
    return _plan(qs[0].shape[0], feats, _num_sms(qs[0].device))


def _align(*ints: int) -> int:
    """16 when every feature count / row stride of a launch is a multiple of 16, else 1."""
    return 16 if all(int(v) % 16 == 0 for v in ints) else 1


def _multi_ints(rows: Sequence[Tuple[int, int]], chunk: int):
    """The per-tensor (F, stride) lists padded to MAX_TENSORS and the chunk boundaries of a group."""
    pad = MAX_TENSORS - len(rows)
    fs = [f for f, _ in rows] + [0] * pad
    ss = [s for _, s in rows] + [0] * pad
    bounds, total = [], 0
    for f, _ in rows:
        total += triton.cdiv(f, chunk)
        bounds.append(total)
    bounds = bounds + [total] * pad
    return fs, ss, bounds[:MAX_TENSORS - 1], total


def _padded(qs: Sequence[torch.Tensor], grp: range) -> List[torch.Tensor]:
    return [qs[i] for i in grp] + [qs[grp.start]] * (MAX_TENSORS - len(grp))


# ----------------------------------------------------------------------------- call plans
#
# The host out of the hot path: everything a launch needs besides the tensors themselves (the
# checks, the layout of every tensor, the dtype groups, the split-K plan, the padded argument
# lists, the device tables) is worked out once per *call signature* (every tensor's address,
# shape, strides and dtype, plus the switches that steer the plan) and kept in an LRU of call
# plans. A training step whose tensors sit where the previous step's did (the caching
# allocator's usual behaviour) costs the signature (about a microsecond a tensor), one dict
# lookup and the launches. Calls under a trace, with fake tensors or during CUDA-graph capture
# are planned afresh each time (nothing to key on, or nothing worth keeping).

_REAL = (torch.Tensor, torch.nn.Parameter)


def _call_plan(kind: tuple, tensors: Sequence[torch.Tensor], build, outputs: Sequence[torch.Tensor] = ()):
    """The cached plan of a call on ``tensors`` (keyed by their addresses too) writing into
    ``outputs`` (keyed by shape, strides and dtype only: fresh tensors every call), or ``build()``."""
    first = tensors[0]
    if torch.compiler.is_compiling() or _dispatch_mode_active() or \
            any(type(t) not in _REAL for t in tensors) or any(type(t) not in _REAL for t in outputs):
        return build()
    capturing = _stream_capturing()
    key = (kind, first.device, capturing, USE_TABLE, TABLE_MIN_PAIRS, NUM_SMS, _interpreting(),
           tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors),
           tuple((t.shape, t.stride(), t.dtype) for t in outputs))
    plan = _CALLS.get(key)
    if plan is None:
        plan = _CALLS.put(key, build())
    return plan


def gram(qs: Sequence[torch.Tensor], *, precision: str = "ieee", deterministic: bool = False,
         table: Optional[bool] = None) -> torch.Tensor:
    """Raw Grams ``Q Q^T`` of every tensor in ``qs`` (same b; each a (b, ...) tensor with dense
    samples, read as its (b, F) row view: ``sample_layout``), as one fp32 (P, b, b) tensor.

    ``precision`` ("ieee" or "tf32") applies to fp32 inputs; ``deterministic`` replaces the split-K
    atomics by per-chunk partial Grams summed in chunk order (bitwise repeatable). ``table``: True
    walks every pair in one launch per dtype through a device-side pair table (CUDA; the CPU
    interpreter), False launches per group of ``MAX_TENSORS``, None picks the table on CUDA for at
    least ``TABLE_MIN_PAIRS`` pairs when ``table_supported``. The launch plan is cached by the
    call's signature (see "call plans")."""
    if not qs:
        raise ValueError("qs is empty")
    return _call_plan(("gram", precision, deterministic, table), qs,
                      lambda: _gram_call(qs, precision, deterministic, table))(qs)


def _gram_call(qs: Sequence[torch.Tensor], precision: str, deterministic: bool, table: Optional[bool]):
    rows = _rows(qs, "qs")
    b = qs[0].shape[0]
    if b > MAX_BATCH:  # the (b, b) kernels hold a whole padded row: compiled (AOT) up to this
        raise ValueError(f"qs: batch size {b} too large for the Triton SP kernels (at most {MAX_BATCH} samples "
                         f"per Gram); use backend='torch'")
    _precision_checked(precision)
    dev, P = qs[0].device, len(qs)
    nt = triton.cdiv(b, GRAM_BLOCK_B)
    if _use_table(qs, table):
        groups = []
        for idx in _by_dtype(qs, skip_empty=True):
            sub = [qs[i] for i in idx]
            t = _gram_table(sub, [rows[i] for i in idx], idx if not deterministic else list(range(len(sub))), b,
                            deterministic)
            groups.append((idx, t, _dot_precision(sub, precision), _gram_stages(sub[0].dtype == torch.float32)))

        def run_table(qs):
            out = None if deterministic else torch.zeros((P, b, b), device=dev, dtype=torch.float32)
            pieces: List[Optional[torch.Tensor]] = [None] * P
            for idx, t, prec, stages in groups:
                target = out
                if deterministic:
                    target = torch.empty((max(t.n_partials, 1), b, b), device=dev, dtype=torch.float32)
                if t.n_work:
                    LAUNCHES["gram"] += 1
                    LAUNCHES["gram_table"] += 1
                    LAUNCHES["gram_deterministic"] += int(deterministic)
                    _gram_table_kernel[(t.n_work,)](
                        target, t.pairs.tensor(), t.work.tensor(), qs[idx[0]], b, t.k_iters,
                        BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K, PRECISION=prec, ALIGN=t.align,
                        ATOMIC=not deterministic, num_warps=GRAM_NUM_WARPS, num_stages=stages)
                if deterministic:  # second stage: each pair's chunk partials, summed in chunk order
                    for i, (lo, hi) in zip(idx, t.partials):
                        pieces[i] = target[lo:hi].sum(dim=0) if hi > lo else None
            if not deterministic:
                return out
            zero = torch.zeros((b, b), device=dev, dtype=torch.float32)  # featureless pairs: zero Grams
            return torch.stack([z if z is not None else zero for z in pieces])

        return run_table

    # per-pair launches: groups of MAX_TENSORS, each tensor its own pointer argument
    # atomic mode accumulates into one zeroed (P, b, b) buffer; deterministic mode builds the result
    # from per-group partial buffers without writing into views
    sms = _num_sms(dev)
    launches = []
    for grp in _groups(qs):
        sub = [qs[i] for i in grp]
        sub_rows = [rows[i] for i in grp]
        k_iters, _ = _plan(b, tuple(f for f, _ in sub_rows), sms)
        fs, ss, cs, total = _multi_ints(sub_rows, GRAM_BLOCK_K * k_iters)
        launches.append((grp, fs, ss, cs, total, k_iters, _dot_precision(sub, precision), _align(*fs, *ss),
                         _gram_stages(sub[0].dtype == torch.float32)))

    def run_pairs(qs):
        out = None if deterministic else torch.zeros((P, b, b), device=dev, dtype=torch.float32)
        pieces: List[torch.Tensor] = []
        for grp, fs, ss, cs, total, k_iters, prec, align, stages in launches:
            if total == 0:  # every tensor of the group has 0 features: Grams are 0
                pieces += [torch.zeros((b, b), device=dev, dtype=torch.float32) for _ in grp]
                continue
            target = out if not deterministic else torch.empty((total, b, b), device=dev, dtype=torch.float32)
            LAUNCHES["gram"] += 1
            LAUNCHES["gram_deterministic"] += int(deterministic)
            _gram_kernel[(total, nt * (nt + 1) // 2)](
                target, b, grp.start, k_iters, *_padded(qs, grp), *fs, *ss, *cs,
                NT=_nt(len(grp)), BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K,
                PRECISION=prec, ALIGN=align, ATOMIC=not deterministic,
                num_warps=GRAM_NUM_WARPS, num_stages=stages,
            )
            if deterministic:  # second stage: each tensor's chunk partials, summed in chunk order
                lo = 0
                for hi in [*cs[:len(grp) - 1], total]:
                    pieces.append(target[lo:hi].sum(dim=0) if hi > lo
                                  else torch.zeros((b, b), device=dev, dtype=torch.float32))
                    lo = hi
        return torch.stack(pieces) if deterministic else out

    return run_pairs


# ----------------------------------------------------------------------------- normalisation and loss


def _row_block(b: int) -> Tuple[int, int]:
    """(rows per program, padded row length): at most 4096 fp32 values a tile, no spills."""
    if b > MAX_BATCH:
        raise ValueError(f"batch size {b} too large for the Triton SP kernels (at most {MAX_BATCH})")
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


def row_normalize(g: torch.Tensor) -> torch.Tensor:
    """Each row of each (b, b) slot of the fp32 (P, b, b) tensor ``g`` divided by its L2 norm."""
    P, b, _ = g.shape
    out = torch.empty_like(g)
    if P == 0:
        return out
    br, bc = _row_block(b)
    LAUNCHES["row_normalize"] += 1
    _row_normalize_kernel[(P, triton.cdiv(b, br))](g, out, b, EPS, BLOCK_R=br, BLOCK_C=bc)
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


def sp_finish(gs_raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """fp32 scalar ``sum_p ||gt_p - normalize(gs_raw_p)||_F^2 / b^2`` for all pairs in one launch."""
    P, b, _ = gs_raw.shape
    if P == 0:
        return torch.zeros((), device=gs_raw.device, dtype=torch.float32)
    br, bc = _row_block(b)
    nrb = triton.cdiv(b, br)
    part = torch.empty((P, nrb), device=gs_raw.device, dtype=torch.float32)
    LAUNCHES["sp_finish"] += 1
    _sp_finish_kernel[(P, nrb)](
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


def sp_grad_gram(grad: torch.Tensor, gs_raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """dL/dGr (P, b, b) fp32 of all pairs in one launch; ``grad`` is the 1-element incoming gradient."""
    P, b, _ = gs_raw.shape
    dg = torch.empty_like(gs_raw)
    if P == 0:
        return dg
    br, bc = _row_block(b)
    LAUNCHES["sp_grad_gram"] += 1
    _sp_grad_gram_kernel[(P, triton.cdiv(b, br))](
        grad, gs_raw, gt, dg, b, EPS, 2.0 / (b * b), BLOCK_R=br, BLOCK_C=bc)
    return dg


@triton.jit
def _grad_part(q_ptr, dq_ptr, F, stride_b, dstride_b, col_blk, m_ptr, b, ti,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, ALIGN: tl.constexpr, SPLIT_BF16: tl.constexpr):
    if ALIGN > 1:  # as in _gram_part: visible to the alignment analysis, unlike tl.multiple_of
        F = F // ALIGN * ALIGN
        stride_b = stride_b // ALIGN * ALIGN
        dstride_b = dstride_b // ALIGN * ALIGN
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
    bb = tl.cast(b, tl.int64) * b  # tl.cast: also when b arrives as a Python int (a traced launch)
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
    # two row tiles only: 32 and 64 spill a few bytes in some (dtype, tensor count, alignment)
    # variants (AOT report), so 17 <= b <= 64 takes the 128-row tile with its rows masked (the dQ
    # of so small a batch is a small kernel either way)
    return 16 if b <= 16 else GRAD_MAX_BLOCK_I


def sp_grad_features(dg: torch.Tensor, qs: Sequence[torch.Tensor], dqs: Sequence[torch.Tensor], *,
                     precision: str = "ieee", table: Optional[bool] = None) -> None:
    """Write ``dqs[p] = (dg[p] + dg[p]^T) @ qs[p]`` for every pair (tensors with dense samples, as
    in ``gram``; ``dqs[p]`` has the shape and dtype of ``qs[p]``, its samples dense and disjoint,
    and receives the gradient in its own layout).

    M = dg + dg^T is formed once (one elementwise pass over the small (P, b, b) tensor), so each
    program reads one M tile per step instead of two. bf16 inputs multiply on bf16 tensor cores
    (M split into two bf16 parts); fp32 and fp16 inputs multiply M by Q in fp32 (``precision``).
    ``table`` as in ``gram``: one launch per dtype through the device-side pair table (CUDA). The
    launch plan is cached by the call's signature, as in ``gram``."""
    if not qs:
        return
    _call_plan(("grad", precision, table), qs, lambda: _grad_call(qs, dqs, precision, table), dqs)(dg, qs, dqs)


def _grad_call(qs: Sequence[torch.Tensor], dqs: Sequence[torch.Tensor], precision: str, table: Optional[bool]):
    rows = _rows(qs, "qs")
    drows = _rows(dqs, "dqs")
    b = qs[0].shape[0]
    for i, ((f, _), (df, ds), q, d) in enumerate(zip(rows, drows, qs, dqs)):
        if df != f or d.dtype != q.dtype or d.shape[0] != b or (b > 1 and f > 0 and ds < f):
            raise ValueError(f"dqs[{i}] must hold {f} features per sample of dtype {q.dtype} for {b} samples, "
                             f"samples not overlapping; got shape {tuple(d.shape)}, strides {d.stride()}, {d.dtype}")
    block_i = _grad_block_i(b)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if b > MAX_BATCH:
        raise ValueError(f"qs: batch size {b} too large for the Triton SP kernels (at most {MAX_BATCH})")
    if _use_table(qs, table):
        groups = []
        for idx in _by_dtype(qs, skip_empty=True):  # featureless pairs have empty gradients
            t = _grad_table([qs[i] for i in idx], [rows[i] for i in idx], [drows[i] for i in idx], idx, b)
            if t.n_work:
                dtype = qs[idx[0]].dtype
                groups.append((idx, t, _DOffsets(), dtype == torch.bfloat16, *grad_config(dtype, precision)))

        def run_table(dg, qs, dqs):
            m = dg + dg.transpose(1, 2)
            for idx, t, doffs, split, prec, stages in groups:
                dsub = [dqs[i] for i in idx]
                d_table, d_align = doffs.tensor(dsub)
                LAUNCHES["sp_grad_features"] += 1
                LAUNCHES["sp_grad_features_table"] += 1
                _sp_grad_features_table_kernel[(t.n_work, triton.cdiv(b, block_i))](
                    m, t.pairs.tensor(), t.work.tensor(), d_table, qs[idx[0]], dsub[0], b,
                    BLOCK_I=block_i, BLOCK_J=GRAD_BLOCK_J, BLOCK_K=GRAD_BLOCK_K, PRECISION=prec,
                    ALIGN=min(t.align, d_align), SPLIT_BF16=split, num_warps=GRAD_NUM_WARPS, num_stages=stages)

        return run_table

    launches = []
    for grp in _groups(qs):
        fs, ss, cs, total = _multi_ints([rows[i] for i in grp], GRAD_BLOCK_K)
        if total == 0:
            continue
        ts = [drows[i][1] for i in grp] + [0] * (MAX_TENSORS - len(grp))
        dtype = qs[grp.start].dtype
        launches.append((grp, fs, ss, ts, cs, total, _align(*fs, *ss, *ts), dtype == torch.bfloat16,
                         *grad_config(dtype, precision)))

    def run_pairs(dg, qs, dqs):
        m = dg + dg.transpose(1, 2)
        for grp, fs, ss, ts, cs, total, align, split, prec, stages in launches:
            LAUNCHES["sp_grad_features"] += 1
            # fp32/fp16: fp32 M times Q converted to fp32, so the precision applies to both
            _sp_grad_features_kernel[(total, triton.cdiv(b, block_i))](
                m, b, grp.start, *_padded(qs, grp), *_padded(dqs, grp), *fs, *ss, *ts, *cs,
                NT=_nt(len(grp)), BLOCK_I=block_i, BLOCK_J=GRAD_BLOCK_J, BLOCK_K=GRAD_BLOCK_K,
                PRECISION=prec, ALIGN=align, SPLIT_BF16=split, num_warps=GRAD_NUM_WARPS, num_stages=stages,
            )

    return run_pairs


# ----------------------------------------------------------------------------- device-side pair table (CUDA)
#
# The per-pair launchers above take each tensor as its own pointer argument: at most MAX_TENSORS
# per launch. The table path puts every pair of a step (of one dtype) into ONE launch: an int64
# table holds, per pair, the address of its tensor (``data_ptr``), feature count, sample stride,
# output slot, the element offset from pair 0's tensor and (backward) the gradient's sample
# stride; the gradients' element offsets from the first gradient sit in a small table of their
# own (the gradients are fresh tensors every call); a separate work list says what each program
# does. Pair 0's tensor is the kernel's pointer argument and pair p is addressed as
# ``ref_ptr + off_p``. Why offsets and
# not a cast of the loaded address to a pointer (``addr.to(tl.pointer_type(...))``, the
# grouped-GEMM tutorial's idiom): a cast pointer carries no alignment, so Triton copies element
# by element (AOT check on sm_90: scalar ``ld.global.b16`` / 4-byte ``cp.async``), while
# ``ref_ptr + off`` keeps the runtime's 16-byte specialisation of ``ref_ptr`` and, with ALIGN,
# 16-byte ``cp.async`` like the per-pair kernel. It relies on one flat address space (CUDA's; the
# host's under the interpreter, which is why the interpreter can run the table kernels on CPU
# tensors and CPU tests check them).
#
# Built once, reused (the host out of the hot path): the work list depends only on the shapes
# (feature counts, b, the split-K chunk, the output slots) and the pair rows only on the
# addresses, strides, dtype and shapes. Both are int64 device tensors kept in two small LRU caches
# (``TABLE_CACHE_SIZE``) keyed by exactly those values, so a training loop, whose allocator hands
# the same addresses to the same activations step after step, builds and uploads them in its
# first steps and afterwards only computes the key (a few host microseconds per pair) and
# launches. A key that misses (new addresses) rebuilds the small pair rows only; the work list
# is shared by every address set of a shape set. Each upload is one non-blocking H2D copy from a
# pinned host buffer that the cache entry owns for its whole life and never writes again, so no
# later call can overwrite a staging buffer whose copy may still be in flight; a use on another
# stream than the upload's waits for the upload (an event) and is recorded with the tensor's
# allocator (``record_stream``). The features and gradients themselves are the op's own tensors,
# alive until the kernels have run.
#
# Not for: traced tensors (FakeTensors have no ``data_ptr``), CUDA-graph capture, CUDA tensors
# under the interpreter (it copies them one by one). Under capture the per-pair launches run: their
# addresses are launch arguments, which a graph records and replays as they were (a captured
# step replays with the same addresses, so that is exactly what holds across replays), while a
# table would have to be uploaded before capture and outlive every replay of the graph, and its
# one saving, host launch time, is what replaying a graph removes anyway. ``table_supported``
# says when the table can run; auto (``USE_TABLE = None``) takes it on CUDA from
# ``TABLE_MIN_PAIRS`` pairs on. A launch holds the tensors of ONE dtype (the pointer type is
# fixed by ``ref_ptr``, and the element offsets are in that dtype's element size): mixed-dtype
# steps launch once per dtype.

# addr, F, sample stride, slot, dq addr, dq sample stride, element offset of Q from pair 0's Q, the
# same for dQ (64 bytes a row: aligned). The kernels read the offsets (the dQ offsets from their own
# table; ``build_grad_table`` shows them in this row); the addresses are for humans
PAIR_COLS = 8
GRAM_WORK_COLS = 5  # pair, ti, tj, chunk, element offset of the output (b, b) slot
GRAD_WORK_COLS = 2  # pair, feature column block
TABLE_MIN_PAIRS = MAX_TENSORS + 1  # auto: below this the per-pair launch is already one launch
# None: auto (CUDA tensors, at least TABLE_MIN_PAIRS pairs); True: wherever table_supported (the
# interpreter included: tests); False: never. A launcher's ``table=`` argument overrides it.
USE_TABLE: Optional[bool] = None
TABLE_CACHE_SIZE = 64  # device tables kept per cache (pair rows by address set; work lists by shape set)

_PAIR_COLS_C = tl.constexpr(PAIR_COLS)
_GRAM_WORK_COLS_C = tl.constexpr(GRAM_WORK_COLS)
_GRAD_WORK_COLS_C = tl.constexpr(GRAD_WORK_COLS)


class TablePlan(NamedTuple):
    """A table as host ints: ``PAIR_COLS`` per pair, then the work list (``n_work`` rows).

    ``partials[p] = (lo, hi)``: in deterministic Gram mode, the partial slots of pair p (summed in
    this order by the second stage); in atomic mode ``(slot, slot + 1)``."""

    ints: List[int]
    n_pairs: int
    n_work: int
    n_partials: int
    partials: List[Tuple[int, int]]


def _pair_row(addr: int, F: int, stride: int, slot: int, off: int,
              daddr: int = 0, dstride: int = 0, doff: int = 0) -> List[int]:
    return [int(addr), int(F), int(stride), int(slot), int(daddr), int(dstride), int(off), int(doff)]


def _elem_offsets(addrs: Sequence[int], elem_size: int, argname: str) -> List[int]:
    """Element offsets of the addresses from the first one (what the kernel adds to its pointer)."""
    ref = int(addrs[0]) if addrs else 0
    out = []
    for i, a in enumerate(addrs):
        d = int(a) - ref
        if d % elem_size:
            raise ValueError(f"{argname}[{i}]: address {a:#x} is not a whole number of {elem_size}-byte "
                             f"elements away from {argname}[0] ({ref:#x})")
        out.append(d // elem_size)
    return out


def gram_tiles(b: int) -> List[Tuple[int, int]]:
    """The upper-triangle (ti <= tj) b-tiles of a (b, b) Gram, column by column."""
    nt = triton.cdiv(b, GRAM_BLOCK_B)
    return [(ti, tj) for tj in range(nt) for ti in range(tj + 1)]


def _gram_work(feats: Sequence[int], slots: Sequence[int], b: int, chunk: int,
               deterministic: bool) -> Tuple[List[int], List[Tuple[int, int]], int]:
    """(work list, partials, number of output slots) of one Gram launch: shapes only."""
    if chunk <= 0 or b <= 0:
        raise ValueError(f"chunk and b must be positive, got chunk={chunk}, b={b}")
    tiles = gram_tiles(b)
    work: List[int] = []
    partials: List[Tuple[int, int]] = []
    nxt = 0
    bb = b * b
    for p, F in enumerate(feats):
        n_chunks = triton.cdiv(int(F), chunk)
        partials.append((nxt, nxt + n_chunks) if deterministic else (slots[p], slots[p] + 1))
        for c in range(n_chunks):
            off = (nxt + c) * bb if deterministic else slots[p] * bb
            for ti, tj in tiles:
                work += [p, ti, tj, c, off]
        if deterministic:
            nxt += n_chunks
    return work, partials, nxt if deterministic else len(feats)


def build_gram_table(pairs: Sequence[Tuple[int, int, int]], slots: Sequence[int], b: int, chunk: int,
                     deterministic: bool, elem_size: int) -> TablePlan:
    """Table of one Gram launch: ``pairs[p] = (address, F, sample stride)`` of tensors of one dtype
    (``elem_size`` bytes), ``slots[p]`` the pair's slot in the (P, b, b) output; ``chunk`` features
    per split-K chunk. The kernel addresses pair p as ``ref + off_p`` (element offset from pair 0,
    whose tensor is the launch's pointer argument). Work item = (pair, upper tile, chunk), tiles
    innermost (programs running together share a feature chunk in L2). Atomic mode: the item adds
    into its pair's slot; deterministic mode: each (pair, chunk) owns a partial slot, numbered
    pair by pair in chunk order."""
    work, partials, n_partials = _gram_work([F for _, F, _ in pairs], slots, b, chunk, deterministic)
    offs = _elem_offsets([p[0] for p in pairs], elem_size, "pairs")
    ints: List[int] = []
    for p, (addr, F, stride) in enumerate(pairs):
        ints += _pair_row(addr, F, stride, slots[p], offs[p])
    return TablePlan(ints + work, len(pairs), len(work) // GRAM_WORK_COLS, n_partials, partials)


def _grad_work(feats: Sequence[int], block_k: int) -> List[int]:
    work: List[int] = []
    for p, F in enumerate(feats):
        for c in range(triton.cdiv(int(F), block_k)):
            work += [p, c]
    return work


def build_grad_table(pairs: Sequence[Tuple[int, int, int, int, int]], slots: Sequence[int],
                     block_k: int, elem_size: int) -> TablePlan:
    """Table of one dQ launch: ``pairs[p] = (q address, F, q sample stride, dq address, dq sample
    stride)`` (one dtype, ``elem_size`` bytes), ``slots[p]`` the pair's slot of M; one work item
    per (pair, feature column block). Q and dQ are addressed from pair 0's Q and dQ."""
    offs = _elem_offsets([p[0] for p in pairs], elem_size, "pairs")
    doffs = _elem_offsets([p[3] for p in pairs], elem_size, "grads")
    ints: List[int] = []
    for p, (addr, F, stride, daddr, dstride) in enumerate(pairs):
        ints += _pair_row(addr, F, stride, slots[p], offs[p], daddr, dstride, doffs[p])
    work = _grad_work([p[1] for p in pairs], block_k)
    return TablePlan(ints + work, len(pairs), len(work) // GRAD_WORK_COLS, len(pairs),
                     [(s, s + 1) for s in slots])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def table_supported(qs: Sequence[torch.Tensor]) -> bool:
    """Whether the table path can run on these tensors: real (not traced) tensors whose addresses
    the kernel can offset between: CUDA tensors with compiled kernels outside CUDA-graph capture,
    or CPU tensors under the interpreter (it follows host addresses; it copies CUDA tensors one by
    one, which would break the offsets between them)."""
    if not qs or torch.compiler.is_compiling() or _dispatch_mode_active():
        return False
    # FakeTensor / FunctionalTensor (torch.compile, opcheck) are subclasses: no real data_ptr
    if not all(type(q) in (torch.Tensor, torch.nn.Parameter) for q in qs):
        return False
    if _stream_capturing():
        return False
    if _interpreting():
        if not all(q.device.type == "cpu" for q in qs):
            return False
    elif not all(q.is_cuda for q in qs):
        return False
    # element offsets between tensors of one dtype are whole numbers of elements
    return all(q.data_ptr() % q.element_size() == 0 for q in qs)


def _stream_capturing() -> bool:
    """Whether the current CUDA stream captures a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _dispatch_mode_active() -> bool:
    # make_fx / FakeTensorMode / proxy tracing push a dispatch mode (a real-tensor trace would
    # otherwise bake this call's addresses into a graph); eager launches run with none
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - very old torch
        return False
    return _get_current_dispatch_mode() is not None


def _use_table(qs: Sequence[torch.Tensor], table: Optional[bool]) -> bool:
    if table is None:
        if USE_TABLE is None:  # auto: CUDA, where it saves launches
            return len(qs) >= TABLE_MIN_PAIRS and qs[0].is_cuda and table_supported(qs)
        return bool(USE_TABLE) and table_supported(qs)
    if table and not table_supported(qs):
        raise ValueError("table=True needs real tensors on CUDA (outside CUDA-graph capture) or on the CPU "
                         "under the interpreter, and not traced by torch.compile (the table holds addresses)")
    return bool(table)


def _by_dtype(qs: Sequence[torch.Tensor], skip_empty: bool = False) -> List[List[int]]:
    """Indices of ``qs`` grouped by dtype, groups in order of first appearance; ``skip_empty``
    leaves out tensors without features (an empty tensor's address may be null: no base for
    the element offsets, and there is nothing to compute)."""
    groups: "collections.OrderedDict[torch.dtype, List[int]]" = collections.OrderedDict()
    for i, q in enumerate(qs):
        if not (skip_empty and math.prod(q.shape[1:]) == 0):
            groups.setdefault(q.dtype, []).append(i)
    return list(groups.values())


def _table_col(plan: TablePlan, col: int) -> List[int]:
    return [plan.ints[p * PAIR_COLS + col] for p in range(plan.n_pairs)]


class DeviceInts:
    """``ints`` as an int64 tensor on ``device``, uploaded once (CPU: the host tensor itself).

    The upload is one non-blocking copy from a pinned host buffer that this object keeps, and
    never writes again, for its whole life: no later call can refill a staging buffer whose copy
    is still in flight. ``tensor()`` hands the device copy to the current stream, which waits for
    the upload (an event) when it is not the stream that queued it."""

    __slots__ = ("dev", "host", "event", "streams")

    def __init__(self, ints: Sequence[int], device: torch.device):
        host = torch.tensor(list(ints), dtype=torch.int64)
        self.event = None
        if device.type != "cuda":
            self.dev, self.host, self.streams = host, None, None
            return
        self.host = host.pin_memory()
        self.dev = torch.empty(host.shape, dtype=torch.int64, device=device)
        self.dev.copy_(self.host, non_blocking=True)
        stream = torch.cuda.current_stream(device)
        self.event = torch.cuda.Event()
        self.event.record(stream)
        self.streams = {stream.cuda_stream}
        LAUNCHES["table_upload"] += 1

    def tensor(self) -> torch.Tensor:
        if self.streams is not None:
            stream = torch.cuda.current_stream(self.dev.device)
            if stream.cuda_stream not in self.streams:
                stream.wait_event(self.event)
                self.dev.record_stream(stream)  # its memory is not reused before this stream's work ran
                self.streams.add(stream.cuda_stream)
        return self.dev


class _LRU:
    """A small LRU dict (``TABLE_CACHE_SIZE`` entries)."""

    def __init__(self):
        self.d: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()

    def get(self, key):
        v = self.d.get(key)
        if v is not None:
            self.d.move_to_end(key)
        return v

    def put(self, key, value):
        self.d[key] = value
        while len(self.d) > TABLE_CACHE_SIZE:
            self.d.popitem(last=False)
        return value


class _Table(NamedTuple):
    """One launch's tables and the launch parameters derived from them."""

    pairs: DeviceInts
    work: DeviceInts
    n_work: int
    align: int
    k_iters: int
    partials: List[Tuple[int, int]]
    n_partials: int


_WORK = _LRU()   # work lists by shape set
_PAIRS = _LRU()  # _Table by address set (+ the shape set)
_CALLS = _LRU()  # whole call plans by call signature ("call plans")


def clear_table_cache() -> None:
    """Forget every cached table and call plan (tests; a process that wants its pinned buffers back)."""
    _WORK.d.clear()
    _PAIRS.d.clear()
    _CALLS.d.clear()


def _gram_table(sub: Sequence[torch.Tensor], rows: Sequence[Tuple[int, int]], slots: Sequence[int], b: int,
                deterministic: bool) -> _Table:
    dev = sub[0].device
    feats = tuple(f for f, _ in rows)
    sms = _num_sms(dev)
    key = ("gram", dev, sub[0].dtype, b, sms, deterministic, tuple(slots), feats,
           tuple((q.data_ptr(), s) for q, (_, s) in zip(sub, rows)))
    t = _PAIRS.get(key)
    if t is not None:
        return t
    k_iters, _ = _plan(b, feats, sms)
    chunk = GRAM_BLOCK_K * k_iters
    wkey = ("gram", dev, b, chunk, deterministic, tuple(slots), feats)
    work = _WORK.get(wkey)
    if work is None:
        ints, partials, n_partials = _gram_work(feats, slots, b, chunk, deterministic)
        LAUNCHES["table_work_build"] += 1
        work = _WORK.put(wkey, (DeviceInts(ints, dev), len(ints) // GRAM_WORK_COLS, partials, n_partials))
    offs = _elem_offsets([q.data_ptr() for q in sub], sub[0].element_size(), "pairs")
    ints: List[int] = []
    for q, (f, s), slot, off in zip(sub, rows, slots, offs):
        ints += _pair_row(q.data_ptr(), f, s, slot, off)
    LAUNCHES["table_build"] += 1
    align = _align(*feats, *[s for _, s in rows], *offs)
    wdev, n_work, partials, n_partials = work
    return _PAIRS.put(key, _Table(DeviceInts(ints, dev), wdev, n_work, align, k_iters, partials, n_partials))


def _grad_table(sub, rows, drows, slots, b) -> _Table:
    """The dQ launch's pair rows (keyed by the features' addresses and the gradients' strides) and
    work list. The gradients' own addresses are not in it: they are fresh tensors every call, so
    their element offsets travel in a small table of their own (``_DOffsets``)."""
    dev = sub[0].device
    feats = tuple(f for f, _ in rows)
    key = ("grad", dev, sub[0].dtype, tuple(slots), feats,
           tuple((q.data_ptr(), s, ds) for q, (_, s), (_, ds) in zip(sub, rows, drows)))
    t = _PAIRS.get(key)
    if t is not None:
        return t
    wkey = ("grad", dev, GRAD_BLOCK_K, feats)
    work = _WORK.get(wkey)
    if work is None:
        ints = _grad_work(feats, GRAD_BLOCK_K)
        LAUNCHES["table_work_build"] += 1
        work = _WORK.put(wkey, (DeviceInts(ints, dev), len(ints) // GRAD_WORK_COLS))
    offs = _elem_offsets([q.data_ptr() for q in sub], sub[0].element_size(), "pairs")
    ints: List[int] = []
    for q, (f, s), (_, ds), slot, off in zip(sub, rows, drows, slots, offs):
        ints += _pair_row(q.data_ptr(), f, s, slot, off, 0, ds, 0)
    LAUNCHES["table_build"] += 1
    align = _align(*feats, *[s for _, s in rows], *[ds for _, ds in drows], *offs)
    wdev, n_work = work
    return _PAIRS.put(key, _Table(DeviceInts(ints, dev), wdev, n_work, align, 0, [], 0))


class _DOffsets:
    """The element offsets of one dQ launch's gradients from the first one, on the device: kept
    while the next call's gradients sit where this call's did (the caching allocator's usual
    behaviour), uploaded anew (a few bytes a pair, from a pinned buffer of their own) when not."""

    __slots__ = ("key", "ints", "align")

    def __init__(self):
        self.key: Optional[Tuple[int, ...]] = None
        self.ints: Optional[DeviceInts] = None
        self.align = 1

    def tensor(self, dsub: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, int]:
        addrs = tuple(d.data_ptr() for d in dsub)
        if addrs != self.key:
            offs = _elem_offsets(addrs, dsub[0].element_size(), "grads")
            self.ints = DeviceInts(offs, dsub[0].device)
            self.key, self.align = addrs, _align(*offs)
            LAUNCHES["table_doffs_upload"] += 1
        return self.ints.tensor(), self.align


@triton.jit(do_not_specialize=["b", "k_iters"])
def _gram_table_kernel(g_ptr, pairs_ptr, work_ptr, ref_ptr, b, k_iters,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                       PRECISION: tl.constexpr, ALIGN: tl.constexpr, ATOMIC: tl.constexpr):
    w = work_ptr + tl.program_id(0).to(tl.int64) * _GRAM_WORK_COLS_C
    pair = tl.load(w)
    ti = tl.load(w + 1).to(tl.int32)
    tj = tl.load(w + 2).to(tl.int32)
    chunk = tl.load(w + 3)
    g_off = tl.load(w + 4)
    row = pairs_ptr + pair * _PAIR_COLS_C
    F = tl.load(row + 1)
    stride_b = tl.load(row + 2)
    off = tl.load(row + 6)
    if ALIGN > 1:  # the launcher checked it: with ref_ptr's own alignment, 16-byte vector loads
        off = off // ALIGN * ALIGN
    # pair 0's tensor is the pointer argument (its type fixes the dtype, runtime specialises its
    # alignment); every pair is an element offset from it (a cast of the loaded address,
    # addr.to(ref_ptr.dtype), would carry no alignment and fall back to element-wise copies)
    _gram_part(ref_ptr + off, F, stride_b, chunk, k_iters, g_ptr + g_off, b, ti, tj,
               BLOCK_B, BLOCK_K, PRECISION, ALIGN, ATOMIC)


@triton.jit(do_not_specialize=["b"])
def _sp_grad_features_table_kernel(m_ptr, pairs_ptr, work_ptr, doffs_ptr, ref_ptr, dref_ptr, b,
                                   BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                                   PRECISION: tl.constexpr, ALIGN: tl.constexpr, SPLIT_BF16: tl.constexpr):
    w = work_ptr + tl.program_id(0).to(tl.int64) * _GRAD_WORK_COLS_C
    pair = tl.load(w)
    col_blk = tl.load(w + 1)
    row = pairs_ptr + pair * _PAIR_COLS_C
    F = tl.load(row + 1)
    stride_b = tl.load(row + 2)
    slot = tl.load(row + 3)
    dstride_b = tl.load(row + 5)
    off = tl.load(row + 6)
    doff = tl.load(doffs_ptr + pair)  # the gradients' offsets: their own table (fresh tensors each call)
    if ALIGN > 1:
        off = off // ALIGN * ALIGN
        doff = doff // ALIGN * ALIGN
    _grad_part(ref_ptr + off, dref_ptr + doff, F, stride_b, dstride_b, col_blk,
               m_ptr + slot * b * b, b, tl.program_id(1),
               BLOCK_I, BLOCK_J, BLOCK_K, PRECISION, ALIGN, SPLIT_BF16)


# ----------------------------------------------------------------------------- AOT variants

_TRITON_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# every (input dtype, fp32 matmul policy) a launcher can be called with
_POLICIES = (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("fp16", "tf32"), ("bf16", "ieee"), ("bf16", "tf32"))


def _gram_configs() -> List[Tuple[str, str, int]]:
    """(dtype, PRECISION, num_stages) of the Gram kernels, as the launchers derive them."""
    return sorted({(dt, _dot_precision([torch.empty(0, dtype=_TORCH_DTYPES[dt])], prec), _gram_stages(dt == "fp32"))
                   for dt, prec in _POLICIES})


def _grad_configs() -> List[Tuple[str, str, int]]:
    """(dtype, PRECISION, num_stages) of the dQ kernels, as the launchers derive them."""
    return sorted({(dt, *grad_config(_TORCH_DTYPES[dt], prec)) for dt, prec in _POLICIES})


def _grad_block_is() -> List[int]:
    """Every BLOCK_I ``_grad_block_i`` gives (b = 1 ... MAX_BATCH)."""
    return sorted({_grad_block_i(1 << k) for k in range(MAX_BATCH.bit_length())})


def _tag(dt: str, prec: str) -> str:
    return f"{dt}_{prec}" if dt != "bf16" else dt


def _variant(name, fn, sig, consts, ptrs, num_warps, num_stages) -> dict:
    sig = dict(sig)
    sig.update({k: "constexpr" for k in consts})
    return dict(name=name, fn=fn, signature=sig, constexprs=consts, divisible_by_16=list(ptrs),
                num_warps=num_warps, num_stages=num_stages)


def aot_variants() -> List[dict]:
    """Every kernel configuration the launchers can pick (tests/test_aot.py compiles them for sm_90).

    The axes are derived from the launchers' own rules: the (dtype, dot precision, stages) of
    ``_gram_configs`` / ``_grad_configs`` (every fp32 matmul policy, fp16's and bf16's included),
    ALIGN 16 or 1, the atomic or deterministic Gram, the tensor count ``_nt`` (1 or 8), every
    grad row tile ``_grad_block_i`` can give, and the padded row length of the (b, b) kernels for
    every b up to ``MAX_BATCH``. All pointers are 16-byte aligned (torch's allocations; row views
    of sliced tensors can be less, which only drops that hint)."""
    out: List[dict] = []
    for dt, prec, stages in _gram_configs():
        tag = dt if dt != "fp32" else f"fp32_{prec}"
        for align in (16, 1):
            for atomic in (True, False):
                mode = "atomic" if atomic else "det"
                for nt in sorted({_nt(1), _nt(2)}):
                    sig = {a: "i32" for a in _gram_kernel.arg_names}
                    sig["g_ptr"] = "*fp32"
                    sig.update({f"p{i}": _TRITON_DTYPES[dt] for i in range(8)})
                    consts = dict(NT=nt, BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K, PRECISION=prec, ALIGN=align,
                                  ATOMIC=atomic)
                    out.append(_variant(f"sp_gram_{tag}_nt{nt}_align{align}_{mode}", _gram_kernel, sig, consts,
                                        ["g_ptr"] + [f"p{i}" for i in range(8)], GRAM_NUM_WARPS, stages))
                # the device-side table kernel: one pointer type per variant, same tiles
                sig = {a: "i32" for a in _gram_table_kernel.arg_names}
                sig.update(g_ptr="*fp32", pairs_ptr="*i64", work_ptr="*i64", ref_ptr=_TRITON_DTYPES[dt])
                consts = dict(BLOCK_B=GRAM_BLOCK_B, BLOCK_K=GRAM_BLOCK_K, PRECISION=prec, ALIGN=align, ATOMIC=atomic)
                out.append(_variant(f"sp_gram_table_{tag}_align{align}_{mode}", _gram_table_kernel, sig, consts,
                                    ["g_ptr", "pairs_ptr", "work_ptr", "ref_ptr"], GRAM_NUM_WARPS, stages))
    for dt, prec, stages in _grad_configs():
        tag = _tag(dt, prec)
        for align in (16, 1):
            for block_i in _grad_block_is():
                common = dict(BLOCK_I=block_i, BLOCK_J=GRAD_BLOCK_J, BLOCK_K=GRAD_BLOCK_K, PRECISION=prec,
                              ALIGN=align, SPLIT_BF16=dt == "bf16")
                for nt in sorted({_nt(1), _nt(2)}):
                    sig = {a: "i32" for a in _sp_grad_features_kernel.arg_names}
                    sig["m_ptr"] = "*fp32"
                    sig.update({f"{c}{i}": _TRITON_DTYPES[dt] for c in "pd" for i in range(8)})
                    out.append(_variant(f"sp_grad_features_{tag}_nt{nt}_bi{block_i}_align{align}",
                                        _sp_grad_features_kernel, sig, dict(NT=nt, **common),
                                        ["m_ptr"] + [f"{c}{i}" for c in "pd" for i in range(8)], GRAD_NUM_WARPS, stages))
                sig = {a: "i32" for a in _sp_grad_features_table_kernel.arg_names}
                sig.update(m_ptr="*fp32", pairs_ptr="*i64", work_ptr="*i64", doffs_ptr="*i64",
                           ref_ptr=_TRITON_DTYPES[dt], dref_ptr=_TRITON_DTYPES[dt])
                out.append(_variant(f"sp_grad_features_table_{tag}_bi{block_i}_align{align}",
                                    _sp_grad_features_table_kernel, sig, dict(common),
                                    ["m_ptr", "pairs_ptr", "work_ptr", "doffs_ptr", "ref_ptr", "dref_ptr"],
                                    GRAD_NUM_WARPS, stages))
    for bc in sorted({_row_block(1 << k)[1] for k in range(MAX_BATCH.bit_length())}):
        br = _row_block(bc)[0]
        for name, fn, ptrs in (("sp_row_normalize", _row_normalize_kernel, ["g_ptr", "out_ptr"]),
                               ("sp_finish", _sp_finish_kernel, ["gs_ptr", "gt_ptr", "part_ptr"]),
                               ("sp_grad_gram", _sp_grad_gram_kernel, ["grad_ptr", "gs_ptr", "gt_ptr", "dg_ptr"])):
            sig = {a: "fp32" for a in fn.arg_names}
            sig.update({p: "*fp32" for p in ptrs}, b="i32")
            out.append(_variant(f"{name}_c{bc}", fn, sig, dict(BLOCK_R=br, BLOCK_C=bc), ptrs, 4, NUM_STAGES))
    return out


__all__ = [
    "EPS", "LAUNCHES", "MAX_BATCH", "MAX_TENSORS", "TABLE_MIN_PAIRS", "TablePlan", "aot_variants", "build_grad_table",
    "build_gram_table", "grad_config", "gram", "gram_tiles", "row_normalize", "sp_finish", "sp_grad_features",
    "sp_grad_gram", "table_supported",
]
