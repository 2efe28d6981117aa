"""The collapse as folded GEMMs: shape classes, canonical layouts and the "matmul" backend.

Per group ``g`` (``G`` groups) of a 1x1 -> kxk -> 1x1 chain with ``T = kh*kw`` taps::

    A1 = W1[g]  (p x m)        A2_t = W2[g, :, :, t]  (q x p)       A3 = W3[g]  (n x q)
    W_t = A3 . A2_t . A1  (n x m, one per tap)

A1 and A3 are shared by every tap, so the taps fold into a GEMM dimension. In the canonical
layouts ``A2c = (q, T, p)`` (W2 with the tap moved before the input channel) and
``Wc = (n, T, m)`` (the effective kernel likewise), both products of either association
order are single GEMMs (batched over groups and over the layers of one shape class)::

    right order ("R"):  S  = A2c(q*T x p) . A1(p x m)       -> (q, T, m),  K = p
                        Wc = A3(n x q) . S(q x T*m)         -> (n, T, m),  K = q
    left order  ("L"):  U  = A3(n x q) . A2c(q x T*p)       -> (n, T, p),  K = q
                        Wc = U(n*T x p) . A1(p x m)         -> (n, T, m),  K = p

and the backward from dWc (n, T, m) is four GEMMs that share the forward's intermediate::

    R:  P    = A3^T . dWc(n x T*m)          (q, T, m)   K = n
        dA2c = P(q*T x m) . A1^T            (q, T, p)   K = m
        dA1  = A2c(q*T x p)^T . P(q*T x m)  (p, m)      K = q*T
        dA3  = dWc(n x T*m) . S(q x T*m)^T  (n, q)      K = T*m   (S saved by the forward)
    L:  dA1  = U(n*T x p)^T . dWc(n*T x m)  (p, m)      K = n*T   (U saved by the forward)
        Q    = dWc(n*T x m) . A1^T          (n, T, p)   K = m
        dA3  = Q(n x T*p) . A2c(q x T*p)^T  (n, q)      K = T*p
        dA2c = A3^T . Q(n x T*p)            (q, T, p)   K = n

The order is chosen per layer by flops (R costs 3*T*q*m*(n+p), L 3*T*n*p*(q+m), forward and
backward together), the same rule as the einsum reference. Autograd of the two forward
matmuls produces exactly these four backward GEMMs (``dS = A3^T dWc`` is P, ``dU = dWc A1^T``
is Q), so the "matmul" backend is plain differentiable torch code: no custom Function, and it
traces under ``torch.compile(fullgraph=True)``.

Memory kept for the backward, per layer, in the factors' dtype: only the intermediate (``S``:
``G*q*T*m``, or ``U``: ``G*n*T*p``, i.e. about ``rate`` times the effective kernel), as the
einsum reference. The canonical copy of W2 (the size of W2, about ``rate**2`` times the
effective kernel) and the stacked W1/W3 of multi-layer classes are rebuilt in the backward
(``FoldedClass``) instead of being kept alive: ResNet-50 at r=3 in fp32 keeps 268 MiB instead
of 1407 MiB (``python bench/collapse_saved_memory.py``, saved-tensor hooks on meta tensors),
for one more O(parameters) copy in the backward. Under torch.compile the plain autograd
version is traced (the compiler decides what to keep).

Layers of one *shape class* (same G, n, m, p, q, kh, kw) are stacked and run as one batched
matmul per product: ResNet-56 has 55 convs in about 6 classes, so the whole model's collapse
is ~6 x (3 stacking copies + 2 bmm + 1 layout copy) launches forward instead of ~3 per layer.
The same classes and canonical layouts feed the Triton grouped GEMM (``lopfast.kernels.collapse``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Layer = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


@dataclass(frozen=True)
class ShapeClass:
    """Per-group sizes of one chain: ``G`` groups, W_eff (n x m) per tap, inner widths p, q."""

    G: int
    n: int
    m: int
    p: int
    q: int
    kh: int
    kw: int

    @property
    def T(self) -> int:
        return self.kh * self.kw

    @property
    def left(self) -> bool:
        """True: associate (A3 . A2) . A1 ("L"); False: A3 . (A2 . A1) ("R"). Same rule as the reference."""
        n, m, p, q = self.n, self.m, self.p, self.q
        return n * q * p + n * p * m <= q * p * m + n * q * m

    @property
    def inter_numel(self) -> int:
        """Elements of the forward intermediate S (R) or U (L), all groups."""
        return self.G * self.T * (self.n * self.p if self.left else self.q * self.m)

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of forward + backward in the chosen order."""
        n, m, p, q, T = self.n, self.m, self.p, self.q, self.T
        per_group = 3 * T * (n * p * (q + m) if self.left else q * m * (n + p))
        return 2 * self.G * per_group


_CLASSES: Dict[tuple, ShapeClass] = {}


