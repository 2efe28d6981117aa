"""Triton kernels for the collapse: one persistent grouped GEMM over a table of problems.

The collapse W_t = A3 . A2_t . A1 of every layer is a handful of folded GEMMs (the kernel taps
folded into a GEMM dimension; the maths and both association orders are documented in
``lopfast.ops.collapse_gemm``): 2 dependent products forward, 2 x 2 backward. Layers of one
shape class (same groups and sizes) are stacked, so each product is a *batched* GEMM over
layers x groups; every product of every class of a model that can run at the same time goes
into ONE launch of ``grouped_gemm_kernel``:

* a problem table (``PROB_FIELDS`` int64 per problem): sizes M, N, K, the problem's first
  tile, its tile counts, and for A, B and C an element offset into the launch's flat buffer,
  a batch stride and a leading dimension (C: both strides). Offsets, not pointers: the CPU
  interpreter cannot load through loaded pointers, and one flat buffer per operand role keeps
  the table a plain int64 tensor;
* a persistent tile scheduler: ``grid = min(tiles, 2 x SMs)`` programs walk the tiles of all
  problems (``tile = pid, pid + grid, ...``), find their problem by a scan of the (few)
  problem starts, and run a K loop of ``tl.dot`` with fp32 accumulation, pipelined by
  ``num_stages``. The planner orders problems by K (longest tiles first) so the tail is short;
* which operand dimension is contiguous (A: K or M; B: N or K) and whether every offset,
  stride and size of the launch is a multiple of 16 are compile-time flags of the launch, so
  loads are vectorised (16-byte) along the contiguous dimension with masks the compiler can
  prove uniform. Unaligned problems (a 3-channel stem, odd widths) go to a separate launch
  of the unaligned variant instead of slowing every problem down.

The planner groups the products of one phase by (A, B, C buffer, layout flags, alignment):
a forward is 2 launches (3-4 when both association orders occur), a backward 4 (up to 8 with
unaligned classes), whatever the number of layers. Intermediates (S = A2.A1 or U = A3.A2, and
P = A3^T.dW or Q = dW.A1^T) live in workspaces in the factors' dtype, as torch.matmul would
round them. fp32 products are IEEE (``input_precision="ieee"``) unless the caller passes
"tf32" (the op reads PyTorch's own setting); fp16/bf16 use their tensor-core MMA with fp32
accumulation. fp64 never reaches ``tl.dot`` (sm_90 has no fp64 ``tl.dot``; the op routes fp64
to torch.matmul). No atomics, fixed-order K loops: results are deterministic.

Launchers only: tensors in, tensors out; no ``torch.nn``, no other lopfast imports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

PROB_FIELDS = 16  # M N K tile_start tiles_n tiles_mn | a_off a_sb a_ld | b_off b_sb b_ld | c_off c_sb c_sm c_sn
LAUNCH_FIELDS = 9  # a_buf b_buf c_buf a_kcontig b_ncontig aligned row_start n_probs n_tiles
ALIGN = 16  # elements: segment starts are padded to this, and "aligned" launches need it everywhere

# one tile shape per dtype: 64 x 64 output tiles, K step 32 (fp32) / 64 (16-bit), 3 stages.
# See aot_variants(): these compile for sm_90 with no spills.
CONFIGS = {
    torch.float32: dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=3),
    torch.float16: dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3),
    torch.bfloat16: dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3),
}
# unaligned launches (odd widths: a stem, tiny layers) load element by element; smaller tiles
# keep their address registers in budget (64 x 64 spilled there)
CONFIGS_UNALIGNED = {
    torch.float32: dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=2),
    torch.float16: dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=2),
    torch.bfloat16: dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=2),
}


# ----------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["n_probs", "n_tiles"])
def grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, prob_ptr, n_probs, n_tiles,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    A_KCONTIG: tl.constexpr, B_NCONTIG: tl.constexpr, ALIGNED: tl.constexpr, PREC: tl.constexpr,
):
    """C[b] = A[b] . B[b] for every problem of the table, one output tile per iteration."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for tile in range(pid, n_tiles, nprog):
        # problem of this tile: the table is sorted by tile_start and holds a few rows
        pr = 0
        for i in range(1, n_probs):
            pr += (tl.load(prob_ptr + i * 16 + 3) <= tile).to(tl.int32)
        row = prob_ptr + pr * 16
        M = tl.load(row + 0)
        N = tl.load(row + 1)
        K = tl.load(row + 2)
        local = tile - tl.load(row + 3)
        tiles_n = tl.load(row + 4)
        tiles_mn = tl.load(row + 5)
        a_off = tl.load(row + 6)
        a_sb = tl.load(row + 7)
        a_ld = tl.load(row + 8)
        b_off = tl.load(row + 9)
        b_sb = tl.load(row + 10)
        b_ld = tl.load(row + 11)
        c_off = tl.load(row + 12)
        c_sb = tl.load(row + 13)
        c_sm = tl.load(row + 14)
        c_sn = tl.load(row + 15)
        if ALIGNED:
            # true for every problem of an aligned launch (the planner checks): lets the
            # compiler issue 16-byte loads and treat the K/M/N masks as uniform per vector
            M = tl.multiple_of(M, 16)
            N = tl.multiple_of(N, 16)
            K = tl.multiple_of(K, 16)
            a_off = tl.multiple_of(a_off, 16)
            a_sb = tl.multiple_of(a_sb, 16)
            a_ld = tl.multiple_of(a_ld, 16)
            b_off = tl.multiple_of(b_off, 16)
            b_sb = tl.multiple_of(b_sb, 16)
            b_ld = tl.multiple_of(b_ld, 16)
        bi = local // tiles_mn
        r = local - bi * tiles_mn
        pm = r // tiles_n
        pn = r - pm * tiles_n
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_base = a_ptr + (a_off + bi * a_sb)
        b_base = b_ptr + (b_off + bi * b_sb)
        if A_KCONTIG:
            a_ptrs = a_base + rm[:, None] * a_ld + rk[None, :]
            a_step = BK
        else:
            a_ptrs = a_base + rm[:, None] + rk[None, :] * a_ld
            a_step = BK * a_ld
        if B_NCONTIG:
            b_ptrs = b_base + rk[:, None] * b_ld + rn[None, :]
            b_step = BK * b_ld
        else:
            b_ptrs = b_base + rk[:, None] + rn[None, :] * b_ld
            b_step = BK
        m_ok = rm[:, None] < M
        n_ok = rn[None, :] < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k_left = K - k0
            a = tl.load(a_ptrs, mask=m_ok & (rk[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & n_ok, other=0.0)
            if PREC == "none":  # 16-bit inputs: tensor-core MMA, fp32 accumulation
                acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, input_precision=PREC)
            a_ptrs += a_step
            b_ptrs += b_step
        c_ptrs = c_ptr + (c_off + bi * c_sb) + rm[:, None] * c_sm + rn[None, :] * c_sn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ClassSpec:
    """One shape class: ``L`` layers of ``G`` groups, per group W_eff (n x m) per tap, inner
    widths p, q, ``T`` taps, association order ``left`` (see lopfast.ops.collapse_gemm)."""

    L: int
    G: int
    n: int
    m: int
    p: int
    q: int
    T: int
    left: bool

    @property
    def B(self) -> int:
        return self.L * self.G

    @property
    def inter(self) -> int:
        """Elements of the intermediate (S: q*T*m or U: n*T*p) per batch entry."""
        return self.n * self.T * self.p if self.left else self.q * self.T * self.m


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Mat:
    """Matrix ``b`` of a batch in buffer ``buf``: (r, c) at off + b*sb + r*ld + c (trans: c*ld + r)."""

    buf: int
    off: int
    sb: int
    rows: int
    cols: int
    ld: int
    trans: bool = False

    @property
    def t(self) -> "_Mat":
        return _Mat(self.buf, self.off, self.sb, self.cols, self.rows, self.ld, not self.trans)


@dataclass(frozen=True)
class ClassLayout:
    """Offsets of one class's segments: in the packed factors (W1s, W2c, W3s, each
    (L*G, ...) contiguous), the canonical output Wc (L*G, n, T, m) and the workspaces."""

    w1: int
    w2: int
    w3: int
    out: int
    ws: int
    gws: int


@dataclass
class CollapsePlan:
    """Host-side plan: buffer sizes, per-class offsets and the launch tables.

    ``tables`` holds every problem row (int64, ``PROB_FIELDS`` each); ``fwd``/``bwd`` list the
    launches of each pass in order, ``LAUNCH_FIELDS`` ints each. Forward buffers: 0 packed
    factors, 1 workspace, 2 output; backward: 0 factors, 1 forward workspace, 2 output
    gradient, 3 backward workspace, 4 factor gradient.
    """

    specs: Tuple[ClassSpec, ...]
    layouts: List[ClassLayout]
    x_numel: int
    out_numel: int
    ws_numel: int
    gws_numel: int
    tables: torch.Tensor
    fwd: List[int]
    bwd: List[int]

    def to(self, device) -> "CollapsePlan":
        """The same plan with its problem tables on ``device``."""
        import dataclasses

        return dataclasses.replace(self, tables=self.tables.to(device))

    @property
    def sizes(self) -> List[int]:
        """Elements of the packed factors, the packed output, the forward and backward workspaces."""
        return [self.x_numel, self.out_numel, self.ws_numel, self.gws_numel]


@dataclass
class _Phase:
    # launch key -> problems (A, B, C, M, N, K, batch)
    launches: Dict[tuple, list] = field(default_factory=dict)

    def add(self, A: _Mat, Bm: _Mat, C: _Mat, batch: int) -> None:
        M, K, N = A.rows, A.cols, Bm.cols
        assert Bm.rows == K and C.rows == M and C.cols == N
        vals = (A.off, A.sb, A.ld, Bm.off, Bm.sb, Bm.ld, M, N, K)
        aligned = all(v % ALIGN == 0 for v in vals)
        key = (A.buf, Bm.buf, C.buf, not A.trans, not Bm.trans, aligned)
        self.launches.setdefault(key, []).append((A, Bm, C, M, N, K, batch))


def _tile(aligned: bool) -> Tuple[int, int]:
    """Output tile (BM, BN) of aligned / unaligned launches: the same for every dtype, so one
    plan serves all dtypes."""
    cfgs = (CONFIGS if aligned else CONFIGS_UNALIGNED).values()
    sizes = {(c["BM"], c["BN"]) for c in cfgs}
    assert len(sizes) == 1, "the planner assumes one output tile per alignment class"
    return sizes.pop()


def _emit(phases: Sequence[_Phase], rows: List[List[int]], out: List[int]) -> None:
    for ph in phases:
        for key, probs in ph.launches.items():
            bm, bn = _tile(key[5])
            # longest K first: with strided tile assignment the heaviest tiles start first
            probs = sorted(probs, key=lambda pr: -pr[5])
            start, row0 = 0, len(rows)
            for A, Bm, C, M, N, K, batch in probs:
                tn, tm = -(-N // bn), -(-M // bm)
                c_sm, c_sn = (1, C.ld) if C.trans else (C.ld, 1)
                rows.append([M, N, K, start, tn, tm * tn, A.off, A.sb, A.ld, Bm.off, Bm.sb, Bm.ld,
                             C.off, C.sb, c_sm, c_sn])
                start += batch * tm * tn
            out += [key[0], key[1], key[2], int(key[3]), int(key[4]), int(key[5]), row0, len(probs), start]


def plan_collapse(specs: Sequence[ClassSpec]) -> CollapsePlan:
    """Plan the forward and backward launches over shape classes ``specs``."""
    X, WS, OUT = 0, 1, 2  # forward buffers
    BX, BWS, GRAD, GWS, DX = 0, 1, 2, 3, 4  # backward buffers
    layouts = []
    xo = oo = wo = 0
    for s in specs:
        B, n, m, p, q, T = s.B, s.n, s.m, s.p, s.q, s.T
        w1 = xo
        w2 = _up(w1 + B * p * m)
        w3 = _up(w2 + B * q * T * p)
        xo = _up(w3 + B * n * q)
        layouts.append(ClassLayout(w1, w2, w3, oo, wo, wo))
        oo = _up(oo + B * n * T * m)
        wo = _up(wo + B * s.inter)
    f1, f2, b1, b2 = _Phase(), _Phase(), _Phase(), _Phase()
    for s, lay in zip(specs, layouts):
        B, n, m, p, q, T = s.B, s.n, s.m, s.p, s.q, s.T
        A1 = lambda buf: _Mat(buf, lay.w1, p * m, p, m, m)  # noqa: E731
        A2c = lambda buf, rows, cols: _Mat(buf, lay.w2, q * T * p, rows, cols, cols)  # noqa: E731 - (qT x p) or (q x Tp)
        A3 = lambda buf: _Mat(buf, lay.w3, n * q, n, q, q)  # noqa: E731
        Wc = lambda buf, rows, cols: _Mat(buf, lay.out, n * T * m, rows, cols, cols)  # noqa: E731 - (n x Tm) or (nT x m)
        I = lambda buf, rows, cols: _Mat(buf, lay.ws, s.inter, rows, cols, cols)  # noqa: E731,E741 - S or U, P or Q
        if not s.left:
            # forward: S = A2c.A1 (qT x m), Wc = A3.S (n x Tm)
            f1.add(A2c(X, q * T, p), A1(X), I(WS, q * T, m), B)
            f2.add(A3(X), I(WS, q, T * m), Wc(OUT, n, T * m), B)
            # backward: P = A3^T.dW, dA3 = dW.S^T; then dA2c = P.A1^T, dA1 = A2c^T.P
            b1.add(A3(BX).t, Wc(GRAD, n, T * m), I(GWS, q, T * m), B)
            b1.add(Wc(GRAD, n, T * m), I(BWS, q, T * m).t, A3(DX), B)
            b2.add(I(GWS, q * T, m), A1(BX).t, A2c(DX, q * T, p), B)
            b2.add(A2c(BX, q * T, p).t, I(GWS, q * T, m), A1(DX), B)
        else:
            # forward: U = A3.A2c (n x Tp), Wc = U.A1 (nT x m)
            f1.add(A3(X), A2c(X, q, T * p), I(WS, n, T * p), B)
            f2.add(I(WS, n * T, p), A1(X), Wc(OUT, n * T, m), B)
            # backward: dA1 = U^T.dW, Q = dW.A1^T; then dA3 = Q.A2c^T, dA2c = A3^T.Q
            b1.add(I(BWS, n * T, p).t, Wc(GRAD, n * T, m), A1(DX), B)
            b1.add(Wc(GRAD, n * T, m), A1(BX).t, I(GWS, n * T, p), B)
            b2.add(I(GWS, n, T * p), A2c(BX, q, T * p).t, A3(DX), B)
            b2.add(A3(BX).t, I(GWS, n, T * p), A2c(DX, q, T * p), B)
    rows: List[List[int]] = []
    fwd: List[int] = []
    bwd: List[int] = []
    _emit([f1, f2], rows, fwd)
    _emit([b1, b2], rows, bwd)
    tables = torch.tensor(rows or [[0] * PROB_FIELDS], dtype=torch.int64)
    return CollapsePlan(tuple(specs), layouts, xo, oo, wo, wo, tables, fwd, bwd)


# ----------------------------------------------------------------------------- launchers
_SM_COUNT: Dict[int, int] = {}


def _programs(n_tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        # the interpreter runs programs one after another: a few programs still exercise
        # the persistent loop (several tiles, several problems per program)
        return max(1, min(n_tiles, 4))
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(n_tiles, 2 * _SM_COUNT[idx]))


def config(dtype: torch.dtype, aligned: bool = True) -> dict:
    """Tile configuration shipped for ``dtype`` (fp32, fp16, bf16; fp64 has none)."""
    if dtype not in CONFIGS:
        raise TypeError(f"the Triton collapse runs fp32/fp16/bf16, got {dtype} (fp64 goes to torch.matmul)")
    return (CONFIGS if aligned else CONFIGS_UNALIGNED)[dtype]


def run_launches(bufs: Sequence[torch.Tensor], tables: torch.Tensor, launches: Sequence[int], prec: str,
                 wrap: Callable = lambda k: k) -> None:
    """Run ``launches`` (``LAUNCH_FIELDS`` ints each, from a CollapsePlan) on ``bufs`` in order.

    ``prec``: "ieee" or "tf32" for fp32 buffers (ignored for 16-bit). ``wrap`` is
    ``torch.library.wrap_triton`` inside a ``triton_op``. No host syncs (doubles as fake kernel).
    """
    dtype = bufs[0].dtype
    config(dtype)  # clear error for an unsupported dtype
    kern = wrap(grouped_gemm_kernel)
    p = prec if dtype == torch.float32 else "none"
    if p not in ("ieee", "tf32", "none"):
        raise ValueError(f"prec must be 'ieee' or 'tf32', got {prec!r}")
    for i in range(0, len(launches), LAUNCH_FIELDS):
        a, b, c, a_kc, b_nc, aligned, row0, n_probs, n_tiles = launches[i:i + LAUNCH_FIELDS]
        if n_tiles == 0:
            continue
        cfg = config(dtype, bool(aligned))
        grid = (_programs(n_tiles, bufs[0].device),)
        kern[grid](bufs[a], bufs[b], bufs[c], tables[row0 * PROB_FIELDS:], n_probs, n_tiles,
                   BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], A_KCONTIG=bool(a_kc), B_NCONTIG=bool(b_nc),
                   ALIGNED=bool(aligned), PREC=p, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def collapse_forward(x: torch.Tensor, tables: torch.Tensor, launches: Sequence[int], sizes: Sequence[int],
                     prec: str = "ieee", wrap: Callable = lambda k: k) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed canonical effective kernels and the forward workspace (kept for the backward).

    ``tables``/``launches``/``sizes``: ``plan.tables.view(-1)``, ``plan.fwd``, ``plan.sizes``.
    Zero-filled so the alignment padding between classes is defined (outputs are compared
    bitwise by opcheck and the determinism tests)."""
    out = torch.zeros(sizes[1], device=x.device, dtype=x.dtype)
    ws = torch.zeros(max(sizes[2], 1), device=x.device, dtype=x.dtype)
    run_launches([x, ws, out], tables, launches, prec, wrap)
    return out, ws


def collapse_backward(x: torch.Tensor, ws: torch.Tensor, grad: torch.Tensor, tables: torch.Tensor,
                      launches: Sequence[int], sizes: Sequence[int], prec: str = "ieee",
                      wrap: Callable = lambda k: k) -> torch.Tensor:
    """Gradient of the packed factors from the gradient of the packed canonical kernels."""
    gws = torch.empty(max(sizes[3], 1), device=x.device, dtype=x.dtype)  # fully written before read
    dx = torch.zeros(sizes[0], device=x.device, dtype=x.dtype)  # alignment padding stays zero
    # the incoming gradient may be expanded (stride 0, e.g. from .sum()) or in another dtype
    grad = grad.to(x.dtype).contiguous()
    run_launches([x, ws, grad, gws, dx], tables, launches, prec, wrap)
    return dx


# ----------------------------------------------------------------------------- AOT variants
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (A_KCONTIG, B_NCONTIG) pairs the planner emits: forward (1, 1), backward (0, 1) and (1, 0)
_LAYOUTS = ((True, True), (False, True), (True, False))


def aot_variants() -> List[dict]:
    """Every kernel variant runtime can launch (OWNERS.md AOT interface), for an sm_90 compile."""
    out = []
    for dtype, tname in _TL.items():
        precs = ("ieee", "tf32") if dtype == torch.float32 else ("none",)
        for prec in precs:
            for a_kc, b_nc in _LAYOUTS:
                for aligned in (True, False):
                    cfg = (CONFIGS if aligned else CONFIGS_UNALIGNED)[dtype]
                    name = (f"collapse_gemm_{tname}{'_' + prec if prec != 'none' else ''}"
                            f"_a{'k' if a_kc else 'm'}_b{'n' if b_nc else 'k'}{'_al16' if aligned else ''}")
                    consts = dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], A_KCONTIG=a_kc, B_NCONTIG=b_nc,
                                  ALIGNED=aligned, PREC=prec)
                    sig = {"a_ptr": "*" + tname, "b_ptr": "*" + tname, "c_ptr": "*" + tname, "prob_ptr": "*i64",
                           "n_probs": "i32", "n_tiles": "i32"}
                    sig.update({k: "constexpr" for k in consts})
                    out.append(dict(name=name, fn=grouped_gemm_kernel, signature=sig, constexprs=consts,
                                    divisible_by_16=["a_ptr", "b_ptr", "c_ptr", "prob_ptr"],
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


__all__ = [
    "ALIGN", "CONFIGS", "ClassSpec", "CollapsePlan", "aot_variants", "collapse_backward", "collapse_forward",
    "config", "grouped_gemm_kernel", "plan_collapse", "run_launches",
]
