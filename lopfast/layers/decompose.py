"""The maths of linear over-parameterization (paper Eq. 2-5), free of nn.Module.

Shapes (per group ``g`` of a grouped conv, ``G`` groups in all)::

    W    (n, m_g, kh, kw)      the compact conv weight,  m_g = m / G, n_g = n / G
    W1   (p, m_g, 1, 1)        first 1x1,   p = G * p_g,  p_g = ceil(rate * m_g)
    W2   (q, p_g, kh, kw)      middle kxk,  q = G * q_g,  q_g = ceil(rate * n_g)
    W3   (n, q_g, 1, 1)        last 1x1

    W[g] = W3[g] @ W2[g] @ W1[g]   for every kernel tap (Eq. 2)

``collapse`` is that product (differentiable), ``decompose`` its exact inverse construction
(Eq. 3): W1 and W3 are drawn at random and W2 = right_inv(W3) . W . left_inv(W1).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

from lopfast.checks import InvalidArgument, InvalidArgumentType

# The collapse reference lives beside the op it checks (lopfast.ops.collapse); re-exported here
# because the layer maths reads better with it in one place.
from lopfast.ops.collapse import reference_collapse as collapse  # noqa: F401

INITS = ("orthogonal", "normal")


def check_rate(rate: object, argname: str = "rate") -> float:
    """Validate an expansion rate: a finite number >= 1 (exactness needs p >= m and q >= n)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"{argname} must be a number, got {type(rate).__name__}")
    rate = float(rate)
    if not math.isfinite(rate) or rate < 1.0:
        raise ValueError(
            f"{argname} must be >= 1, got {rate}: the expanded chain reproduces the compact layer "
            "exactly only when every inner width is at least the width it replaces "
            "(p = ceil(rate*m) >= m and q = ceil(rate*n) >= n, paper Sec. 2.1)"
        )
    return rate


def _device_bytes(device: torch.device) -> Optional[int]:
    """Total memory of ``device`` in bytes (None where unknown: meta, or no way to ask)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return None


def check_factor_size(numel: int, rate: float, device, dtype: Optional[torch.dtype], what: str,
                      argname: str = "rate") -> None:
    """Refuse a rate whose expanded factors (``numel`` elements of ``dtype`` on ``device``) are
    larger than the device's whole memory: named here, before an allocation fails with torch's
    own out-of-memory message (which names no argument)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    total = _device_bytes(device)
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    if total is not None and numel * itemsize > total:
        raise InvalidArgument(argname, rate, "small enough for the expanded factors to fit in memory",
                              f"{what} would get {numel:,} factor parameters ({numel * itemsize / 2**30:,.1f} GiB "
                              f"in {str(dtype or torch.get_default_dtype()).replace('torch.', '')}), more than the "
                              f"{total / 2**30:,.1f} GiB of {device}; the paper uses rates 2 to 5")


def check_generator(generator: object) -> Optional[torch.Generator]:
    """None or a CPU ``torch.Generator`` (the random factors are drawn on the CPU, in float64)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise InvalidArgumentType("generator", generator, "a torch.Generator or None")
    if generator.device.type != "cpu":
        raise InvalidArgument("generator", generator, "a CPU torch.Generator (the factors are drawn on the CPU)")
    return generator


def check_init(init: object) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init  # type: ignore[return-value]


def expanded_width(rate: float, width: int) -> int:
    """ceil(rate * width), robust to float noise (3.0 * 5 must give 15, not 16)."""
    return max(width, int(math.ceil(rate * width - 1e-9)))


def _random_factor(rows: int, cols: int, init: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A float64 (rows, cols) matrix of full rank.

    ``orthogonal``: orthonormal columns (rows >= cols) or rows (rows < cols), so its one-sided
    inverse is its transpose and perfectly conditioned. ``normal``: i.i.d. N(0, 1/cols), the
    paper's plain random initialisation.
    """
    a = torch.randn(rows, cols, dtype=torch.float64, generator=generator)
    if init == "normal":
        return a / math.sqrt(cols)
    if rows >= cols:
        q, r = torch.linalg.qr(a)
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    q, r = torch.linalg.qr(a.T)
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).T