def shape_class(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int) -> ShapeClass:
    """The ShapeClass of factors W1 (p, m_g, 1, 1), W2 (q, p_g, kh, kw), W3 (n, q_g, 1, 1);
    a ValueError when the shapes do not chain for ``groups``.

    Asked for every layer on every ``collapse_many`` call (validation, routing, bucketing):
    memoised by the factor shapes, so a step pays a dict lookup per layer."""
    key = (w1.shape, w2.shape, w3.shape, groups)
    try:
        c = _CLASSES.get(key)
    except TypeError:  # symbolic sizes (torch.compile with dynamic shapes) do not hash
        c = key = None
    if c is None:
        c = _shape_class(w1, w2, w3, groups)
        if key is not None and len(_CLASSES) < 4096:
            _CLASSES[key] = c
    return c


def _shape_class(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, groups: int) -> ShapeClass:
    G = int(groups)
    p, m_g = int(w1.shape[0]), int(w1.shape[1])
    q, p_g, kh, kw = (int(s) for s in w2.shape)
    n, q_g = int(w3.shape[0]), int(w3.shape[1])
    if G < 1 or p != G * p_g or q != G * q_g or n % G:
        raise ValueError(
            f"inconsistent chain shapes for groups={G}: w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, "
            f"w3 {tuple(w3.shape)}"
        )
    return ShapeClass(G, n // G, m_g, p_g, q_g, kh, kw)


def bucket(layers: Sequence[Layer]) -> Dict[Tuple[ShapeClass, torch.device, torch.dtype], List[int]]:
    """Layer indices by (shape class, device, dtype), in first-appearance order."""
    out: Dict[Tuple[ShapeClass, torch.device, torch.dtype], List[int]] = {}
    for i, (w1, w2, w3, g) in enumerate(layers):
        out.setdefault((shape_class(w1, w2, w3, g), w1.device, w1.dtype), []).append(i)
    return out


def canonical(layers: Sequence[Layer], c: ShapeClass) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable canonical operands of the layers of class ``c``, batch = layers x groups.

    Returns a1 (B, p, m), a2c (B, q, T, p) contiguous, a3 (B, n, q); B = len(layers) * G.
    One copy each for W1 and W3 when there are several layers (the stack), and one for W2
    (stack and tap transpose in the same copy).
    """
    G, n, m, p, q, T = c.G, c.n, c.m, c.p, c.q, c.T
    w2t = [w2.reshape(G, q, p, T).transpose(-1, -2) for _, w2, _, _ in layers]
    if len(layers) == 1:
        w1, _, w3, _ = layers[0]
        return w1.reshape(G, p, m), w2t[0].contiguous(), w3.reshape(G, n, q)
    a1 = torch.stack([w1.reshape(G, p, m) for w1, _, _, _ in layers]).reshape(-1, p, m)
    a2c = torch.stack(w2t).reshape(-1, q, T, p)
    a3 = torch.stack([w3.reshape(G, n, q) for _, _, w3, _ in layers]).reshape(-1, n, q)
    return a1, a2c, a3


def _cast(ops: Sequence[torch.Tensor], dtype: Optional[torch.dtype]) -> Tuple[torch.Tensor, ...]:
    """``ops`` in ``dtype`` (differentiable; no copy when they already are, or for None)."""
    if dtype is None:
        return tuple(ops)
    return tuple(t.to(dtype) for t in ops)


def folded_collapse(a1: torch.Tensor, a2c: torch.Tensor, a3: torch.Tensor, left: bool) -> torch.Tensor:
    """Wc (B, n, T, m) from canonical operands: two batched GEMMs with the taps folded in.

    Differentiable; autograd's backward is the four folded GEMMs of the module docstring.
    """
    B, q, T, p = a2c.shape
    m, n = a1.shape[-1], a3.shape[1]
    if left:
        u = torch.matmul(a3, a2c.reshape(B, q, T * p))  # (B, n, T*p)
        return torch.matmul(u.reshape(B, n * T, p), a1).reshape(B, n, T, m)
    s = torch.matmul(a2c.reshape(B, q * T, p), a1)  # (B, q*T, m)
    return torch.matmul(a3, s.reshape(B, q, T * m)).reshape(B, n, T, m)


def uncanonical(wc: torch.Tensor, c: ShapeClass, n_layers: int) -> List[torch.Tensor]:
    """Per-layer effective kernels (G*n, m, kh, kw) from Wc (n_layers*G, n, T, m): one copy."""
    w = wc.reshape(n_layers, c.G * c.n, c.T, c.m).transpose(-1, -2)
    w = w.contiguous().reshape(n_layers, c.G * c.n, c.m, c.kh, c.kw)
    return list(w.unbind(0))


class FoldedClass(torch.autograd.Function):
    """All layers of one shape class by the folded GEMMs, keeping only the intermediate.

    Forward: the canonical operands (stacked W1 / W3, W2 with its taps moved: copies) and the
    two GEMMs, as ``folded_collapse``. Saved for the backward: the factors themselves (the
    parameters: no extra memory) and the intermediate S or U. The canonical copies are rebuilt
    in the backward (one more O(parameters) copy, against the same O(parameters x width)
    GEMM flops) instead of being kept alive between forward and backward as plain autograd of
    ``folded_collapse`` does. Backward: the four folded GEMMs of the module docstring, the
    same products autograd would run. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, c: ShapeClass, dtype: Optional[torch.dtype], *flat: torch.Tensor):  # type: ignore[override]
        L = len(flat) // 3
        layers = [(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2], c.G) for i in range(L)]
        a1, a2c, a3 = _cast(canonical(layers, c), dtype)
        B, q, T, p = a2c.shape
        n, m = c.n, c.m
        if c.left:
            inter = torch.matmul(a3, a2c.reshape(B, q, T * p))  # U (B, n, T*p)
            wc = torch.matmul(inter.reshape(B, n * T, p), a1)
        else:
            inter = torch.matmul(a2c.reshape(B, q * T, p), a1)  # S (B, q*T, m)
            wc = torch.matmul(a3, inter.reshape(B, q, T * m))
        ctx.c, ctx.dtype = c, dtype
        ctx.save_for_backward(*flat, inter)
        return tuple(uncanonical(wc.reshape(B, n, T, m), c, L))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts: torch.Tensor):  # type: ignore[override]
        c: ShapeClass = ctx.c
        *flat, inter = ctx.saved_tensors
        L = len(flat) // 3
        G, n, m, p, q, T = c.G, c.n, c.m, c.p, c.q, c.T
        B = L * G
        a1, a2c, a3 = _cast(canonical([(flat[3 * i], flat[3 * i + 1], flat[3 * i + 2], G) for i in range(L)], c),
                            ctx.dtype)
        # dWc (B, n, T, m) from the per-layer (G*n, m, kh, kw) gradients: one layout copy
        dwc = torch.stack([g.reshape(G, n, m, T) for g in gouts]).transpose(-1, -2).reshape(B, n, T, m)
        dwc = dwc.to(inter.dtype)
        if c.left:
            dwc2 = dwc.reshape(B, n * T, m)
            da1 = torch.matmul(inter.reshape(B, n * T, p).transpose(-1, -2), dwc2)
            qq = torch.matmul(dwc2, a1.transpose(-1, -2)).reshape(B, n, T * p)  # Q
            da3 = torch.matmul(qq, a2c.reshape(B, q, T * p).transpose(-1, -2))
            da2c = torch.matmul(a3.transpose(-1, -2), qq)
        else:
            dwc2 = dwc.reshape(B, n, T * m)
            pp = torch.matmul(a3.transpose(-1, -2), dwc2)  # P (B, q, T*m)
            da3 = torch.matmul(dwc2, inter.reshape(B, q, T * m).transpose(-1, -2))
            pp = pp.reshape(B, q * T, m)
            da2c = torch.matmul(pp, a1.transpose(-1, -2))
            da1 = torch.matmul(a2c.reshape(B, q * T, p).transpose(-1, -2), pp)
        # back to the factor layouts (and dtype): views for W1 / W3, one copy for W2 (taps back last)
        pdt = flat[0].dtype
        d1 = da1.to(pdt).reshape(L, G * p, m, 1, 1).unbind(0)
        d3 = da3.to(pdt).reshape(L, G * n, q, 1, 1).unbind(0)
        d2t = da2c.reshape(L, G, q, T, p).transpose(-1, -2)
        d2 = torch.empty(d2t.shape, dtype=pdt, device=d2t.device).copy_(d2t)  # layout and dtype in one copy
        d2 = d2.reshape(L, G * q, p, c.kh, c.kw).unbind(0)
        grads = []
        for i in range(L):
            grads += [d1[i], d2[i], d3[i]]
        need = ctx.needs_input_grad[2:]
        return (None, None, *[g if nd else None for g, nd in zip(grads, need)])


