"""``SPLoss`` (module form of ``lopfast.sp_loss``) and ``SPDistiller`` (teacher + student + hooks + loss).

Training step with the distiller (paper Eq. 12, ``gamma`` the SP weight)::

    import torch.nn.functional as F
    import lopfast

    student = lopfast.expand(pruned_model, rate=3.0)          # ExpandedConv2d at the conv paths
    distiller = lopfast.SPDistiller(teacher, student)        # pairs every expanded conv by path; mean over pairs
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    for x, y in loader:
        logits, sp = distiller(x)                               # student output, float32 SP loss
        loss = F.cross_entropy(logits, y) + gamma * sp          # gamma = lopfast.distill.DEFAULT_GAMMA
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    distiller.close()                                           # or: with lopfast.SPDistiller(...) as d:

With DistributedDataParallel pass the wrapper as ``student``: hooks go on the inner module
(``ddp.module``) and the wrapper itself is called, so DDP's gradient hooks and buffer syncs run.
``student_forward=fn`` replaces the call (``fn(*args, **kwargs)`` must run the hooked modules).

torch.compile, in either order: a student compiled after the distiller is traced with its hooks
(and recompiled without them after ``close()``: dynamo guards hooks that exist when it compiles).
Compiled code made *before* the distiller ignores hooks added later (dynamo's
``skip_nnmodule_hook_guards``), so a distiller given a compiled student, teacher or
``student_forward`` (an ``OptimizedModule``, ``module.compile()``, a compiled function) calls
``torch.compiler.reset()`` when it opens: the next call recompiles with the hooks. That drops
every compiled graph of the process, which then recompiles once. Compiled code it cannot see
(a compiled function that calls the student, not passed as ``student_forward``) is reported
when no tapped layer runs, with this remedy.
"""
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from lopfast.backend import check_backend
from lopfast.checks import InvalidArgumentType
from lopfast.distill.pairs import default_pairing, is_compiled, sp_pairs, unpaired_message, unwrap
from lopfast.distill.taps import FeatureTaps
from lopfast.ops.sp_loss import sp_gram, sp_loss, sp_loss_from_gram

#: Default SP weight gamma (Eq. 12) for ``SPDistiller`` (whose default ``reduction="mean"``): the weight
#: Tung & Mori use for one layer pair on CIFAR, applied to the SP loss *averaged* over the
#: distilled pairs, so it does not grow with the number of pairs (the old default, 3000 on the
#: *sum* over digitsnet's 6 pairs, is 18000 per pair and cost lop 2.4 points, issue 13).
#: With ``reduction="sum"`` (Eq. 11 literally) divide it by the number of pairs.
#:
#: Evidence (``lopfast reproduce gamma --budget paper --seeds 3 --seed 1`` reruns it): digitsnet on digits, l1 to 94.87 % of
#: weights removed, batch 256, 30 epochs, seeds 1-3 (own teacher each), CPU, torch 2.14.1.
#: Top-1 %, mean ± std (n=3); lop - ft paired by seed:
#:
#:     ft                  93.06 ± 0.56
#:     lop gamma   300     93.70 ± 0.42    lop - ft  +0.65 ± 0.58
#:     lop gamma  3000     93.89 ± 0.56    lop - ft  +0.83 ± 0.96
#:     lop gamma 30000     82.41 ± 7.63    lop - ft -10.65 ± 7.68
#:
#: 300 and 3000 are indistinguishable at n=3; a 10x larger weight breaks training. The
#: per-pair weight of the SP paper is kept. The other LOP-only knobs, same cell, gamma 3000:
#:
#:     factor weight decay 0 (not 5e-4)   94.07 ± 0.70    vs lop default  +0.19 ± 0.16
#:     factor LR x3                       95.37 ± 0.16    vs lop default  +1.48 ± 0.42
#:     control: ft at LR 0.03 (x3)        95.46 ± 0.58    vs ft           +2.41 ± 0.89
#:     lop at LR 0.03                     95.83 ± 0.28    vs ft at 0.03   +0.37 ± 0.42
#:
#: So factor weight decay does not matter here, and the factor-LR gain is the schedule's: this
#: 180-step budget is too short at LR 0.01 for both methods, and at LR 0.03 lop's lead over ft
#: shrinks to within its spread. Defaults stay plain (factor_weight_decay = weight_decay,
#: factor_lr_scale = 1). CIFAR-10 has not been measured yet.
DEFAULT_GAMMA = 3000.0


