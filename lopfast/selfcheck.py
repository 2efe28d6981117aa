"""``lopfast selfcheck``: every available backend of every op on this machine, against float64.

Ops checked, forward and backward each (one row per op, backend, dtype and direction):
    collapse        one expanded conv's W3.W2.W1 (``lopfast.ops.collapse.collapse``)
    collapse_many   a model's layer list in one grouped call (``collapse_many``)
    collapse_step   the same with fp32 factors in a bf16 step: the collapse follows the step's
                    precision (``collapse_many(dtype=bf16)``, what ``CollapsedForward`` runs under
                    bf16 autocast); budget from PyTorch's einsum on the factors rounded to bf16,
                    i.e. the error is stated against the step's own precision (bf16 rows only)
    sp_loss         the SP distillation loss over several layer pairs (``lopfast.sp_loss``)
    expanded_conv   ``ExpandedConv2d`` in collapsed mode (its collapse on the backend), input,
                    weight and bias gradients included
    sp_distill/<net>  the SP loss on the features a real ``SPDistiller`` step collects, computed
                    as the distiller does (``sp_gram`` of the teacher's, ``sp_loss_from_gram`` of
                    the student's; backend "cuda": ``sp_loss``). The student is the teacher
                    expanded (r = 3, exact, so at the first layers student and teacher features
                    agree and their gradient is mostly rounding: the case that misled the measured
                    dispatch), in train mode against the eval-mode teacher; the first half of the
                    network NCHW, the second half channels_last (mixed layouts, the later features
                    channels_last); "bf16" rows run the step and the loss under bf16 autocast.
                    GPU: ResNet-56 and MobileNetV2 (CIFAR, b = 256; 55 and 52 pairs) and ResNet-50
                    (ImageNet, b = 128; 53 pairs). CPU: a ResNet-20 at 8x8, b = 6 (21 pairs). The
                    "auto" row also fails when the measured dispatch rejected any candidate.

Backends: "torch" (the reference), "triton", "cuda" (where the extension is built), any backend
an op registered (``lopfast.backend.register_backend``), and "auto" (on CUDA: the measured
dispatch). A backend that cannot run here is listed as ``skip`` with the reason. On CPU, Triton
runs through its interpreter, which must be switched on before the kernels are imported:
the ``lopfast selfcheck`` command does that itself (it re-runs itself with ``TRITON_INTERPRET=1``);
``lopfast.selfcheck()`` in a process that imported lopfast without it skips Triton on CPU.

Error measure: ``max|out - ref| / max|ref|`` over every output (every gradient for the
backward), where ``ref`` is computed in float64 by plain formulas independent of lopfast's code
(einsums, three ``F.conv2d``, the SP loss written out) on the inputs exactly as the backend
receives them (rounded to the row's dtype: the rounding of the inputs is not the backend's
error). The SP-distill rows scale every gradient by the largest gradient of the step (a layer
where student and teacher agree has a gradient of rounding size, whose own relative error says
nothing).

Budget, an error model of a correct implementation in the precision in force (not the error
PyTorch happens to reach: cuBLAS's split-K summation can be more accurate than a correct K
loop, which is how a "2 x PyTorch's error" budget failed correct kernels on the H200):

    budget = SAFETY * e(eta) + u_out
    eta    = u_mul + sqrt(K) * u_acc + n_int * u_dtype

* ``K`` the longest accumulation (dot product) of the op at the case's shapes; ``u_acc`` the unit
  roundoff of the accumulation (fp32, 2**-24; fp64, 2**-53), so ``sqrt(K) * u_acc`` is the
  probabilistic backward error of a length-K sum (Higham & Mary 2019): the computed result is
  the exact one of inputs perturbed by about that much, relatively.
* ``u_mul`` the rounding of the multiplier's operands: TF32 (2**-11) where PyTorch's switch
  allows it for fp32 (matmuls: ``torch.backends.cuda.matmul``; the expanded conv's convolutions:
  cuDNN's TF32 switch, on by default), else 0 (fp32 FMA and bf16/fp16 products are exact).
* ``n_int`` the intermediate results stored in the input dtype on the way (``u_dtype`` each): 1
  for the collapse (its middle product, as PyTorch and the grouped GEMM keep it), 2 for the
  expanded conv (that, and the effective kernel), 0 for the SP loss (fp32 from the inputs; its
  bf16 backward holds M = dG + dG^T as two bf16 parts, 2**-16, added to ``eta``).
* ``e(eta)`` the forward error that such a backward error causes on the case's own inputs:
  the plain float64 formula run on every input (features, factors, incoming gradients)
  multiplied by ``1 + eta * r``, ``r`` random signs, two draws, the larger error: the magnitudes,
  cancellations and conditioning of the case enter through it.
* ``u_out`` the rounding of the result to its dtype (the SP loss is an fp32 scalar; it computes in
  fp32 from fp32 / bf16 inputs, in float64 from float64 ones); ``SAFETY`` = 4 for the tail of the
  maximum over many entries and the constants of blocked summation.

In fp32 and fp64 every budget is far below 1 % (``LOOSE``), so a kernel off by 1 % fails; in
bf16 the storage of an intermediate product costs about 2**-8 times the chain's amplification, so
the bf16 rows of the collapse and the expanded conv have budgets near or above 1 % (their
note says so): a wrong kernel shows in its fp32 row. A backend fails when its error exceeds
the budget, it returns non-finite values, or raises.

On a GPU it uses larger shapes than on CPU: several row tiles and feature chunks of the
kernels, unaligned feature counts, channels_last inputs, batch 1.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LOOSE", "SAFETY", "UNIT_ROUNDOFF", "check_distill", "distill_features", "main", "selfcheck"]

#: unit roundoff of each dtype (half the spacing of the numbers near 1)
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U_TF32 = 2.0**-11
U_SPLIT = 2.0**-16  # M = hi + lo in bf16 (the SP backward's bf16 tensor-core product)
SAFETY = 4.0
#: a budget at or above this cannot tell a kernel that is 1 % off: such rows say so in their note
LOOSE = 1e-2
_DT = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_DRAWS = 2


# ----------------------------------------------------------------------------- plain formulas
def _plain_collapse(w1, w2, w3, groups):
    """W_eff = W3.W2.W1 per tap and group, written out once more (independent of lopfast)."""
    G = groups
    p, m_g = w1.shape[:2]
    q, p_g, kh, kw = w2.shape
    n, q_g = w3.shape[:2]
    outs = []
    for g in range(G):
        a1 = w1[g * p_g:(g + 1) * p_g, :, 0, 0]                      # (p_g, m_g)
        a2 = w2[g * q_g:(g + 1) * q_g].reshape(q_g, p_g, kh * kw)     # (q_g, p_g, T)
        a3 = w3[g * (n // G):(g + 1) * (n // G), :, 0, 0]           # (n_g, q_g)
        outs.append(torch.einsum("nq,qpt,pm->nmt", a3, a2, a1))
    return torch.cat(outs).reshape(n, m_g, kh, kw)


def _plain_sp_loss(student, teacher):
    total = 0.0
    for s, t in zip(student, teacher):
        b = s.shape[0]
        qs, qt = s.reshape(b, -1), t.detach().reshape(b, -1)
        gs, gt = F.normalize(qs @ qs.T, dim=1), F.normalize(qt @ qt.T, dim=1)
        total = total + ((gt - gs) ** 2).sum() / (b * b)
    return total


def _plain_expanded_conv(x, w1, w2, w3, bias, layer):
    h = F.conv2d(x, w1, None, 1, layer.padding, 1, layer.groups)
    h = F.conv2d(h, w2, None, layer.stride, 0, layer.dilation, layer.groups)
    return F.conv2d(h, w3, bias, 1, 0, 1, layer.groups)


# ----------------------------------------------------------------------------- inputs
def _inp(x64: torch.Tensor, device, dt, via=None, eta: float = 0.0, seed: int = 0, grad: bool = False,
         channels_last: bool = False) -> torch.Tensor:
    """``x64`` (the original values) as an input on ``device`` in dtype ``dt``: first rounded to ``via`` (the
    row's dtype: the float64 reference sees the inputs the backend gets), then, with ``eta``,
    every entry multiplied by ``1 + eta * (+-1)`` (random signs from ``seed``: the error model)."""
    x = x64 if via is None else x64.to(via)
    x = x.to(device=device, dtype=dt)
    if eta:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        sign = torch.randint(0, 2, x.shape, generator=gen, device=x.device, dtype=torch.int8).to(dt) * 2 - 1
        x = x * (1 + eta * sign)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_() if grad else x


def _err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], scale: str = "tensor") -> float:
    """``max|out - ref| / max|ref|`` per output, the worst of them; ``scale="list"``: every output
    against the largest ``max|ref|`` of the list. inf for non-finite or missing outputs."""
    worst = 0.0
    top = 0.0
    if scale == "list":
        top = max((float(r.detach().abs().max()) for r in refs if r is not None and r.numel()), default=0.0)
    for o, r in zip(outs, refs):
        if o is None or r is None:
            if (o is None) != (r is None):
                return math.inf
            continue
        o64, r64 = o.detach().double().cpu(), r.detach().double().cpu()
        if o64.shape != r64.shape or not bool(torch.isfinite(o64).all()):
            return math.inf
        sc = top if scale == "list" else (float(r64.abs().max()) if r64.numel() else 0.0)
        diff = float((o64 - r64).abs().max()) if r64.numel() else 0.0
        worst = max(worst, diff / sc if sc > 0 else diff)
    return worst


def _conv_tf32(device: torch.device) -> bool:
    """Whether cuDNN may run fp32 convolutions in TF32 (PyTorch's default: yes)."""
    if device.type != "cuda":
        return False
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    p = str(getattr(conv, "fp32_precision", "none")) if conv is not None else "none"
    if p == "none":
        p = str(getattr(cudnn, "fp32_precision", "none"))
    if p != "none":
        return p == "tf32"
    try:
        return bool(cudnn.allow_tf32)
    except Exception:  # pragma: no cover - a torch that refuses the legacy read after the new API
        return True


class _Case:
    """One op at one dtype: ``run(backend) -> (fwd outputs, bwd outputs)``, the float64 reference
    on the row's rounded inputs, and the budgets of the error model (module docstring).

    ``inputs(dt, via=None, eta=0.0, seed=0)`` builds the op's inputs; ``plain(*inputs)`` the plain
    formula's (fwd outputs, bwd outputs); ``K``, ``n_int``, ``tf32``: the model's accumulation
    length, intermediate roundings, TF32 in force; ``out_dtype``: the forward output's dtype when
    not the input's."""

    def __init__(self, op: str, dtype, run: Callable, plain: Callable, inputs: Callable, *, K: int,
                 n_int: int, tf32: bool = False, out_dtype=None, scale: str = "tensor", note: str = ""):
        self.op, self.dtype, self.run, self.scale, self.note = op, dtype, run, scale, note
        self.K, self.n_int, self.tf32 = K, n_int, tf32
        cdt = self.compute_dtype()
        self.ref = plain(*inputs(torch.float64, via=dtype))
        u_acc = UNIT_ROUNDOFF[torch.float64 if cdt == torch.float64 else torch.float32]
        self.eta = (U_TF32 if tf32 and cdt == torch.float32 else 0.0) + math.sqrt(K) * u_acc + n_int * UNIT_ROUNDOFF[cdt]
        if op.startswith("sp_") and dtype == torch.bfloat16:
            # the bf16 dQ kernel multiplies M = hi + lo in two bf16 parts: M held to 2**-16
            self.eta += U_SPLIT
        pert = [0.0, 0.0]
        for seed in range(_DRAWS):
            got = plain(*inputs(torch.float64, via=dtype, eta=self.eta, seed=seed))
            pert = [max(p, _err(g, r, scale)) for p, g, r in zip(pert, got, self.ref)]
        u_fwd = max(UNIT_ROUNDOFF[cdt], UNIT_ROUNDOFF[out_dtype or dtype])
        u_bwd = max(UNIT_ROUNDOFF[cdt], UNIT_ROUNDOFF[dtype])
        self.budgets = [SAFETY * pert[0] + u_fwd, SAFETY * pert[1] + u_bwd]

    def compute_dtype(self):
        # the SP loss computes in fp32 from fp32 / bf16 / fp16 inputs (bf16 gradients are then
        # rounded to bf16: u_out), in float64 from float64 ones (the reference; its loss is fp32)
        if self.op.startswith("sp_") and self.dtype != torch.float64:
            return torch.float32
        return self.dtype


def _sp_compute_inputs(pairs, gen):
    s64 = [torch.randn(s, generator=gen, dtype=torch.float64).relu_() for s, _, _ in pairs]
    t64 = [torch.randn(t, generator=gen, dtype=torch.float64).relu_() for _, t, _ in pairs]
    return s64, t64


# ----------------------------------------------------------------------------- cases
def _collapse_layers(big: bool) -> List[Tuple[int, int, int, int, int]]:
    """(m, n, k, groups, rate) of expanded convs."""
    layers = [(8, 8, 3, 1, 3), (6, 10, 3, 2, 2), (4, 4, 3, 4, 3), (5, 7, 1, 1, 2)]
    if big:  # GPU: CIFAR ResNet widths, a late ImageNet layer, a MobileNet depthwise conv
        layers += [(16, 16, 3, 1, 3), (64, 64, 3, 1, 3), (256, 256, 3, 1, 3), (96, 96, 3, 96, 3), (3, 16, 3, 1, 3)]
    return layers


def _factors(m, n, k, groups, rate, gen):
    from lopfast.layers.decompose import expanded_width

    p = groups * expanded_width(rate, m // groups)
    q = groups * expanded_width(rate, n // groups)
    shapes = [(p, m // groups, 1, 1), (q, p // groups, k, k), (n, q // groups, 1, 1)]
    return [(torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[1] * s[2] * s[3])) for s in shapes]


def _collapse_K(f) -> int:
    """Longest sum of the collapse and its factor gradients: over the inner widths, times the taps
    where the gradient sums over them too."""
    w1, w2, w3 = f
    T = w2.shape[2] * w2.shape[3]
    return max(w1.shape[1], w2.shape[1], w3.shape[1], w1.shape[0], w2.shape[0], w3.shape[0]) * T


def _sp_pairs(big: bool) -> List[Tuple[Tuple[int, ...], Tuple[int, ...], bool]]:
    """(student shape, teacher shape, channels_last student)."""
    pairs = [((8, 6, 4, 4), (8, 12, 4, 4), False), ((8, 5, 3, 3), (8, 10, 3, 3), True), ((8, 37), (8, 50), False)]
    if big:  # several 64/128-row tiles, several 512-feature chunks, unaligned feature counts
        pairs = [((300, 16, 16, 16), (300, 32, 16, 16), False), ((300, 1000), (300, 1001), False),
                 ((300, 8, 12, 12), (300, 16, 12, 12), True)]
    return pairs


def _cases(device: torch.device, dtypes, big: bool, seed: int, nets: Sequence[str] = ()):
    """The cases one after another (a generator: one case and its reference alive at a time)."""
    import lopfast
    from lopfast.ops._precision import fp32_matmul_precision
    from lopfast.ops.collapse import collapse, collapse_many

    mm_tf32 = device.type == "cuda" and fp32_matmul_precision() == "tf32"
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(seed)
        layers64 = [(_factors(*spec, gen), spec[3]) for spec in _collapse_layers(big)]
        dws64 = [torch.randn(f[2].shape[0], f[0].shape[1], f[1].shape[2], f[1].shape[3], generator=gen,
                             dtype=torch.float64) for f, _ in layers64]

        def collapse_inputs(dt, via=None, eta=0.0, seed=0, one=False, layers64=layers64, dws64=dws64):
            chosen = layers64[:1] if one else layers64
            ls = [([_inp(w, device, dt, via, eta, seed + 7 * i + j, grad=True) for j, w in enumerate(f)], g)
                  for i, (f, g) in enumerate(chosen)]
            return ls, [_inp(d, device, dt, via, eta, seed + 1000 + i) for i, d in enumerate(dws64[:len(chosen)])]

        def plain_collapse(ls, dws):
            outs = [_plain_collapse(*f, g) for f, g in ls]
            grads = torch.autograd.grad(outs, [w for f, _ in ls for w in f], dws)
            return [o.detach() for o in outs], list(grads)

        def run_collapse(backend, inputs=collapse_inputs, one=False, dtype=dtype):
            ls, dws = inputs(dtype, one=one)
            if one:
                (f, g), = ls
                outs = [collapse(*f, g, backend=backend)]
            else:
                outs = collapse_many([(*f, g) for f, g in ls], backend=backend)
            grads = torch.autograd.grad(outs, [w for f, _ in ls for w in f], dws)
            return [o.detach() for o in outs], list(grads)

        k1 = _collapse_K(layers64[0][0])
        kall = max(_collapse_K(f) for f, _ in layers64)
        yield _Case("collapse", dtype, lambda b, r=run_collapse: r(b, one=True), plain_collapse,
                    lambda dt, i=collapse_inputs, **kw: i(dt, one=True, **kw), K=k1, n_int=1, tf32=mm_tf32)
        yield _Case("collapse_many", dtype, run_collapse, plain_collapse, collapse_inputs, K=kall, n_int=1,
                    tf32=mm_tf32)
        if dtype in (torch.bfloat16, torch.float16):
            # the collapse of an fp32 model in a bf16 / fp16 step (lopfast.CollapsedForward under
            # autocast): the op rounds the fp32 factors to the step's dtype (what the step's conv
            # does to the kernel anyway) and multiplies them with fp32 accumulation, so the float64
            # reference on the inputs rounded to that dtype is what it computes; the error model is
            # collapse_many's in that dtype (factor gradients come back in fp32)
            def run_step_collapse(backend, inputs=collapse_inputs, dtype=dtype):
                ls, dws = inputs(torch.float32)
                outs = collapse_many([(*f, g) for f, g in ls], backend=backend, dtype=dtype)
                grads = torch.autograd.grad(outs, [w for f, _ in ls for w in f], [d.to(dtype) for d in dws])
                return [o.detach() for o in outs], list(grads)

            yield _Case("collapse_step", dtype, run_step_collapse, plain_collapse, collapse_inputs, K=kall, n_int=1,
                        tf32=mm_tf32, note="fp32 factors collapsed in the step's precision")

        pairs = _sp_pairs(big)
        s64, t64 = _sp_compute_inputs(pairs, gen)
        cl = [c for _, _, c in pairs]

        def sp_inputs(dt, via=None, eta=0.0, seed=0, s64=s64, t64=t64, cl=cl):
            s = [_inp(x, device, dt, via, eta, seed + i, grad=True, channels_last=c)
                 for i, (x, c) in enumerate(zip(s64, cl))]
            return s, [_inp(x, device, dt, via, eta, seed + 100 + i) for i, x in enumerate(t64)]

        def plain_sp(s, t):
            loss = _plain_sp_loss(s, t)
            return [loss.detach()], list(torch.autograd.grad(loss, s))

        def run_sp(backend, sp_inputs=sp_inputs, dtype=dtype):
            s, t = sp_inputs(dtype)
            loss = lopfast.sp_loss(s, t, backend=backend)
            return [loss.detach()], list(torch.autograd.grad(loss, s))

        k_sp = max(max(math.prod(s[1:]) for s, _, _ in pairs), max(math.prod(t[1:]) for _, t, _ in pairs),
                   pairs[0][0][0])
        yield _Case("sp_loss", dtype, run_sp, plain_sp, sp_inputs, K=k_sp, n_int=0, tf32=mm_tf32,
                    out_dtype=torch.float32)

        c, hw, bsz = (32, 16, 16) if big else (6, 6, 4)
        layer = lopfast.ExpandedConv2d(c, c, 3, stride=1, padding=1, rate=3, dtype=torch.float64)
        with torch.no_grad():
            layer.bias.normal_(generator=gen)
        x64 = torch.randn(bsz, c, hw, hw, generator=gen, dtype=torch.float64)
        dy64 = torch.randn(bsz, c, hw, hw, generator=gen, dtype=torch.float64)
        params64 = [p.detach() for p in (layer.weight1, layer.weight2, layer.weight3, layer.bias)]

        def conv_inputs(dt, via=None, eta=0.0, seed=0, params64=params64, x64=x64, dy64=dy64):
            ws = [_inp(p, device, dt, via, eta, seed + i, grad=True) for i, p in enumerate(params64)]
            x = _inp(x64, device, dt, via, eta, seed + 10, grad=True, channels_last=True)
            return x, ws, _inp(dy64, device, dt, via, eta, seed + 11)

        def plain_conv(x, ws, dy, layer=layer):
            y = _plain_expanded_conv(x, *ws, layer)
            return [y.detach()], list(torch.autograd.grad(y, [x, *ws], dy))

        def run_conv(backend, conv_inputs=conv_inputs, dtype=dtype, c=c):
            x, ws, dy = conv_inputs(dtype)
            mod = lopfast.ExpandedConv2d(c, c, 3, stride=1, padding=1, rate=3, device=device, dtype=dtype)
            with torch.no_grad():
                for p, w in zip((mod.weight1, mod.weight2, mod.weight3, mod.bias), ws):
                    p.copy_(w)
            mod.mode = "collapsed"
            with lopfast.use_backend(backend):
                y = mod(x)
                grads = torch.autograd.grad(y, [x, mod.weight1, mod.weight2, mod.weight3, mod.bias], dy)
            return [y.detach()], list(grads)

        # the convolutions sum over C k^2 (input, output side) and, for the weight, N H W positions
        k_conv = max(c * 9, bsz * hw * hw, _collapse_K(params64[:3]))
        yield _Case("expanded_conv", dtype, run_conv, plain_conv, conv_inputs, K=k_conv, n_int=2,
                    tf32=_conv_tf32(device) or mm_tf32)
        if dtype != torch.float64:  # the distiller's features: a training step (fp32 or bf16 autocast)
            for net in nets:
                yield _distill_case(net, device, dtype, seed, mm_tf32)


# ----------------------------------------------------------------------------- the distiller's features
DISTILL_NETS_GPU = ("resnet56", "mobilenet_v2", "resnet50")
DISTILL_NETS_CPU = ("resnet20",)


def _distill_setup(net: str, device: torch.device):
    """(model, input batch, input C/H/W) of a distill case: the issue's training configurations on
    CUDA, a ResNet-20 on 8x8 inputs on CPU (the interpreter pays per element)."""
    from lopfast.pipeline.models import build_model

    if device.type != "cuda":
        return build_model("resnet20", width=4), 6, (3, 8, 8)
    if net == "resnet50":
        from torchvision.models import resnet50

        return resnet50(num_classes=10), 128, (3, 224, 224)
    return build_model(net), 256, (3, 32, 32)


def distill_features(net: str, device, dtype=torch.float32, seed: int = 0, rate: float = 3.0):
    """Student and teacher features of one ``SPDistiller`` step, as training collects them.

    The teacher is ``net`` (random weights, eval mode), the student the teacher expanded at rate
    ``rate`` (exact: same function), in train mode; the convolutions of the second half of both
    networks are channels_last, the input NCHW, so the early features are NCHW and the later ones
    channels_last. ``dtype`` bf16 runs the forward under bf16 autocast (bf16 features), fp32
    without. Returns (student features, teacher features, batch size); the features are detached.
    """
    import lopfast

    device = torch.device(device)
    torch.manual_seed(seed)
    teacher, b, chw = _distill_setup(net, device)
    teacher = teacher.to(device).eval()
    student = lopfast.expand(copy.deepcopy(teacher), rate=rate).train()
    for model in (teacher, student):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        for m in convs[len(convs) // 2:]:
            m.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *chw, generator=gen).to(device)
    ac = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    with torch.no_grad(), ac, lopfast.SPDistiller(teacher, student, backend="torch") as d:
        d._teacher_taps.clear()
        teacher(x)
        t = [f.detach() for f in d._teacher_taps.collect()]
        d._student_taps.clear()
        student(x)
        s = [f.detach() for f in d._student_taps.collect()]
    return s, t, b


def _distill_case(net: str, device: torch.device, dtype, seed: int, mm_tf32: bool) -> _Case:
    import lopfast

    # the features stay where the step made them, in its dtype and layout (ResNet-50 at b = 128 holds
    # about 10^9 feature values a side); every input is built from them as needed
    s64, t64, b = distill_features(net, device, dtype, seed)
    cl = [f.dim() == 4 and f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous()
          for f in s64]
    autocast = dtype == torch.bfloat16

    def inputs(dt, via=None, eta=0.0, seed=0, s64=s64, t64=t64, cl=cl):
        s = [_inp(x, device, dt, via, eta, seed + i, grad=True, channels_last=c) for i, (x, c) in enumerate(zip(s64, cl))]
        t = [_inp(x, device, dt, via, eta, seed + 10_000 + i, channels_last=c) for i, (x, c) in enumerate(zip(t64, cl))]
        return s, t

    def plain(s, t):
        loss = _plain_sp_loss(s, t)
        return [loss.detach()], list(torch.autograd.grad(loss, s))

    def run(backend, inputs=inputs, dtype=dtype):
        s, t = inputs(dtype)
        ac = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ac:  # the loss under the step's autocast, as the distiller computes it in training
            if backend == "cuda":
                loss = lopfast.sp_loss(s, t, backend="cuda")
            else:
                gt = lopfast.sp_gram(t, backend=backend)
                loss = lopfast.sp_loss_from_gram(s, gt, backend=backend)
        grads = list(torch.autograd.grad(loss, s))
        if backend == "auto":  # the measured dispatch must have accepted every candidate of these calls
            keys = {("sp_loss.gram", repr(lopfast.dispatch.shape_key(t))),
                    ("sp_loss.from_gram", repr(lopfast.dispatch.shape_key(s, gt)))}
            bad = [(d["op"], d["rejected"]) for d in lopfast.dispatch.decisions()
                   if (d["op"], d["key"]) in keys and d.get("rejected")]
            if bad:
                raise RuntimeError(f"the measured dispatch rejected {bad}")
        return [loss.detach()], grads

    K = max(max(x[0].numel() for x in s64), max(x[0].numel() for x in t64), b)
    note = f"{len(s64)} pairs, b={b}, {sum(cl)} channels_last" + (", bf16 autocast" if autocast else "")
    return _Case(f"sp_distill/{net}", dtype, run, plain, inputs, K=K, n_int=0, tf32=mm_tf32,
                 out_dtype=torch.float32, scale="list", note=note)
# ----------------------------------------------------------------------------- backends
def _interpreter_active() -> bool:
    """True when lopfast's Triton kernels were built for the CPU interpreter (the switch is read
    when the kernels are imported, so setting TRITON_INTERPRET afterwards has no effect)."""
    from lopfast.backend import triton_available, triton_interpreting

    if not triton_available():
        return False
    try:
        from lopfast.kernels import sp_gram
    except Exception:
        return False
    kinds = {type(v).__name__ for v in vars(sp_gram).values()}
    if "InterpretedFunction" in kinds:
        return True
    if "JITFunction" in kinds:
        return False
    return triton_interpreting()


def _backends(op: str, device: torch.device, dtype: torch.dtype) -> List[Tuple[str, Optional[str]]]:
    """(backend, reason it cannot run here or None) for every backend of ``op`` at ``dtype``."""
    from lopfast.backend import op_backends, resolve_backend

    base = "sp_loss" if op.startswith("sp_") else "collapse"
    out = []
    for name in op_backends(base):
        if name == "auto" and device.type != "cuda":
            continue  # on CPU auto is the reference: the "torch" row
        why = None
        try:
            resolve_backend(name, device, base)
        except RuntimeError as exc:
            why = str(exc)
        if why is None and name == "triton" and device.type == "cpu" and not _interpreter_active():
            why = "the Triton kernels were imported without TRITON_INTERPRET=1 (run `lopfast selfcheck`)"
        if why is None and name == "triton" and base == "sp_loss" and dtype == torch.float64:
            # by design: tl.dot has no fp64 form on the GPU, so sp_loss refuses an explicit
            # backend="triton" for float64 and "auto" runs the float64 reference (the "torch" row)
            why = "sp_loss never runs float64 on Triton (auto runs the float64 reference)"
        out.append((name, why))
    return out


# ----------------------------------------------------------------------------- driver
def selfcheck(device: Optional[str] = None, *, json_path: Optional[str] = None, big: Optional[bool] = None,
              dtypes: Optional[Sequence[str]] = None, seed: int = 0, verbose: bool = True,
              file=None, nets: Optional[Sequence[str]] = None) -> dict:
    """Check every available backend of every lopfast op against float64 on this machine.

    Args:
        device: "cuda" or "cpu" (default: CUDA when available).
        json_path: also write the report there as JSON.
        big: GPU-sized shapes (default: on CUDA).
        dtypes: names among "fp64", "fp32", "bf16" (default: fp64, fp32 and on CUDA bf16).
        seed: seed of the random inputs.
        verbose: print the table to ``file`` (default stdout).
        nets: the networks of the ``sp_distill`` rows (default: resnet56, mobilenet_v2, resnet50
            on CUDA; the CPU stand-in, a small ResNet-20, elsewhere); ``()`` for none.

    Returns the report: ``{"ok": bool, "rows": [...], ...}``; ``ok`` is False when any row failed.
    """
    from lopfast.backend import triton_version

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    big = dev.type == "cuda" if big is None else bool(big)
    names = list(dtypes) if dtypes else (["fp64", "fp32", "bf16"] if dev.type == "cuda" else ["fp64", "fp32"])
    lookup = {v: k for k, v in _DT.items()}
    bad = [n for n in names if n not in lookup]
    if bad:
        raise ValueError(f"dtypes must be among {sorted(lookup)}, got {bad}")
    if nets is None:
        nets = DISTILL_NETS_GPU if dev.type == "cuda" else DISTILL_NETS_CPU
    unknown = [n for n in nets if n not in DISTILL_NETS_GPU + DISTILL_NETS_CPU]
    if unknown:
        raise ValueError(f"nets must be among {DISTILL_NETS_GPU + DISTILL_NETS_CPU}, got {unknown}")
    out = file or sys.stdout
    t_start = time.perf_counter()
    rows: List[Dict] = []

    def make_report(complete: bool) -> dict:
        return dict(
            ok=complete and all(r["status"] != "FAIL" for r in rows), complete=complete, device=str(dev),
            device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__, triton=triton_version(),
            interpreter=dev.type == "cpu" and _interpreter_active(),
            big_shapes=big, seed=seed, seconds=round(time.perf_counter() - t_start, 2),
            error_measure="max|out-ref|/max|ref| vs float64 plain formulas on the row's rounded inputs",
            budget_model=f"{SAFETY:g} * e(eta) + u_out, eta = u_mul + sqrt(K) u_acc + n_int u_dtype "
                         "(lopfast.selfcheck docstring)",
            rows=rows,
        )

    def write(report: dict) -> None:
        if not json_path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        tmp = f"{json_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, json_path)

    for case in _cases(dev, [lookup[n] for n in names], big, seed, nets):
        rows += _check(case, dev)
        write(make_report(False))  # a run stopped by a time limit keeps what it checked
    report = make_report(True)
    write(report)
    if verbose:
        print(format_table(report), file=out)
    return report


def _check(case: _Case, dev: torch.device) -> List[Dict]:
    """The rows of one case: every backend of its op, forward and backward."""
    rows: List[Dict] = []
    for backend, why in _backends(case.op, dev, case.dtype):
        row_base = dict(op=case.op, backend=backend, dtype=_DT[case.dtype], K=case.K, eta=case.eta)
        if why is not None:
            for direction in ("fwd", "bwd"):
                rows.append(dict(row_base, direction=direction, status="skip", error=None,
                                 budget=None, ms=None, note=why))
            continue
        t0 = time.perf_counter()
        try:
            if dev.type == "cuda":  # warm-up: compilation and dispatch tuning stay out of the time
                case.run(backend)
                _sync(dev)
            t0 = time.perf_counter()
            got = case.run(backend)
            _sync(dev)
            note, errs = case.note, [_err(g, r, case.scale) for g, r in zip(got, case.ref)]
        except Exception as exc:  # a backend that raises fails the check (and the rest goes on)
            note, errs = f"{type(exc).__name__}: {exc}".splitlines()[0][:200], [math.inf, math.inf]
        ms = 1e3 * (time.perf_counter() - t0)
        for direction, e, b in zip(("fwd", "bwd"), errs, case.budgets):
            loose = f"budget >= {LOOSE:g}: bf16 storage of intermediates" if b >= LOOSE else ""
            rows.append(dict(row_base, direction=direction, status="pass" if e <= b else "FAIL",
                             error=e, budget=b, ms=ms, note="; ".join(n for n in (note, loose) if n)))
    return rows


def check_distill(net: str, device=None, dtype: str = "fp32", seed: int = 0) -> List[Dict]:
    """The ``sp_distill/<net>`` rows alone (every backend here, forward and backward): the features
    of a real ``SPDistiller`` step (``distill_features``) against the float64 formula. ``net``
    among ``DISTILL_NETS_GPU`` (CUDA) or ``DISTILL_NETS_CPU``; ``dtype`` "fp32" or "bf16"
    (autocast)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lookup = {v: k for k, v in _DT.items()}
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    from lopfast.ops._precision import fp32_matmul_precision

    case = _distill_case(net, dev, lookup[dtype], seed, dev.type == "cuda" and fp32_matmul_precision() == "tf32")
    return _check(case, dev)


def format_table(report: dict) -> str:
    """The report as a fixed-width table (one line per op, backend, dtype, direction)."""
    lines = [f"lopfast selfcheck on {report['device']} ({report['device_name']}), torch {report['torch']}, "
             f"triton {report['triton']}" + (", Triton through the interpreter" if report["interpreter"] else ""),
             f"{'op':<24} {'backend':<8} {'dtype':<5} {'dir':<4} {'max error':>10} {'budget':>10} "
             f"{'result':<6} {'ms':>9}  note"]
    for r in report["rows"]:
        e = "-" if r["error"] is None else f"{r['error']:.2e}"
        b = "-" if r["budget"] is None else f"{r['budget']:.2e}"
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        lines.append(f"{r['op']:<24} {r['backend']:<8} {r['dtype']:<5} {r['direction']:<4} {e:>10} {b:>10} "
                     f"{r['status']:<6} {ms:>9}  {r['note']}")
    n_fail = sum(r["status"] == "FAIL" for r in report["rows"])
    n_pass = sum(r["status"] == "pass" for r in report["rows"])
    n_skip = sum(r["status"] == "skip" for r in report["rows"])
    lines.append(f"{'OK' if report['ok'] else 'FAILED'}: {n_pass} passed, {n_fail} failed, {n_skip} skipped "
                 f"in {report['seconds']:.1f} s")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lopfast selfcheck``: exit status 0 when every row passed."""
    import argparse

    p = argparse.ArgumentParser(prog="lopfast selfcheck", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def add_arguments(p) -> None:
    """The options of ``lopfast selfcheck``."""
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtypes", default=None, help="comma list among fp64,fp32,bf16")
    p.add_argument("--big", action="store_true", default=None, help="GPU-sized shapes (default on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nets", default=None,
                   help="networks of the sp_distill rows, comma list among "
                        f"{','.join(DISTILL_NETS_GPU + DISTILL_NETS_CPU)}, or 'none' (default: the GPU's "
                        "three on CUDA, resnet20 on CPU)")


def run(args) -> int:
    """Run the check from parsed arguments. On a machine without CUDA, where the Triton kernels
    were imported without the interpreter, re-runs itself in a fresh process with
    ``TRITON_INTERPRET=1`` so that the Triton backend is checked too."""
    if (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and os.environ.get("_LOPFAST_SELFCHECK_CHILD") != "1"):
        from lopfast.backend import triton_available

        if triton_available():
            import subprocess

            env = dict(os.environ, TRITON_INTERPRET="1", _LOPFAST_SELFCHECK_CHILD="1")
            argv = []
            if args.json_path:
                argv += ["--json", args.json_path]
            if args.device:
                argv += ["--device", args.device]
            if args.dtypes:
                argv += ["--dtypes", args.dtypes]
            if args.big:
                argv += ["--big"]
            argv += ["--seed", str(args.seed)]
            if args.nets:
                argv += ["--nets", args.nets]
            code = "import sys; from lopfast.selfcheck import main; sys.exit(main(sys.argv[1:]))"
            return subprocess.call([sys.executable, "-c", code, *argv], env=env)
    dtypes = [d for d in args.dtypes.split(",") if d] if args.dtypes else None
    nets = None if not args.nets else [n for n in args.nets.split(",") if n and n != "none"]
    report = selfcheck(args.device, json_path=args.json_path, big=args.big, dtypes=dtypes, seed=args.seed,
                       nets=nets)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