def matmul_many(layers: Sequence[Layer], recompute: bool = True,
                dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """Effective kernels of ``layers`` (already validated) by folded GEMMs, one bmm per shape
    class and product. Runs in ``dtype`` (None: the factors' dtype; else the stacked canonical
    operands are cast to it, the kernels come out in it and the factor gradients go back in the
    factors' dtype); torch.matmul accumulates in fp32 for fp16/bf16 and follows PyTorch's own
    TF32 setting for fp32 on CUDA.

    ``recompute`` (eager calls that build a graph): each class is one ``FoldedClass`` node that
    keeps only the intermediate for the backward and rebuilds the canonical copies of the
    factors there. Under ``torch.compile`` or with ``recompute=False``: plain differentiable
    torch ops (``folded_collapse``; autograd keeps the canonical copies), which trace whole.
    """
    graph = recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    results: List[torch.Tensor] = [None] * len(layers)  # type: ignore[list-item]
    for (c, _, _), idx in bucket(layers).items():
        group = [layers[i] for i in idx]
        if graph and any(w.requires_grad for layer in group for w in layer[:3]):
            flat = [w for layer in group for w in layer[:3]]
            outs = list(FoldedClass.apply(c, dtype, *flat))
        else:
            outs = uncanonical(folded_collapse(*_cast(canonical(group, c), dtype), c.left), c, len(group))
        for i, o in zip(idx, outs):
            results[i] = o
    return results


__all__ = ["FoldedClass", "ShapeClass", "bucket", "canonical", "folded_collapse", "matmul_many", "shape_class", "uncanonical"]