def _param_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype inputs are cast to for ``model`` (None: no cast, e.g. under autocast)."""
    if torch.is_autocast_enabled():
        return None  # autocast decides the precision of every op
    for p in unwrap(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _compiled_hint() -> str:
    """The remedy for hooks that compiled code skips, when torch.compile has been used here."""
    if "torch._dynamo" not in sys.modules:
        return ""
    return ("; if that network (or a function calling it) was compiled with torch.compile and run before this "
            "SPDistiller was created, its compiled code does not call the distiller's hooks: create the SPDistiller "
            "first, pass the compiled student or function to it (student=, student_forward=), or call "
            "torch.compiler.reset() after creating it")


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


class SPLoss(nn.Module):
    """Module form of ``lopfast.sp_loss``: ``SPLoss()(student_feats, teacher_feats)`` -> float32 scalar."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)

    def forward(self, student, teacher) -> torch.Tensor:
        return sp_loss(student, teacher, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class SPDistiller:
    """Similarity-preserving distillation of ``student`` from ``teacher`` over paired layers.

    ``distiller(*inputs)`` runs the teacher under ``torch.no_grad`` in eval mode, with hooks that
    keep the tapped activations, reduces them all to normalised Grams in one multi-tensor call
    (on CUDA one Gram launch for all layers of a dtype through the kernels' pair table from 9
    layers on, else one per 8 layers; the activations are released right after), then runs the
    student with grad (its tapped outputs are kept for the loss), and returns
    ``(student_output, sp_loss)``; the loss is a float32 scalar (paper Eq. 11).

    Args:
        teacher: the unpruned network (put in eval mode on every call).
        student: the expanded pruned network, possibly wrapped in DDP / DataParallel.
        layers: None (every expanded layer of the student at a path where the teacher has a layer
            of the same kind; the others are left out with a warning naming them and why, and
            listed in ``unpaired``; none paired is a ValueError; layers that do not run in both
            forwards, such as GoogLeNet's auxiliary heads, are left out with a warning and listed
            in ``dropped``) or a list of module names present in both, which must all run (see
            ``lopfast.sp_pairs``).
        backend: backend of the SP loss ("auto", "torch", "triton", "cuda").
        student_forward: callable run instead of ``student(*inputs)``.
        reduction: "mean" (default: averaged over pairs, so one gamma, ``DEFAULT_GAMMA``, fits any
            model; what the pipeline and CLI use) or "sum" (Eq. 11 literally: the loss grows with
            the number of pairs, so gamma must shrink with it).

    Precision: each network runs in its own dtype: floating-point inputs are cast to the dtype
    of the teacher's parameters for the teacher, and to the student's for the student, when they
    differ (e.g. an fp16 student distils from an fp32 teacher on fp32 batches); the Grams and
    the loss are float32 either way. Under ``torch.autocast`` nothing is cast (autocast decides).

    NaN / inf in the inputs or weights propagate to the loss as in any PyTorch op (no per-step
    check: it would cost a host sync); ``lopfast.pipeline.train`` checks once per epoch.

    A plain object, not an ``nn.Module``: the teacher's parameters never leak into the student's
    ``parameters()`` / ``state_dict()``. ``close()`` (or leaving a ``with`` block) removes every hook.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, *, layers: Optional[Sequence[str]] = None,
                 backend: str = "auto", student_forward: Optional[Callable[..., Any]] = None,
                 reduction: str = "mean"):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if not isinstance(teacher, nn.Module):
            raise InvalidArgumentType("teacher", teacher, "an nn.Module (the unpruned network)",
                                      "build or load it first, e.g. lopfast.load(path)")
        if not isinstance(student, nn.Module):
            raise InvalidArgumentType("student", student, "an nn.Module (the expanded pruned network)")
        if student_forward is not None and not callable(student_forward):
            raise InvalidArgumentType("student_forward", student_forward, "a callable or None")
        self.reduction = reduction
        self.backend = check_backend(backend)
        self.teacher = teacher
        self.student = student
        self.student_forward = student if student_forward is None else student_forward
        #: student layers the default pairing left out: {name: why} (empty with layers=[...])
        self.unpaired: Dict[str, str] = {}
        if layers is None:
            names, self.unpaired = default_pairing(teacher, student)
            if self.unpaired:
                warnings.warn(unpaired_message(self.unpaired, len(names)), stacklevel=2)
            layers_arg: Optional[Sequence[str]] = names
        else:
            layers_arg = layers
        self.pairs = sp_pairs(teacher, student, layers_arg)
        self.layers = [name for name, _, _ in self.pairs]
        # default pairing: layers that do not run in both forwards (auxiliary heads run only in the
        # student's training forward) are left out, listed in ``dropped``; named layers must run
        self._drop_missing = layers is None
        self.dropped: List[str] = []
        self._keep: dict = {}  # device index of the pairs both nets ran, by (positions, device)
        self._teacher_taps = FeatureTaps(teacher, self.layers, transform=self._reduce)
        try:
            self._student_taps = FeatureTaps(student, self.layers)
        except Exception:  # pragma: no cover
            self._teacher_taps.close()
            raise
        if is_compiled(teacher, student, self.student_forward):
            # code compiled before the hooks existed would never call them (module docstring)
            torch.compiler.reset()

    def _reduce(self, name: str, output: torch.Tensor) -> torch.Tensor:
        # keep the (detached) activation: all of a step's teacher activations are reduced to Grams
        # together in teacher_grams: one multi-tensor call (one launch on CUDA, ceil(P / 8) per-pair)
        return output.detach()

    @property
    def closed(self) -> bool:
        return not self._teacher_taps.active

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("SPDistiller is closed (its hooks were removed)")

    def teacher_grams(self, *args, **kwargs) -> torch.Tensor:
        """Run the teacher on the inputs; the normalised Grams (P, b, b) of the paired layers."""
        self._check_open()
        self.teacher.eval()
        self._teacher_taps.clear()
        dtype = _param_dtype(self.teacher)
        if dtype is not None:
            args = tuple(_cast(a, dtype) for a in args)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        with torch.no_grad():
            self.teacher(*args, **kwargs)
            names = self._teacher_taps.ran() if self._drop_missing else None
            self._teacher_ran = self.layers if names is None else names
            if names == []:
                raise RuntimeError(f"SPDistiller: none of the paired layers {self.layers} ran in the teacher's "
                                   f"forward{_compiled_hint()}")
            return sp_gram(self._teacher_taps.collect(names=names), backend=self.backend)

    def __call__(self, *args, **kwargs):
        gt = self.teacher_grams(*args, **kwargs)
        teacher_ran = self._teacher_ran
        self._student_taps.clear()
        dtype = _param_dtype(self.student)
        if dtype is not None:
            args = tuple(_cast(a, dtype) for a in args)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        try:
            out = self.student_forward(*args, **kwargs)
            names = self.layers
            if self._drop_missing:
                student_ran = set(self._student_taps.ran())
                names = [n for n in teacher_ran if n in student_ran]
                self._note_dropped(names)
                if len(names) != len(teacher_ran):
                    keep = tuple(i for i, n in enumerate(teacher_ran) if n in student_ran)
                    # a device index made once (in an eager step), never a host list: indexing with
                    # one copies it to the device, which a CUDA-graph capture of the step forbids
                    idx = self._keep.get((keep, gt.device))
                    if idx is None:
                        idx = self._keep[(keep, gt.device)] = torch.tensor(keep, device=gt.device)
                    gt = gt.index_select(0, idx)
            feats = self._student_taps.collect(names=names)
        finally:
            self._student_taps.clear()
        loss = sp_loss_from_gram(feats, gt, backend=self.backend)
        return out, loss / len(feats) if self.reduction == "mean" and feats else loss

    def _note_dropped(self, names: List[str]) -> None:
        if not names:
            raise RuntimeError(f"SPDistiller: none of the paired layers {self.layers} ran in both the teacher's "
                               f"and the student's forward{_compiled_hint()}; or pass layers=[...] naming "
                               "modules that run in both")
        dropped = [n for n in self.layers if n not in names]
        if dropped != self.dropped:
            self.dropped = dropped
            warnings.warn(f"SPDistiller: {len(dropped)} paired layers did not run in both forwards and are left out "
                          f"of the SP loss (auxiliary heads run only in training, the teacher runs in eval mode; "
                          f"nn.MultiheadAttention reads its out_proj's weight without calling it): {dropped}",
                          stacklevel=3)

    def close(self) -> None:
        self._teacher_taps.close()
        self._student_taps.close()

    def __enter__(self) -> "SPDistiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SPDistiller(pairs={len(self.layers)}, backend={self.backend!r}, closed={self.closed})"
