"""AMC (He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices",
ECCV 2018): a DDPG agent walks the prunable channel groups and picks each one's ratio."""
from __future__ import annotations

import copy
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from lopfast.prune.engine import TOLERANCE


# ---------------------------------------------------------------------------- DDPG
class _Actor(nn.Module):
    def __init__(self, n_state: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_state, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, s):
        return self.net(s)


class _Critic(nn.Module):
    def __init__(self, n_state: int, hidden: int) -> None:
        super().__init__()
        self.fs, self.fa = nn.Linear(n_state, hidden), nn.Linear(1, hidden)
        self.net = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, s, a):
        return self.net(self.fs(s) + self.fa(a))


class DDPG:
    """The AMC agent: actor/critic with target networks (soft updates), a replay buffer and
    truncated-normal exploration whose width decays each episode (paper Sec. 3.2 / code)."""

    def __init__(self, n_state: int, *, hidden: int, lr_actor: float, lr_critic: float, tau: float,
                 discount: float, batch_size: int, buffer: int, generator: torch.Generator) -> None:
        self.actor, self.critic = _Actor(n_state, hidden), _Critic(n_state, hidden)
        self.actor_t, self.critic_t = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.opt_a = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.tau, self.discount, self.batch_size, self.capacity = tau, discount, batch_size, buffer
        self.memory: List[tuple] = []
        self.gen = generator

    @torch.no_grad()
    def act(self, state: torch.Tensor, sigma: float, lo: float, hi: float) -> float:
        """The policy's action for ``state`` with truncated-normal exploration ``sigma`` on [lo, hi]."""
        mu = float(self.actor(state[None])[0, 0])
        # truncated normal on [lo, hi] around the policy's action, by rejection
        for _ in range(100):
            a = mu + sigma * float(torch.randn(1, generator=self.gen))
            if lo <= a <= hi:
                return a
        return min(max(mu, lo), hi)

    def remember(self, s, a, r, s2, done) -> None:
        """Store one transition in the replay buffer (oldest dropped beyond ``capacity``)."""
        self.memory.append((s, a, r, s2, done))
        if len(self.memory) > self.capacity:
            self.memory.pop(0)

    def update(self) -> None:
        """One critic and actor step on a replay minibatch, then the soft target update."""
        if len(self.memory) < self.batch_size:
            return
        idx = torch.randint(len(self.memory), (self.batch_size,), generator=self.gen).tolist()
        s, a, r, s2, d = (torch.stack([torch.as_tensor(self.memory[i][j], dtype=torch.float32) for i in idx])
                          for j in range(5))
        a, r, d = a.reshape(-1, 1), r.reshape(-1, 1), d.reshape(-1, 1)
        with torch.no_grad():
            q_next = self.critic_t(s2, self.actor_t(s2))
            target = r + self.discount * (1 - d) * q_next
        loss_c = F.mse_loss(self.critic(s, a), target)
        self.opt_c.zero_grad()
        loss_c.backward()
        self.opt_c.step()
        loss_a = -self.critic(s, self.actor(s)).mean()
        self.opt_a.zero_grad()
        loss_a.backward()
        self.opt_a.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_t), (self.critic, self.critic_t)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1 - self.tau).add_(self.tau * p)


