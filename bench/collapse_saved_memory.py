"""Bytes autograd keeps between forward and backward of the whole-model collapse (not a timing).

Counts, with ``torch.autograd.graph.saved_tensors_hooks``, the distinct storages saved for the
backward that are not the factors themselves, on meta tensors (exact shapes, no memory, no
maths), for the einsum reference and both "matmul" variants (plain autograd of the folded
GEMMs, and ``FoldedClass``, which rebuilds the canonical copies in the backward).

    python bench/collapse_saved_memory.py [resnet50|mobilenet_v2|resnet56] [rate]
"""
from __future__ import annotations

import sys

import torch

from lopfast.layers.conv import expanded_width
from lopfast.ops.collapse import reference_collapse
from lopfast.ops.collapse_gemm import matmul_many


def _net(name: str):
    import torchvision

    if name == "resnet50":
        return torchvision.models.resnet50()
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2()
    if name == "resnet56":
        from lopfast.pipeline.models import build_model

        return build_model("resnet56")
    raise SystemExit(f"unknown net {name!r}")


def layer_list(net: torch.nn.Module, rate: float):
    """Expanded factor shapes of every conv of ``net`` (meta tensors requiring grad)."""
    out = []
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            G = mod.groups
            n, m_g, kh, kw = mod.weight.shape
            p_g, q_g = expanded_width(rate, m_g), expanded_width(rate, n // G)
            w = [torch.empty(s, device="meta", requires_grad=True)
                 for s in ((G * p_g, m_g, 1, 1), (G * q_g, p_g, kh, kw), (n, q_g, 1, 1))]
            out.append((*w, G))
    return out


def saved_bytes(fn, layers) -> int:
    params = {w.untyped_storage()._cdata for layer in layers for w in layer[:3]}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(layers)
    return sum(seen.values())


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet50"
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    with torch.device("meta"):
        net = _net(name)
    layers = layer_list(net, rate)
    factors = sum(w.numel() * 4 for layer in layers for w in layer[:3])
    print(f"{name}, rate {rate:g}, fp32, {len(layers)} convs, factors {factors / 2**20:.1f} MiB")
    for label, fn in (("reference (einsum)", lambda ls: [reference_collapse(*layer) for layer in ls]),
                      ("matmul, plain autograd", lambda ls: matmul_many(ls, recompute=False)),
                      ("matmul, FoldedClass (recompute)", lambda ls: matmul_many(ls, recompute=True))):
        print(f"  {label:34s} saved for backward: {saved_bytes(fn, layers) / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
