"""The training step of every stage, in one place, captured as one CUDA graph where it can be.

``TrainStep`` is the step that ``lopfast.pipeline.train.train`` runs for every stage (pretrain,
scratch, ft, distill, lop, lop-nokd; one GPU or DDP)::

    zero grads (set to None)
    with autocast (the step's precision: bf16 or off, cache off):
        teacher forward, no grad, and student forward   (SPDistiller; the student's expanded convs
                                                         collapsed in one grouped call by CollapsedForward)
        or the student forward alone
    loss = CE(logits, y; label smoothing) summed / global batch  [+ gamma * SP * local/global]
    backward                                              (DDP all-reduces the gradients here)
    clip the gradient norm (optional)
    SGD with momentum (Nesterov optional) and weight decay, lr = base lr x schedule[step] read on
    the device: the schedule is a device table indexed by a device step counter (or torch's
    Adam / AdamW step, capturable on CUDA, at that lr)
    the caller's after-update functions (``after_update``: e.g. an average of the weights)
    loss, SP loss and batch count added to device accumulators (read once per epoch)

Nothing in it reads a value back to the host. On CUDA the step is captured as one CUDA graph
(``lopfast.graphs.Graph``) after ``WARMUP`` eager steps (they run on the capture's side stream:
Triton compilation, the measured dispatch, cuBLAS workspaces) and replayed for every later batch
of the same shape: a replay costs two copies of the batch into the graph's static input buffers
and one graph launch, instead of hundreds of launches. What makes the replay exact:

* every tensor the step reads or writes in place lives at a fixed address: parameters and their
  momentum buffers (updated in place), BatchNorm running statistics (in place), the lr table,
  the step counter, the accumulators and the static batch; gradients are set to None at the
  start, so the captured backward allocates them in the graph's memory and every replay
  rewrites them (no accumulation across steps);
* the learning rate is a device tensor computed inside the step, so the graph follows any
  schedule; ``momentum_buffer`` starts as zeros (the same numbers as torch's first-step copy:
  ``0 * m + g == g``), so the first step takes no other branch;
* autocast runs with its weight-cast cache off (a cache filled during capture would hand the
  replays stale casts), here and in the eager step alike, so both compute the same;
* BatchNorm with ``momentum=None`` (a cumulative average) reads its batch count on the host: such
  a model runs eagerly, as does anything whose capture fails (a host sync, a data-dependent
  branch): the failure is reported once, with its reason, and the step runs eagerly from then on.

The last, short batch of an epoch (CIFAR-10 at 256: 80 images) runs the same step eagerly
rather than dropping it or capturing a second graph: no sample is dropped (the epoch sees what
the eager trainer and the paper see), a second graph would hold a second set of activations in
its own memory pool (peak memory), and one eager step per epoch costs a few launches' worth of
host time. The eager step writes the same parameters, buffers, counter and accumulators.

Eager on purpose (said once, with the reason): CPU (``lopfast.graphs`` emulates the capture there
only for tests: ``EMULATE``), ``capture="off"``, DDP (a captured all-reduce needs NCCL's graph
support and DDP's own warm-up, not made safe here), ``compile=True`` and ``capture="compile"``
(torch.compile's CUDA graphs, ``mode="reduce-overhead"``, around the model: the switch between
the by-hand capture and torch.compile's; which is faster is left to the GPU benchmark).

``amp="auto"`` is decided by measurement (``choose_amp``): on CUDA the step's forward and backward
is timed once in bf16 autocast and in fp32 (TF32 as the user's precision setting says), as it
will run (replays of a captured graph when the step is captured), for the model and batch at hand,
through the measured dispatch's machinery (``lopfast.dispatch.choose``, op "amp": cached in memory
and in the dispatch's cache file, per GPU, versions and model); the choice is printed. On CPU
"auto" is off; under DDP it is bf16, unmeasured (ranks timing apart could disagree).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lopfast import dispatch, graphs
from lopfast.graphs import Graph
from lopfast.ops._precision import fp32_matmul_precision
from lopfast.pipeline.schedule import lr_factors

__all__ = ["CAPTURE", "EMULATE", "OPTIMIZERS", "WARMUP", "TrainStep", "autocast", "build_optimizer",
           "capture_failure"]

CAPTURE = ("auto", "compile", "off")
WARMUP = 2  # eager steps before the capture
# tests: treat the CPU as a device that captures, through lopfast.graphs' CPU stand-in
EMULATE = False


def autocast(device: torch.device, amp: str):
    """The autocast context of a step in precision ``amp``: "bf16" (bf16 autocast, its weight
    cache off: see the module docstring), "off"; "auto" (unresolved) is bf16 on CUDA."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if use:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------- the optimizer
