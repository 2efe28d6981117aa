"""Triton kernels for collapsing expanded conv chains, one layer or a whole model per launch.

The maths (per group ``g`` and kernel tap ``t`` of a 1x1 -> kxk -> 1x1 chain, ``T = kh*kw``)::

    forward   W_t  = A3 . A2_t . A1                      (n_g x m_g, one per tap)
    backward  dA2_t = A3^T . dW_t . A1^T                 (q_g x p_g, one per tap)
              dA1   = sum_t A2_t^T . A3^T . dW_t         (p_g x m_g)
              dA3   = sum_t dW_t . A1^T . A2_t^T         (n_g x q_g)

with A1 = W1[g] (p_g x m_g), A2_t = W2[g, :, :, t] (q_g x p_g), A3 = W3[g] (n_g x q_g).
Every one of these is a triple product ``O = X . Y . Z`` (taps either one output each or
summed), so ONE generic kernel computes all of them, for any mix of layers, described by
two int64 tables:

``desc`` (one row of ``NDESC`` int64 per product): sizes I, J, K, L and, for each operand
X (I x K), Y (K x L), Z (L x J) and the output O (I x J), a source buffer code, an element
offset, a group stride, a row stride, a column stride and a tap stride. Transposes are free
(swap the two strides), so the host also decides the association order.

``tiles`` (one row of ``TILE_FIELDS`` int64 per program): descriptor index, group, tap range
[t_lo, t_hi) and the output tile origin (i0, j0). A product whose output is per tap gets one
tile row per tap; a tap-summed product loops over all taps inside one program.

Why tables of offsets instead of a list of tensors: Triton cannot take a variable number of
tensor arguments, and a table of raw pointers would need loads through loaded pointers, which
the CPU interpreter does not support. All layers' factors therefore travel as one flat buffer
(``A``), the incoming gradients as another (``B``), and the kernel addresses them by offset.

Back-to-back fusion recomputes the inner product ``Y . Z`` once per row tile of the output.
For small layers (the usual case after pruning) that is free and the whole collapse is a
single launch; when the redundancy would cost more than ~1.5x the flops, the planner splits
the product in two (``M = Y . Z`` into an fp32 workspace ``Wk``, then ``X . M``) and the
second halves of all split products run in a second launch. So: forward 1 launch (2 when some
layer is big), backward 1 launch (2 when some layer is big), whatever the number of layers.

Accumulation is fp32 (fp64 for fp64 factors). ``tl.dot`` runs with ``input_precision="ieee"``
(fp32 FMA, no tensor cores) unless ``torch.backends.cuda.matmul.allow_tf32`` is set, the same
rule PyTorch's own matmuls follow, so the kernel never rounds more than the reference would.
fp16/bf16 factors are upcast to fp32 before the products. Outputs are in the factors' dtype.
Launchers only: tensors in, tensors out; no ``torch.nn``, no other lopfast imports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- table layout
NDESC = 32  # int64 fields per descriptor row (29 used, padded)
TILE_FIELDS = 6  # desc, g, t_lo, t_hi, i0, j0
SRC_A, SRC_B, SRC_WS = 0, 1, 2  # operand sources: flat factors, flat gradient, workspace
DST_OUT, DST_WS = 0, 1

# descriptor field indices (documented once, used by the planner; the kernel hard-codes them)
_F = dict(
    has_y=0, I=1, J=2, K=3, L=4,
    x_src=5, x_off=6, x_sg=7, x_si=8, x_sk=9, x_st=10,
    y_src=11, y_off=12, y_sg=13, y_sk=14, y_sl=15, y_st=16,
    z_src=17, z_off=18, z_sg=19, z_sl=20, z_sj=21, z_st=22,
    o_dst=23, o_off=24, o_sg=25, o_si=26, o_sj=27, o_st=28,
)

DEFAULT_BLOCK = 32


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _load_tile(a_ptr, b_ptr, w_ptr, src, off, r_idx, c_idx, s_r, s_c, mask, ACC: tl.constexpr):
    """Load a (rows x cols) tile from the buffer named by ``src``, converted to ACC."""
    offs = off + r_idx[:, None] * s_r + c_idx[None, :] * s_c
    if src == 0:
        v = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC)
    elif src == 1:
        v = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        v = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _mm(a, b, F64: tl.constexpr, TF32: tl.constexpr):
    # fp32 operands: IEEE fp32 unless the caller allows tf32 (the launcher follows
    # torch.backends.cuda.matmul.allow_tf32, as PyTorch's own matmuls do); Triton's GPU default
    # would be tf32 regardless, rounding the factors to 10 mantissa bits.
    if F64:
        return tl.dot(a, b)
    elif TF32:
        return tl.dot(a, b, input_precision="tf32")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _chain3_kernel(
    a_ptr, b_ptr, w_ptr, o_ptr, desc_ptr, tile_ptr,
    BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
    ACC: tl.constexpr, F64: tl.constexpr, TF32: tl.constexpr,
):
    """One output tile of O = X.Y.Z (has_y=1) or O = X.Z (has_y=0), per tap or tap-summed."""
    pid = tl.program_id(0)
    tp = tile_ptr + pid * 6
    d = tl.load(tp + 0)
    g = tl.load(tp + 1)
    t_lo = tl.load(tp + 2)
    t_hi = tl.load(tp + 3)
    i0 = tl.load(tp + 4)
    j0 = tl.load(tp + 5)
    dp = desc_ptr + d * 32
    has_y = tl.load(dp + 0)
    I = tl.load(dp + 1)
    J = tl.load(dp + 2)
    K = tl.load(dp + 3)
    L = tl.load(dp + 4)
    x_src = tl.load(dp + 5)
    x_off = tl.load(dp + 6) + g * tl.load(dp + 7)
    x_si = tl.load(dp + 8)
    x_sk = tl.load(dp + 9)
    x_st = tl.load(dp + 10)
    y_src = tl.load(dp + 11)
    y_off = tl.load(dp + 12) + g * tl.load(dp + 13)
    y_sk = tl.load(dp + 14)
    y_sl = tl.load(dp + 15)
    y_st = tl.load(dp + 16)
    z_src = tl.load(dp + 17)
    z_off = tl.load(dp + 18) + g * tl.load(dp + 19)
    z_sl = tl.load(dp + 20)
    z_sj = tl.load(dp + 21)
    z_st = tl.load(dp + 22)
    o_dst = tl.load(dp + 23)
    o_off = tl.load(dp + 24) + g * tl.load(dp + 25)
    o_si = tl.load(dp + 26)
    o_sj = tl.load(dp + 27)
    o_st = tl.load(dp + 28)

    ri = i0 + tl.arange(0, BI)
    rj = j0 + tl.arange(0, BJ)
    mi = ri < I
    mj = rj < J
    acc = tl.zeros((BI, BJ), dtype=ACC)
    for t in range(t_lo, t_hi):
        xo = x_off + t * x_st
        yo = y_off + t * y_st
        zo = z_off + t * z_st
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < K
            if has_y != 0:
                # back-to-back: inner = Y[k-block, :] . Z[:, j-tile] stays in registers
                inner = tl.zeros((BK, BJ), dtype=ACC)
                for l0 in range(0, L, BL):
                    rl = l0 + tl.arange(0, BL)
                    ml = rl < L
                    yv = _load_tile(a_ptr, b_ptr, w_ptr, y_src, yo, rk, rl, y_sk, y_sl,
                                    mk[:, None] & ml[None, :], ACC)
                    zv = _load_tile(a_ptr, b_ptr, w_ptr, z_src, zo, rl, rj, z_sl, z_sj,
                                    ml[:, None] & mj[None, :], ACC)
                    inner += _mm(yv, zv, F64, TF32)
            else:
                inner = _load_tile(a_ptr, b_ptr, w_ptr, z_src, zo, rk, rj, z_sl, z_sj,
                                   mk[:, None] & mj[None, :], ACC)
            xv = _load_tile(a_ptr, b_ptr, w_ptr, x_src, xo, ri, rk, x_si, x_sk,
                            mi[:, None] & mk[None, :], ACC)
            acc += _mm(xv, inner, F64, TF32)
    oo = o_off + t_lo * o_st + ri[:, None] * o_si + rj[None, :] * o_sj
    om = mi[:, None] & mj[None, :]
    if o_dst == 0:
        tl.store(o_ptr + oo, acc.to(o_ptr.dtype.element_ty), mask=om)
    else:
        tl.store(w_ptr + oo, acc.to(w_ptr.dtype.element_ty), mask=om)


# ----------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class LayerShape:
    """Shape of one chain: G groups, n_g x m_g compact kernel, p_g / q_g inner widths, kh x kw taps."""

    G: int
    n_g: int
    m_g: int
    p_g: int
    q_g: int
    kh: int
    kw: int

    @property
    def T(self) -> int:
        return self.kh * self.kw

    @property
    def numels(self) -> Tuple[int, int, int]:
        """Element counts of W1, W2, W3."""
        G, T = self.G, self.T
        return G * self.p_g * self.m_g, G * self.q_g * self.p_g * T, G * self.n_g * self.q_g

    @property
    def out_numel(self) -> int:
        return self.G * self.n_g * self.m_g * self.T


def layer_shape(w1_shape, w2_shape, w3_shape, groups: int) -> LayerShape:
    """LayerShape from the factor shapes (W1 (p, m_g,1,1), W2 (q, p_g, kh, kw), W3 (n, q_g,1,1))."""
    G = int(groups)
    p, m_g = int(w1_shape[0]), int(w1_shape[1])
    q, p_g, kh, kw = (int(s) for s in w2_shape)
    n, q_g = int(w3_shape[0]), int(w3_shape[1])
    if G < 1 or p != G * p_g or q != G * q_g or n % G:
        raise ValueError(
            f"inconsistent chain shapes for groups={G}: w1 {tuple(w1_shape)}, w2 {tuple(w2_shape)}, "
            f"w3 {tuple(w3_shape)}"
        )
    return LayerShape(G, n // G, m_g, p_g, q_g, kh, kw)


@dataclass(frozen=True)
class _Mat:
    """A strided matrix view per group: element (r, c) of tap t in group g at
    off + g*sg + r*sr + c*sc + t*st of buffer ``src``."""

    src: int
    off: int
    sg: int
    sr: int
    sc: int
    st: int

    @property
    def T(self) -> "_Mat":
        return _Mat(self.src, self.off, self.sg, self.sc, self.sr, self.st)


@dataclass
class _Program:
    """Descriptor rows plus the tile rows of each launch phase."""

    desc: List[List[int]] = field(default_factory=list)
    # per phase: (estimated work of one program, int64 tile rows of one descriptor)
    phases: Tuple[List[Tuple[int, torch.Tensor]], List[Tuple[int, torch.Tensor]]] = field(
        default_factory=lambda: ([], [])
    )
    ws_numel: int = 0
    # split intermediates already scheduled, by (operands, sizes, groups, taps)
    shared: dict = field(default_factory=dict)

    def add(self, phase: int, has_y: int, I, J, K, L, X: _Mat, Y: Optional[_Mat], Z: _Mat,
            O: _Mat, G: int, T: int, per_tap: bool, block: int) -> None:
        Y = Y or _Mat(0, 0, 0, 0, 0, 0)
        row = [0] * NDESC
        vals = dict(
            has_y=has_y, I=I, J=J, K=K, L=L,
            x_src=X.src, x_off=X.off, x_sg=X.sg, x_si=X.sr, x_sk=X.sc, x_st=X.st,
            y_src=Y.src, y_off=Y.off, y_sg=Y.sg, y_sk=Y.sr, y_sl=Y.sc, y_st=Y.st,
            z_src=Z.src, z_off=Z.off, z_sg=Z.sg, z_sl=Z.sr, z_sj=Z.sc, z_st=Z.st,
            o_dst=O.src, o_off=O.off, o_sg=O.sg, o_si=O.sr, o_sj=O.sc, o_st=O.st,
        )
        for k, v in vals.items():
            row[_F[k]] = int(v)
        d = len(self.desc)
        self.desc.append(row)
        # estimated work of one program, used to schedule the biggest tiles first
        kp, lp = _ceil(K, block), _ceil(L, block)
        t_cnt = 1 if per_tap else T
        work = t_cnt * kp * block * block * ((lp + 1) * block if has_y else block)
        # tile rows (d, g, t_lo, t_hi, i0, j0) for every group x tap range x i-tile x j-tile,
        # built as one tensor product (a Python loop takes seconds for ResNet-50-sized plans)
        ar = lambda *a: torch.arange(*a, dtype=torch.int64)  # noqa: E731
        t_lo = ar(T) if per_tap else ar(1)
        g, t, i0, j0 = torch.meshgrid(ar(G), t_lo, ar(0, I, block), ar(0, J, block), indexing="ij")
        t_hi = t + 1 if per_tap else torch.full_like(t, T)
        tiles = torch.stack([torch.full_like(g, d), g, t, t_hi, i0, j0], dim=-1).reshape(-1, TILE_FIELDS)
        self.phases[phase].append((work, tiles))


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _emit_product(prog: _Program, X: _Mat, Y: _Mat, Z: _Mat, O: _Mat, I: int, K: int, L: int,
                  J: int, G: int, T: int, per_tap: bool, block: int, split: str) -> None:
    """Schedule O = X.Y.Z (X: I x K, Y: K x L, Z: L x J) for all groups and taps.

    Candidates: fused right (X.(Y.Z) per tile), fused left (the same on the transpose),
    split right (M = Y.Z, then X.M), split left (M = X.Y, then M.Z). A split intermediate
    already computed for another product of the same program is reused for free (the
    backward's dW.A1^T serves dA2 and dA3, A3^T.dW serves dA1 and dA2). Fused is kept unless
    its recomputation costs more than 1.5x the split flops (the split pays a workspace round
    trip and possibly a second launch).
    """
    b = block
    c = lambda n: _ceil(n, b) * b  # noqa: E731 - padded size

    def fused(I_, K_, L_, J_):
        return _ceil(I_, b) * _ceil(J_, b) * (c(K_) * c(L_) * b + b * c(K_) * b)

    taps_r = T if (Y.st or Z.st) else 1
    taps_l = T if (X.st or Y.st) else 1
    key_r = (Y, Z, K, L, J, G, taps_r)
    key_l = (X, Y, I, K, L, G, taps_l)
    fused_r, fused_l = fused(I, K, L, J), fused(J, L, K, I)
    split_r = (0 if key_r in prog.shared else c(K) * c(L) * c(J)) + c(I) * c(K) * c(J)
    split_l = (0 if key_l in prog.shared else c(I) * c(K) * c(L)) + c(I) * c(L) * c(J)
    use_split = split == "always" or (split == "auto" and min(fused_r, fused_l) > 1.5 * min(split_r, split_l))
    if not use_split:
        if fused_l < fused_r:  # O^T = Z^T . Y^T . X^T, right-associated
            X, Y, Z, O, I, K, L, J = Z.T, Y.T, X.T, O.T, J, L, K, I
        prog.add(0, 1, I, J, K, L, X, Y, Z, O, G, T, per_tap, b)
        return
    if split_r <= split_l:
        # M_t = Y_t . Z_t (K x J per group and tap) in the workspace, tap-major inside a group
        M = prog.shared.get(key_r)
        if M is None:
            M = _Mat(SRC_WS, prog.ws_numel, taps_r * K * J, J, 1, K * J if taps_r > 1 else 0)
            prog.ws_numel += G * taps_r * K * J
            prog.add(0, 0, K, J, L, 0, Y, None, Z, M, G, taps_r, True, b)
            prog.shared[key_r] = M
        prog.add(1, 0, I, J, K, 0, X, None, M, O, G, T, per_tap, b)
    else:
        # M_t = X_t . Y_t (I x L), then O = M . Z
        M = prog.shared.get(key_l)
        if M is None:
            M = _Mat(SRC_WS, prog.ws_numel, taps_l * I * L, L, 1, I * L if taps_l > 1 else 0)
            prog.ws_numel += G * taps_l * I * L
            prog.add(0, 0, I, L, K, 0, X, None, Y, M, G, taps_l, True, b)
            prog.shared[key_l] = M
        prog.add(1, 0, I, J, L, 0, M, None, Z, O, G, T, per_tap, b)


@dataclass
class CollapsePlan:
    """Host-side plan of a grouped collapse: flat layouts and the kernel tables.

    ``param_offsets[i]`` = (offset of W1, W2, W3 of layer i) in the flat factor buffer (the
    concatenation, in that order, of every layer's flattened W1, W2, W3); ``out_offsets[i]``
    = offset of layer i's effective kernel in the flat output. Tables are CPU int64 tensors;
    ``to(device)`` gives the copy a launch needs.
    """

    shapes: Tuple[LayerShape, ...]
    block: int
    param_offsets: List[Tuple[int, int, int]]
    out_offsets: List[int]
    param_numel: int
    out_numel: int
    fwd_desc: torch.Tensor
    fwd_tiles: torch.Tensor
    fwd_split: int  # tiles[:fwd_split] are launch 1, the rest launch 2
    fwd_ws: int
    bwd_desc: torch.Tensor
    bwd_tiles: torch.Tensor
    bwd_split: int
    bwd_ws: int

    def to(self, device) -> "CollapsePlan":
        import dataclasses

        return dataclasses.replace(
            self,
            fwd_desc=self.fwd_desc.to(device), fwd_tiles=self.fwd_tiles.to(device),
            bwd_desc=self.bwd_desc.to(device), bwd_tiles=self.bwd_tiles.to(device),
        )


def _finish(prog: _Program) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    parts = []
    for ph in prog.phases:
        # longest programs first: with many tiny layers next to a big one, the big tiles
        # must not be the tail that keeps the launch alive (stable sort: order within ties kept)
        parts += [tiles for _, tiles in sorted(ph, key=lambda wt: -wt[0])]
    desc = torch.tensor(prog.desc or [[0] * NDESC], dtype=torch.int64)
    tiles = torch.cat(parts) if parts else torch.zeros(0, TILE_FIELDS, dtype=torch.int64)
    n_first = sum(t.shape[0] for _, t in prog.phases[0])
    return desc, tiles, n_first, prog.ws_numel


def plan_collapse(shapes: Sequence[LayerShape], block: int = DEFAULT_BLOCK, split: str = "auto") -> CollapsePlan:
    """Plan the forward and backward launches of a grouped collapse over ``shapes``.

    ``split``: "auto" (fuse unless recomputation is expensive), "never" (always one launch)
    or "always" (two-stage everywhere; used by the tests to exercise both paths).
    """
    if split not in ("auto", "never", "always"):
        raise ValueError(f"split must be 'auto', 'never' or 'always', got {split!r}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (tl.dot minimum), got {block}")
    fwd, bwd = _Program(), _Program()
    param_offsets, out_offsets = [], []
    po = oo = 0
    for s in shapes:
        n1, n2, n3 = s.numels
        o1, o2, o3 = po, po + n1, po + n1 + n2
        param_offsets.append((o1, o2, o3))
        out_offsets.append(oo)
        G, T, m, n, p, q = s.G, s.T, s.m_g, s.n_g, s.p_g, s.q_g
        A1 = _Mat(SRC_A, o1, p * m, m, 1, 0)
        A2 = _Mat(SRC_A, o2, q * p * T, p * T, T, 1)
        A3 = _Mat(SRC_A, o3, n * q, q, 1, 0)
        Wo = _Mat(DST_OUT, oo, n * m * T, m * T, T, 1)  # effective kernel / its gradient layout
        dW = _Mat(SRC_B, oo, n * m * T, m * T, T, 1)
        dA1 = _Mat(DST_OUT, o1, p * m, m, 1, 0)
        dA2 = _Mat(DST_OUT, o2, q * p * T, p * T, T, 1)
        dA3 = _Mat(DST_OUT, o3, n * q, q, 1, 0)
        _emit_product(fwd, A3, A2, A1, Wo, n, q, p, m, G, T, True, block, split)
        _emit_product(bwd, A3.T, dW, A1.T, dA2, q, n, m, p, G, T, True, block, split)
        _emit_product(bwd, A2.T, A3.T, dW, dA1, p, q, n, m, G, T, False, block, split)
        _emit_product(bwd, dW, A1.T, A2.T, dA3, n, m, p, q, G, T, False, block, split)
        po, oo = o3 + n3, oo + s.out_numel
    fd, ft, fs, fw = _finish(fwd)
    bd, bt, bs, bw = _finish(bwd)
    return CollapsePlan(tuple(shapes), block, param_offsets, out_offsets, po, oo,
                        fd, ft, fs, fw, bd, bt, bs, bw)


# ----------------------------------------------------------------------------- launchers
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch_chain3(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, desc: torch.Tensor,
                  tiles: torch.Tensor, split: int, ws_numel: int, block: int,
                  wrap: Callable = lambda k: k) -> torch.Tensor:
    """Run the table-driven triple-product kernel over ``tiles`` into ``out`` (returned).

    ``a``/``b``: flat source buffers (same dtype); ``split``: number of first-phase tiles.
    ``wrap`` is ``torch.library.wrap_triton`` when called from a ``triton_op`` (so
    torch.compile can trace the launch), the identity otherwise. No host syncs here: the
    launcher doubles as the fake kernel.
    """
    acc = _acc_dtype(a.dtype)
    ws = torch.empty(max(ws_numel, 1), device=a.device, dtype=acc)
    kern = wrap(_chain3_kernel)
    meta = dict(BI=block, BJ=block, BK=block, BL=block,
                ACC=tl.float64 if acc == torch.float64 else tl.float32,
                F64=acc == torch.float64,
                TF32=a.device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32))
    n_tiles = tiles.shape[0]
    for lo, hi in ((0, split), (split, n_tiles)):
        if hi > lo:
            kern[(hi - lo,)](a, b, ws, out, desc, tiles[lo:hi], **meta)
    return out


def collapse_forward(flat_params: torch.Tensor, plan: CollapsePlan, wrap: Callable = lambda k: k) -> torch.Tensor:
    """Flat effective kernels of every planned layer (layout ``plan.out_offsets``)."""
    out = torch.empty(plan.out_numel, device=flat_params.device, dtype=flat_params.dtype)
    return launch_chain3(flat_params, flat_params, out, plan.fwd_desc, plan.fwd_tiles,
                         plan.fwd_split, plan.fwd_ws, plan.block, wrap)


def collapse_backward(flat_params: torch.Tensor, flat_grad: torch.Tensor, plan: CollapsePlan,
                      wrap: Callable = lambda k: k) -> torch.Tensor:
    """Flat gradient of every factor (layout ``plan.param_offsets``) from the flat dW_eff."""
    out = torch.empty(plan.param_numel, device=flat_params.device, dtype=flat_params.dtype)
    return launch_chain3(flat_params, flat_grad.to(flat_params.dtype).contiguous(), out,
                         plan.bwd_desc, plan.bwd_tiles, plan.bwd_split, plan.bwd_ws, plan.block, wrap)


__all__ = [
    "CollapsePlan", "LayerShape", "collapse_backward", "collapse_forward", "launch_chain3",
    "layer_shape", "plan_collapse",
]