# ---------------------------------------------------------------------------- AMC
def amc(engine, crit, ratio, target, data, o):
    """AMC allocation: a DDPG agent chooses the pruning ratio of each channel group, layer by layer.

    Resource-constrained setting of the paper: the budget is a fraction of parameters
    (``budget="params"``, the default: ``target_removed``, or what a uniform ``ratio``
    removes) or of conv/linear MACs (``budget="flops"``, the paper's FLOPs budget; the
    report's ``target_unit`` is then "macs" and ``extra["achieved"]`` is in MACs). The
    agent's action at each group is clipped ("action wall") so that the budget stays
    reachable with the later groups at ``max_ratio`` and is not overshot with them
    unpruned. Each episode's network is cut by the criterion (the preset: L1 magnitude), then,
    with ``reconstruct=True`` (the official ``prune_kernel``), every layer whose inputs were
    cut is re-fitted by least squares to the original layer's outputs, layer by layer, on
    ``positions`` points per image of the first ``recon_batches`` batches of ``data``. The
    reward R_err = -error is measured on the last ``val_batches`` batches of ``data``, a split
    held out from the reconstruction batches (the official code holds out 5,000 training
    images; pass a ``data`` whose last batches are such a split). State per group (paper
    Eq. 1, min-max normalised): index, n channels, c input channels, h, w, stride, k, cost
    of the layer, cost reduced so far, cost of the remaining layers, previous action. DDPG:
    300-300 actor/critic, target networks with tau=0.01, replay buffer, discount 1,
    ``warmup`` episodes of uniform random actions, then truncated-normal exploration with
    sigma 0.5 decayed by 0.95 per episode; each transition gets the episode reward minus a
    moving-average baseline. The returned network is the best-rewarded episode among those
    whose removed fraction (in the budget's unit) is within 0.5 points of the target; if
    channel rounding kept every episode outside that band, the scored episode closest to
    the target is returned with a warning (never an unscored rescaling).

    Options (paper defaults where the paper gives them): episodes=400, warmup=100,
    max_ratio=0.8, min_ratio=0.0, budget="params", val_batches=2, reconstruct=True,
    recon_batches=2, positions=10, hidden=300, lr_actor=1e-4, lr_critic=1e-3, tau=0.01,
    batch_size=64, buffer=2000, sigma=0.5, sigma_decay=0.95, seed=0. Departures: the
    official code searches on a fine-tuned-free ImageNet/CIFAR subset with its own
    channel rounding; here rounding follows torch-pruning.

    Measured cost (one CPU thread on a shared box, target_removed=0.9, batches of 128 CIFAR
    images, reward on 2, reconstruction samples from 2): CIFAR ResNet-56: 18.9 s for 2
    warm-up episodes and 20.6 s for 6 (setup ~18 s: cost model, state table, sampling the
    layer features; then ~0.4 s per warm-up episode: one prune, the least-squares fits, the
    reward); CIFAR MobileNetV2: 10.5 s for 2 warm-up episodes (7.1 s without
    reconstruction), 0.7 GB above the model for the sampled features. Learning episodes add
    one DDPG update per group (not measured separately here); the paper's 400 episodes are
    minutes, not hours, on these models.
    """
    import warnings

    from lopfast.prune.methods.eagleeye import evaluate
    from lopfast.prune.methods.thinet import layer_features, reconstruct

    if engine.global_pruning:
        raise ValueError("allocation='amc' chooses layer-wise ratios itself; global_pruning must be False")
    episodes, warmup = o["episodes"], o["warmup"]
    if warmup > episodes:
        raise ValueError(f"option warmup must be in [0, episodes={episodes}], got {warmup!r}")
    lo_r, hi_r = float(o["min_ratio"]), float(o["max_ratio"])
    if lo_r > hi_r:
        raise ValueError(f"need min_ratio <= max_ratio, got {lo_r!r} > {hi_r!r}")
    batches = [(b[0], b[1]) for b in data]
    n_val, n_rec = o["val_batches"], (o["recon_batches"] if o["reconstruct"] else 0)
    if len(batches) < n_val + n_rec:
        raise ValueError(f"data has {len(batches)} batches; amc needs val_batches={n_val} held-out reward batches "
                         f"{'plus recon_batches=' + str(n_rec) + ' reconstruction batches ' if n_rec else ''}"
                         f"(lower them or pass more data)")
    evals = batches[len(batches) - n_val:]
    features = layer_features(engine.base, [x for x, _ in batches[:n_rec]], positions=o["positions"],
                              seed=int(o["seed"])) if n_rec else {}
    gen = torch.Generator().manual_seed(int(o["seed"]))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(int(o["seed"]))  # the agent's weight initialisation
    try:
        cm = engine.cost_model(required=True)
        agent = DDPG(11, hidden=o["hidden"], lr_actor=o["lr_actor"], lr_critic=o["lr_critic"],
                     tau=o["tau"], discount=1.0, batch_size=o["batch_size"],
                     buffer=o["buffer"], generator=gen)
    finally:
        torch.random.set_rng_state(torch_state)
    which = 0 if o["budget"] == "params" else 1
    total0 = (cm.params0, cm.macs0)[which]
    if target is None:
        ref, _ = crit.prune(engine, ratio)
        target = engine.removed_fraction(ref) if which == 0 else 1.0 - cm.cost([ratio] * len(cm.groups))[1] / cm.macs0
    n = len(cm.groups)
    if n == 0:
        raise ValueError("amc found no prunable channel group")
    if 1.0 - cm.cost([hi_r] * n)[which] / total0 < target - TOLERANCE:
        raise ValueError(f"target {target:.4f} cannot be reached with every group at max_ratio={hi_r}; "
                         "raise max_ratio")
    budget = total0 * (1.0 - target)
    mods = dict(engine.base.named_modules())

    # static part of the state embedding (paper Eq. 1), min-max normalised per feature
    static = []
    for t, g in enumerate(cm.groups):
        m = mods[g["root"]]
        L = next(L for L in cm.layers if L["name"] == g["root"])
        if isinstance(m, nn.Conv2d):
            h = w = math.sqrt(L["hw"])
            feat = [t, m.out_channels, m.in_channels, h, w, m.stride[0], m.kernel_size[0]]
        else:
            feat = [t, m.out_features, m.in_features, 1, 1, 0, 1]
        single = [0.0] * n
        single[t] = 1.0 - 1e-9  # prune the group fully: the cost the decision controls
        feat.append(total0 - cm.cost(single)[which])
        static.append(feat)
    static_t = torch.tensor(static, dtype=torch.float64)
    span = (static_t.max(0).values - static_t.min(0).values).clamp_min(1e-12)
    static_t = ((static_t - static_t.min(0).values) / span).float()

    def cost_of(ratios):
        return cm.cost(ratios)[which]

    def wall(t, prev, a):
        # the ratio must keep the budget reachable with later groups at max_ratio (lower
        # bound) and not overshoot it with later groups unpruned (upper bound)
        def total(r, rest):
            return cost_of(prev + [r] + [rest] * (n - t - 1))

        need_lo, need_hi = lo_r, hi_r
        if total(hi_r, hi_r) > budget:
            need_lo = hi_r
        elif total(lo_r, hi_r) > budget:
            a_, b_ = lo_r, hi_r
            for _ in range(30):
                mid = 0.5 * (a_ + b_)
                a_, b_ = (a_, mid) if total(mid, hi_r) <= budget else (mid, b_)
            need_lo = b_
        if total(lo_r, 0.0) < budget:
            need_hi = lo_r
        elif total(hi_r, 0.0) < budget:
            a_, b_ = lo_r, hi_r
            for _ in range(30):
                mid = 0.5 * (a_ + b_)
                a_, b_ = (mid, b_) if total(mid, 0.0) >= budget else (a_, mid)
            need_hi = a_
        need_hi = max(need_hi, need_lo)
        return min(max(a, need_lo), need_hi)

    def state(t, prev, last_a):
        reduced = total0 - cost_of(prev + [0.0] * (n - t))
        rest = total0 - cost_of([0.0] * t + [1.0 - 1e-9] * (n - t)) if t < n else 0.0
        dyn = torch.tensor([reduced / total0, rest / total0, last_a], dtype=torch.float32)
        return torch.cat([static_t[min(t, n - 1)], dyn])

    def ratio_dict(ratios):
        out = {}
        for g, r in zip(cm.groups, ratios):
            for name in g["members"] or [g["root"]]:
                out[name] = r
        return out

    baseline, best, history = None, None, []
    sigma = float(o["sigma"])
    for ep in range(episodes):
        prev, transitions, last_a = [], [], 0.0
        for t in range(n):
            s = state(t, prev, last_a)
            if ep < warmup:
                a = lo_r + (hi_r - lo_r) * float(torch.rand(1, generator=gen))
            else:
                a = lo_r + (hi_r - lo_r) * agent.act(s, sigma, 0.0, 1.0)
            a = wall(t, prev, a)
            prev.append(a)
            last_a = a
            transitions.append((s, (a - lo_r) / max(hi_r - lo_r, 1e-12)))
        model, rec = crit.prune(engine, ratio_dict(prev))
        if n_rec:
            reconstruct(engine.base, model, rec, features)
        acc, _ = evaluate(model, evals, F.cross_entropy)
        reward = -(1.0 - acc)  # R_err
        removed = engine.removed_fraction(model) if which == 0 else engine.predicted_macs_fraction(ratio_dict(prev))
        history.append({"reward": reward, "removed": removed})
        # policies inside the 0.5-point band first (channel rounding can leave one outside), then the reward
        key = (abs(removed - target) <= TOLERANCE, reward if abs(removed - target) <= TOLERANCE
               else -abs(removed - target))
        if best is None or key > best[0]:
            best = (key, list(prev), model, rec, removed, reward)
        baseline = reward if baseline is None else 0.95 * baseline + 0.05 * reward
        for t, (s, a) in enumerate(transitions):
            s2 = transitions[t + 1][0] if t + 1 < n else s
            agent.remember(s, a, reward - baseline, s2, float(t == n - 1))
            if ep >= warmup:
                agent.update()
        if ep >= warmup:
            sigma *= float(o["sigma_decay"])
    key, ratios, model, rec, achieved, reward = best
    if not key[0]:
        warnings.warn(f"amc: no episode removed {target:.4f} of the {o['budget']} within {TOLERANCE} (channel "
                      f"rounding); returning the scored episode closest to it ({achieved:.4f}); raise episodes")
    model.train(engine.base.training)
    return model, rec, ratio_dict(ratios), {"episodes": history[-20:], "best_reward": reward,
                                            "target_effective": target, "budget": o["budget"],
                                            "achieved": achieved, "reconstructed": bool(n_rec)}