#: the optimizers a stage can be configured with (``TrainConfig.optimizer``, ``--optimizer``)
OPTIMIZERS = ("sgd", "adamw")
_ADAM = (torch.optim.Adam, torch.optim.AdamW)


def build_optimizer(param_groups, cfg, device) -> torch.optim.Optimizer:
    """The optimizer of a stage, from ``cfg`` (a ``TrainConfig``): ``cfg.optimizer`` is "sgd"
    (momentum ``cfg.momentum``, Nesterov ``cfg.nesterov``; ``cfg.weight_decay`` is added to the
    gradient, L2) or "adamw" (torch's AdamW with its default betas (0.9, 0.999) and eps 1e-8;
    ``cfg.weight_decay`` is decoupled, each step multiplies the weights by 1 - lr * weight_decay;
    ``momentum`` and ``nesterov`` do not apply). AdamW is built ``capturable`` on CUDA, so the
    step can be captured as one CUDA graph. A group's own ``weight_decay`` / ``lr`` win."""
    name = getattr(cfg, "optimizer", "sgd")
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 capturable=torch.device(device).type == "cuda")
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")


def _optimizer_kind(optimizer) -> str:
    """"sgd" (updated by the step itself) or "adam" (torch's Adam / AdamW step); others refused."""
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) in _ADAM:
        return "adam"
    raise TypeError(f"TrainStep runs torch.optim.SGD, Adam or AdamW (it sets their lr from the schedule on the "
                    f"device), got {type(optimizer).__module__}.{type(optimizer).__qualname__}; build one of those "
                    "(lopfast.pipeline.step.build_optimizer), or use your own loop: lopfast.SPDistiller runs in any")


def _sgd_groups(optimizer: torch.optim.SGD) -> List[dict]:
    """The parameters and their momentum buffers, per SGD group, fixed for the whole run."""
    groups: List[dict] = []
    for g in optimizer.param_groups:
        if g.get("dampening", 0) or g.get("maximize", False):
            raise ValueError("TrainStep runs SGD without dampening or maximize")
        params = [p for p in g["params"] if p.requires_grad]
        bufs = []
        if g["momentum"]:
            for p in params:
                st = optimizer.state[p]
                if st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
        groups.append(dict(params=params, bufs=bufs, wd=float(g["weight_decay"]),
                           momentum=float(g["momentum"]), nesterov=bool(g.get("nesterov", False))))
    return groups


def _adam_eager_reason(optimizer) -> Optional[str]:
    """Why torch's Adam / AdamW step cannot be captured (None: it can)."""
    if all(g.get("capturable") for g in optimizer.param_groups):
        return None
    return (f"{type(optimizer).__name__}(capturable=False): torch's Adam keeps its step count on the host "
            "unless it is capturable (CUDA only; build_optimizer does that on CUDA)")


def capture_failure(exc: BaseException) -> str:
    """What made a capture fail, first cause first. CUDA reports a failed capture at its end
    ("operation failed due to a previous error during capture"); the error that broke it (a host
    sync such as ``.item()``, an allocation a capture forbids) is that exception's context."""
    chain, seen = [exc], {id(exc)}
    while True:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or id(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(id(nxt))

    def line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:200] if text else ''}"

    first = chain[-1]
    return line(first) + ("" if first is exc else f"; reported at the capture's end as {line(exc)}")