def _one_sided_inverse(a: torch.Tensor, init: str) -> torch.Tensor:
    """Left inverse of a tall full-rank matrix / right inverse of a wide one (the pseudo-inverse)."""
    if init == "orthogonal":
        return a.T
    return torch.linalg.pinv(a)


def decompose(
    weight: torch.Tensor,
    groups: int,
    rate: float,
    *,
    init: str = "orthogonal",
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a compact conv weight into an exact chain (W1, W2, W3) (paper Eq. 3).

    Solved in float64 on the CPU; the results are float64 CPU tensors (the caller casts).
    """
    rate = check_rate(rate)
    init = check_init(init)
    n, m_g, kh, kw = weight.shape
    G = groups
    n_g = n // G
    p_g = expanded_width(rate, m_g)
    q_g = expanded_width(rate, n_g)
    w = weight.detach().to(device="cpu", dtype=torch.float64).reshape(G, n_g, m_g, kh * kw)
    w1s, w2s, w3s = [], [], []
    for g in range(G):
        w1 = _random_factor(p_g, m_g, init, generator)  # tall: left inverse
        w3 = _random_factor(n_g, q_g, init, generator)  # wide: right inverse
        w1_linv = _one_sided_inverse(w1, init)  # (m_g, p_g)
        w3_rinv = _one_sided_inverse(w3, init)  # (q_g, n_g)
        w2 = torch.einsum("qn,nmt,mp->qpt", w3_rinv, w[g], w1_linv)
        w1s.append(w1)
        w2s.append(w2)
        w3s.append(w3)
    w1 = torch.cat(w1s).reshape(G * p_g, m_g, 1, 1)
    w2 = torch.cat(w2s).reshape(G * q_g, p_g, kh, kw)
    w3 = torch.cat(w3s).reshape(n, q_g, 1, 1)
    return w1, w2, w3


# ----------------------------------------------------------------------------- linear chains


def linear_widths(in_features: int, out_features: int, rate: float, depth: int) -> List[int]:
    """Widths [m, p, ..., p, n] of a depth-``depth`` linear chain; p = ceil(rate * min(m, n)).

    Using min(m, n) keeps a classifier head (e.g. 1280 -> 10) cheap while every inner matrix
    still has the one-sided inverse Eq. 5 needs (p >= min(m, n) suffices, see ``solved_index``).
    """
    p = expanded_width(rate, min(in_features, out_features))
    return [in_features] + [p] * (depth - 1) + [out_features]


def solved_index(widths: Sequence[int]) -> int:
    """Index theta of the factor solved by Eq. 5; all others are random.

    Factor i maps widths[i] -> widths[i+1]. Factors before theta need a left inverse
    (widths[i+1] >= widths[i]), factors after it a right inverse (widths[i+1] <= widths[i]).
    """
    depth = len(widths) - 1
    for theta in range(depth):
        before = all(widths[i + 1] >= widths[i] for i in range(theta))
        after = all(widths[i + 1] <= widths[i] for i in range(theta + 1, depth))
        if before and after:
            return theta
    raise ValueError(f"no exact decomposition exists for widths {list(widths)}")


def decompose_linear(
    weight: torch.Tensor,
    widths: Sequence[int],
    *,
    init: str = "orthogonal",
    generator: Optional[torch.Generator] = None,
) -> List[torch.Tensor]:
    """Split a linear weight (n, m) into factors [W1, ..., Wl] with Wl...W1 = W (paper Eq. 5)."""
    init = check_init(init)
    depth = len(widths) - 1
    theta = solved_index(widths)
    factors: List[Optional[torch.Tensor]] = [None] * depth
    for i in range(depth):
        if i != theta:
            factors[i] = _random_factor(widths[i + 1], widths[i], init, generator)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    for i in range(theta):  # peel the random factors in front: W . left_inv(W_i) ...
        w = w @ _one_sided_inverse(factors[i], init)  # type: ignore[arg-type]
    for i in range(depth - 1, theta, -1):  # ... and behind: right_inv(W_i) . W
        w = _one_sided_inverse(factors[i], init) @ w  # type: ignore[arg-type]
    factors[theta] = w
    return factors  # type: ignore[return-value]


def collapse_linear(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Effective weight Wl . ... . W1 of a linear chain (differentiable)."""
    out = factors[0]
    for f in factors[1:]:
        out = f @ out
    return out