def _eager_reasons(model: nn.Module, cfg, device: torch.device, world: int) -> Optional[str]:
    """Why the step cannot be captured (None: it can be tried)."""
    if cfg.capture == "off":
        return "capture='off'"
    if cfg.capture == "compile":
        return "capture='compile': torch.compile's CUDA graphs (mode='reduce-overhead') around the model"
    if device.type != "cuda" and not EMULATE:
        return f"the device is {device.type} (CUDA graphs need a GPU)"
    if world > 1:
        return f"DDP over {world} processes (a captured all-reduce is not made safe here)"
    if getattr(cfg, "compile", False):
        return "compile=True (torch.compile's code is not captured by hand; capture='compile' uses its CUDA graphs)"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
            return f"{name or 'the model'} is a BatchNorm with momentum=None (it reads its batch count on the host)"
    return None


class TrainStep:
    """One training step of ``model`` (see the module docstring): ``step(x, y, global_batch)``.

    Args:
        model: the trained network (its parameters are updated).
        optimizer: a ``torch.optim.SGD`` holding the param groups (lr, momentum, weight decay,
            nesterov) and the momentum buffers; the step updates them itself with the lr read
            on the device, so its ``state_dict`` keeps torch's format for checkpoints. Or a
            ``torch.optim.Adam`` / ``AdamW``, stepped by torch with the scheduled lr (a device
            tensor when it is ``capturable``, captured then; a host float otherwise, and the
            step runs eagerly, saying why once); its base lr is kept in each group's
            ``initial_lr`` (as torch's schedulers do). Any other optimizer is refused by name.
        cfg: the stage's ``TrainConfig`` (epochs, lr schedule, gamma, label smoothing, clip,
            capture, amp).
        device: the training device.
        steps_per_epoch: optimizer steps per epoch (the lr table's stride).
        forward: what computes the logits from x (default ``model``; the DDP wrapper, or a
            callable that also runs a teacher).
        distiller: an ``SPDistiller`` (its call returns ``(logits, sp)``); None: no SP loss.
        world: number of DDP processes (losses scaled so DDP's average is the global gradient).
        start_step: the optimizer step to continue from (resume).
        log: one line per notice (the capture decision, the amp choice).
        desc: the stage's name in those lines.
        after_update: functions called inside the step right after the optimizer update (device
            work only: they are captured with the step).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg, device, *, steps_per_epoch: int,
                 forward: Optional[Callable] = None, distiller=None, world: int = 1, start_step: int = 0,
                 log: Optional[Callable[[str], None]] = None, desc: str = "train",
                 after_update: Sequence[Callable[[], None]] = ()) -> None:
        self.model, self.opt, self.cfg = model, optimizer, cfg
        self.after_update = list(after_update)
        self.device = torch.device(device)
        self.forward = model if forward is None else forward
        self.distiller, self.world = distiller, world
        self.log = log or (lambda s: None)
        self.desc = desc
        self.amp = cfg.amp if cfg.amp != "auto" or self.device.type == "cuda" else "off"
        self.kind = _optimizer_kind(optimizer)
        opt_eager = None
        if self.kind == "sgd":
            self.groups = _sgd_groups(optimizer)
            self._update = self._sgd
        else:
            self.groups = [dict(params=[p for p in g["params"] if p.requires_grad]) for g in optimizer.param_groups]
            for g in optimizer.param_groups:  # the base lr survives the step's writes to "lr" (and a resume)
                g.setdefault("initial_lr", float(g["lr"]))
            opt_eager = _adam_eager_reason(optimizer)
            self._update = self._adam
        self.params = [p for g in self.groups for p in g["params"]]
        dev = self.device
        self.factors = lr_factors(cfg, steps_per_epoch)  # float64, host: logging and the bounds check
        self.lr_table = self.factors.to(dev, torch.float32)
        base = [float(g["lr"] if self.kind == "sgd" else g["initial_lr"]) for g in optimizer.param_groups]
        self.base_lr = torch.tensor(base, dtype=torch.float32, device=dev)
        self.base_lr_host = base
        self._lr_dev: Optional[List[torch.Tensor]] = None
        if self.kind == "adam" and opt_eager is None:
            # torch's capturable Adam reads a tensor lr: one per group, rewritten in place every step
            self._lr_dev = [torch.zeros(1, dtype=torch.float32, device=dev) for _ in optimizer.param_groups]
            for g, t in zip(optimizer.param_groups, self._lr_dev):
                g["lr"] = t
        self.step_t = torch.full((1,), start_step, dtype=torch.int64, device=dev)
        self.steps = start_step  # the same count on the host (no read-back)
        self.sums = torch.zeros(3, dtype=torch.float64, device=dev)  # CE, SP, batches
        # capture state
        self.why_eager = _eager_reasons(model, cfg, dev, world) or opt_eager
        self.graph: Optional[Graph] = None
        self.signature = None  # (x shape, stride, dtype; y shape, dtype; global batch) of the graph
        self.static_x: Optional[torch.Tensor] = None
        self.static_y: Optional[torch.Tensor] = None
        self.warm = 0
        self.eager_steps = 0
        self.replays = 0
        self._stream = torch.cuda.Stream(dev) if dev.type == "cuda" and self.why_eager is None else None
        self._said = False

    # ------------------------------------------------------------------ the step
    @property
    def captures(self) -> bool:
        """Whether this step is (or will be, after its warm-up) captured as a CUDA graph."""
        return self.why_eager is None

    def _loss(self, x: torch.Tensor, y: torch.Tensor, gbs: int, amp: str):
        """Forward and loss: (total for backward, CE share, SP share or None)."""
        cfg = self.cfg
        with autocast(self.device, amp):
            if self.distiller is not None:
                logits, sp = self.distiller(x)
            else:
                logits, sp = self.forward(x), None
        # a per-rank share of the global-batch mean, so DDP's summed gradients are the global ones
        loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=cfg.label_smoothing) / gbs
        if sp is None:
            return loss, loss, None
        frac = len(y) / gbs
        sp = sp.float() * frac
        return loss + cfg.gamma * sp, loss, sp

    def _body(self, x: torch.Tensor, y: torch.Tensor, gbs: int) -> None:
        """The whole step on (x, y): what is captured, and what the eager step runs."""
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            total, loss, sp = self._loss(x, y, gbs, self.amp)
            # DDP averages gradients over ranks; each rank's share is already local/global
            (total * self.world if self.world > 1 else total).backward()
        with torch.no_grad():
            if self.cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
            self._update()
            for fn in self.after_update:
                fn()
            self.sums[0] += loss.detach()
            if sp is not None:
                self.sums[1] += sp.detach()
            self.sums[2] += 1

    def _sgd(self) -> None:
        """SGD (momentum, Nesterov, weight decay) as torch's foreach SGD computes it, with the lr a
        device tensor: base lr x the schedule's factor at the device step counter."""
        lrs = self.base_lr * self.lr_table.index_select(0, self.step_t)
        for g, grp in enumerate(self.groups):
            live = [(p, b) for p, b in zip(grp["params"], grp["bufs"] or [None] * len(grp["params"]))
                    if p.grad is not None]
            if not live:
                continue
            params = [p for p, _ in live]
            d = [p.grad for p in params]
            if grp["wd"]:
                d = torch._foreach_add(d, params, alpha=grp["wd"])
            if grp["momentum"]:
                bufs = [b for _, b in live]
                torch._foreach_mul_(bufs, grp["momentum"])
                torch._foreach_add_(bufs, d)
                d = torch._foreach_add(d, bufs, alpha=grp["momentum"]) if grp["nesterov"] else bufs
            torch._foreach_add_(params, torch._foreach_mul(d, -lrs[g]))
        self.step_t += 1

    def _adam(self) -> None:
        """torch's Adam / AdamW step at the scheduled lr: written into the device tensors it reads
        when capturable, else set as host floats from the host table (the step is eager then)."""
        if self._lr_dev is not None:
            lrs = self.base_lr * self.lr_table.index_select(0, self.step_t)
            for g, t in enumerate(self._lr_dev):
                t.copy_(lrs[g:g + 1])
        else:
            factor = float(self.factors[self.steps - 1])  # this step's index: __call__ counted it already
            for g, grp in enumerate(self.opt.param_groups):
                grp["lr"] = self.base_lr_host[g] * factor
        self.opt.step()
        self.step_t += 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gbs: int) -> None:
        """One optimizer step on the batch (x, y) whose global size is ``gbs``."""
        if self.steps >= len(self.factors):
            raise RuntimeError(f"[{self.desc}] step {self.steps + 1} is past the schedule's {len(self.factors)} steps "
                               f"({self.cfg.epochs} epochs of {len(self.factors) // self.cfg.epochs})")
        if not self._said:
            self._say()
        self.steps += 1
        # a step that is captured makes (and reuses) the dispatch's choices for work inside a graph;
        # its eager steps (warm-up, the short batch) run the same choices and the same kernels
        # (graphs.planned: no eager-only launch path, so the capture compiles and loads nothing)
        captures = self.why_eager is None
        with dispatch.graph_timing(captures), (graphs.planned() if captures else contextlib.nullcontext()):
            if self.why_eager is None:
                sig = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype, int(gbs))
                if self.signature is None:
                    self.signature = sig
                if sig == self.signature:
                    self._graphed(x, y, gbs)
                    return
            self._body(x, y, gbs)  # eager: no capture here, or a batch of another shape (the short last one)
            self.eager_steps += 1

    def _graphed(self, x: torch.Tensor, y: torch.Tensor, gbs: int) -> None:
        if self.static_x is None:
            self.static_x, self.static_y = torch.empty_like(x), torch.empty_like(y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.graph is None:
            if self.warm < WARMUP:
                self._side(lambda: self._body(self.static_x, self.static_y, gbs))
                self.warm += 1
                self.eager_steps += 1
                return
            graph = Graph(emulate=self.device.type != "cuda", stream=self._stream)
            try:
                graph.capture(lambda: self._body(self.static_x, self.static_y, gbs), outputs=False)
            except Exception as exc:  # a host sync or a data-dependent branch: eager from now on
                self.why_eager = f"its capture failed ({capture_failure(exc)})"
                self.log(f"[{self.desc}] step: eager from now on: {self.why_eager}")
                self._body(x, y, gbs)
                self.eager_steps += 1
                return
            self.graph = graph
        self.graph.replay()
        self.replays += 1

    def _side(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the capture's side stream (CUDA), ordered after and before the current one."""
        if self._stream is None:
            fn()
            return
        cur = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(cur)
        with torch.cuda.stream(self._stream):
            fn()
        cur.wait_stream(self._stream)

    def _say(self) -> None:
        self._said = True
        if self.why_eager is None:
            self.log(f"[{self.desc}] step: captured as one CUDA graph after {WARMUP} eager warm-up steps "
                     f"(a batch of another shape, the last short one, runs eagerly); amp {self.amp}")
        else:
            self.log(f"[{self.desc}] step: eager ({self.why_eager}); amp {self.amp}")

    # ------------------------------------------------------------------ epochs
    def begin_epoch(self) -> None:
        """Zero the device accumulators."""
        self.sums.zero_()

    def end_epoch(self) -> Dict[str, Any]:
        """Reduce the epoch's accumulators over DDP ranks and read them, with the finiteness of
        the loss and of every weight and buffer, in one read-back: ``{"loss", "sp", "batches",
        "finite", "nonfinite"}`` (loss and sp: means per batch; ``nonfinite``: None, or what went
        NaN / inf — "the training loss" or the names of the first few parameters / buffers).

        The weights count as well as the loss: a loss can stay finite while an update makes the
        weights NaN in the epoch's last step, or while a BatchNorm running variance overflows to
        inf (seen: --pretrain-lr 1e4 on digits, a finite 5e23 loss, inf running_var).
        """
        sums = self.sums
        if self.world > 1:
            dist.all_reduce(sums[:2])
            for b in self.model.buffers():  # BatchNorm statistics: rank 0's, once per epoch
                dist.broadcast(b, 0)
        named = [(n, t) for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                 if t.is_floating_point()]
        # norms in float64: a large but finite weight must not overflow into a false alarm
        norms = (torch.stack(torch._foreach_norm([t.detach() for _, t in named], 2, dtype=torch.float64))
                 if named else sums[:0])
        flags = torch.cat([torch.isfinite(sums[:2]).all().view(1), torch.isfinite(norms)]).to(torch.float64)
        host = torch.cat([sums, flags]).tolist()  # the one read-back of the epoch
        loss, sp, nb = host[:3]
        ok = host[3:]
        bad = (["the training loss"] if not ok[0] else []) + [n for (n, _), good in zip(named, ok[1:]) if not good]
        nb = max(nb, 1.0)
        nonfinite = None if not bad else (bad[0] if bad[0] == "the training loss"
                                          else ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
        return {"loss": loss / nb, "sp": sp / nb, "batches": nb, "finite": not bad, "nonfinite": nonfinite}

    def lr(self) -> float:
        """The first group's lr of the last step taken (host arithmetic: no read-back)."""
        return self.base_lr_host[0] * float(self.factors[max(self.steps - 1, 0)])

    # ------------------------------------------------------------------ amp by measurement
    def choose_amp(self, x: torch.Tensor, y: torch.Tensor, gbs: int) -> str:
        """Resolve ``amp="auto"``: "bf16" or "off", whichever runs this step faster here (CUDA;
        "off" elsewhere), measured once per model, batch and precision setting and cached like the
        dispatch's choices; sets ``self.amp``, logs the choice and returns it."""
        if self.cfg.amp != "auto":
            return self.amp
        if not dispatch.tunable(self.device):
            self.amp = "off"
            return self.amp
        if self.world > 1:
            # timing on every rank could pick different precisions, and DDP's forward and backward
            # are collectives that ranks must run the same number of times: not measured
            self.amp = "bf16"
            self.log(f"[{self.desc}] amp=auto: bf16 autocast (not measured under DDP)")
            return self.amp
        key = (self._model_key(), tuple(x.shape), str(x.dtype), x.stride(), "graph" if self.captures else "eager",
               fp32_matmul_precision())
        bufs = [b for b in self.model.buffers()]
        saved = [b.detach().clone() for b in bufs]

        def candidate(amp: str):
            def fn():
                for p in self.params:
                    p.grad = None
                with torch.enable_grad():
                    total, _, _ = self._loss(x, y, gbs, amp)
                    total.backward()
                return []
            return fn

        devices = [self.device] if self.device.type == "cuda" else []
        cands = {"off": candidate("off"), "bf16": candidate("bf16")}
        with torch.random.fork_rng(devices=devices):
            try:
                try:
                    with dispatch.graph_timing(self.captures):
                        choice = dispatch.choose("amp", key, self.device, cands, reference="off", static="bf16")
                except Exception:
                    if not self.captures:
                        raise
                    # a step that cannot be captured (its capture will fail and say why): its eager time
                    key = key[:4] + ("eager",) + key[5:]
                    choice = dispatch.choose("amp", key, self.device, cands, reference="off", static="bf16")
            finally:
                with torch.no_grad():
                    for b, s in zip(bufs, saved):
                        b.copy_(s)  # the timing runs moved BatchNorm statistics: put them back
                for p in self.params:
                    p.grad = None
            times = next((d.get("times_ms") for d in dispatch.decisions()
                          if d["op"].startswith("amp") and d["key"] == repr(key)), None)
        self.amp = choice
        how = ", ".join(f"{'fp32' if k == 'off' else k} {v:.2f} ms" for k, v in (times or {}).items())
        self.log(f"[{self.desc}] amp=auto: {'bf16 autocast' if choice == 'bf16' else 'fp32'}"
                 f"{' (measured: ' + how + ')' if how else ''}")
        return choice

    def _model_key(self) -> str:
        parts = [type(m).__name__ for m in self.model.modules()]
        parts += [f"{n}:{tuple(p.shape)}" for n, p in self.model.named_parameters()]
        if self.distiller is not None:
            parts += ["teacher"] + [f"{tuple(p.shape)}" for p in self.distiller.teacher.parameters()]
            parts += list(self.distiller.layers)
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
