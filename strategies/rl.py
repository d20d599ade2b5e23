"""A reinforcement-learning rank controller: the AMC design trained by REINFORCE.

The environment is that of AMC (He, Lin, Liu, Wang, Li & Han, "AMC: AutoML for model
compression and acceleration on mobile devices", ECCV 2018): an episode walks the sites in
model order; the state of a site is its index, kind, channels, stride, kernel, its dense cost,
the cost spent so far on the reduced sites and the dense cost left in the later ones (all
scaled to [0, 1]) and the previous action; the action is the kept fraction of the top of
the site's grid (its maximum rank, unless the grid stops short of it where it would cost as
much as the dense layer) in [``a_min``, 1], mapped to the nearest grid rank; under a cost
constraint each action is clamped so the budget stays reachable (AMC's action wall); the
reward comes at the end of the episode from the evaluated accuracy.

The agent is REINFORCE with a recurrent policy and a moving-average baseline (Zoph & Le,
"Neural architecture search with reinforcement learning", ICLR 2017) instead of AMC's DDPG: a
GRU cell reads the states in turn, a linear head gives the mean of a Gaussian on the logit of
the action, with a learned standard deviation. REINFORCE has fewer moving parts (no critic,
no replay buffer, no target networks) and suits the few hundred episodes a search affords.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ranksearch import options
from ranksearch.config import Choice, Config
from ranksearch.errors import RankSearchError
from ranksearch.refine import Refiner
from ranksearch.result import Result
from ranksearch.space import method_for, nearest_rank
from ranksearch.strategy import SearchContext, Strategy

FEATURES = 10
LOG_STD = (math.log(0.05), math.log(3.0))  # bounds of the policy's log standard deviation


class Policy(nn.Module):
    """A GRU cell over the site states; per site, the mean of the action's logit."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cell = nn.GRUCell(FEATURES, hidden)
        self.head = nn.Linear(hidden, 1)
        self.log_std = nn.Parameter(torch.zeros(()))

    def forward(self, states: Tensor) -> Tensor:
        """Means for a batch of episodes: states (E, L, FEATURES) → (E, L)."""
        h = states.new_zeros(states.shape[0], self.cell.hidden_size)
        means = []
        for t in range(states.shape[1]):
            h = self.cell(states[:, t], h)
            means.append(self.head(h)[:, 0])
        return torch.stack(means, 1)

    def step(self, state: Tensor, h: Tensor) -> tuple[float, Tensor]:
        """One site: the mean for ``state`` and the next hidden state."""
        h = self.cell(state[None], h)
        return float(self.head(h)[0, 0]), h

    def std(self) -> Tensor:
        return self.log_std.clamp(*LOG_STD).exp()


@dataclass(frozen=True)
class Episode:
    """One walk over the sites: the config it built, the states seen, the sampled logits
    (None for a warm-up episode of random actions)."""

    config: Config
    states: np.ndarray
    logits: np.ndarray | None


class RL(Strategy):
    """AMC's layer-by-layer controller (He et al. 2018) trained by REINFORCE (Zoph & Le 2017).

    Reward: the accuracy when the search has a cost constraint (every episode then meets it
    by construction), else accuracy − ``cost_weight`` · log(cost ratio), the cost being the
    search's first cost objective (flops by default). A failed result scores the worst reward
    seen so far (0 before any). The first ``warmup`` episodes take uniform random actions and
    only set the baseline, an exponential moving average of the rewards (decay
    ``baseline_decay``); every later batch of ``batch`` episodes makes one Adam step (``lr``)
    on the policy (a GRU of ``hidden`` units). ``method``: the factorization of every site
    (default each site's first); ``a_min``: the smallest kept fraction.

    All randomness comes from the search's seeded generator, and the policy changes only in
    `tell`, from the rewards of its own episodes. So a re-run with the same seed asks the same
    configs, is told the same (stored) results in the same order and rebuilds exactly the same
    policy and baseline: a resumed search goes on learning where it stopped (bit for bit on the
    same machine and thread count). A batch of episodes with nothing new to evaluate (a
    policy that has converged) gets one new config from `ranksearch.refine.Refiner` added.
    """

    name = "rl"
    description = "AMC's layer-by-layer RL controller, trained by REINFORCE with a GRU policy"

    def __init__(
        self,
        warmup: int = 8,
        batch: int = 1,
        lr: float = 0.01,
        hidden: int = 32,
        a_min: float = 0.05,
        cost_weight: float = 0.1,
        baseline_decay: float = 0.9,
        method: str | None = None,
    ) -> None:
        who = self.name
        self.warmup = options.integer(warmup, "warmup", who, 0)
        self.batch = options.positive_int(batch, "batch", who)
        self.lr = options.positive(lr, "lr", who)
        self.hidden = options.positive_int(hidden, "hidden", who)
        self.a_min = options.number_in(a_min, "a_min", who, 0.0, 1.0, open_high=True)
        self.cost_weight = options.number_in(cost_weight, "cost_weight", who, 0.0)
        self.decay = options.number_in(baseline_decay, "baseline_decay", who, 0.0, 1.0,
                                       open_high=True)
        self.method = options.method_name(method, "method", who)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, ctx: SearchContext) -> None:
        super().setup(ctx)
        space = ctx.space
        self.sites = [s for s in space.decomposable if method_for(s, self.method) is not None]
        if not self.sites:
            raise RankSearchError(f"no site of the space admits {self.method!r}")
        methods = [method_for(s, self.method) or "" for s in self.sites]
        self.grids = [
            [Choice(m, r) for r in space.ranks(s.name, m)]
            for s, m in zip(self.sites, methods, strict=True)
        ]
        # actions are fractions of the top of each grid, so that all of [a_min, 1] maps onto
        # the grid even where it stops short of the maximum rank (where a rank would cost as
        # much as the dense layer)
        self.tops = [np.atleast_1d(grid[-1].rank).astype(float) for grid in self.grids]
        self.metric = ctx.cost_metric
        self.constrained = bool(ctx.cost_constraints())
        self._cost: dict[tuple[str, Choice], float] = {}
        self._static = self._static_features()
        self._dense = [self.site_cost(s.name, Choice("dense")) for s in self.sites]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.rng.integers(2**31)))
            self.policy = Policy(self.hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.baseline: float | None = None
        self.rewards: list[float] = []
        self.episodes = 0
        self._pending: list[Episode] = []
        self.refiner = Refiner(ctx)

    def _static_features(self) -> np.ndarray:
        """Index, kind, in/out channels, stride, kernel and dense cost of each site, in [0, 1]."""
        raw = np.array(
            [
                [
                    i,
                    s.kind == "linear",
                    s.in_features,
                    s.out_features,
                    max(s.stride),
                    math.prod(s.kernel_size),
                    self.site_cost(s.name, Choice("dense")),
                ]
                for i, s in enumerate(self.sites)
            ],
            dtype=float,
        )
        return raw / np.maximum(raw.max(0), 1e-12)

    def site_cost(self, name: str, choice: Choice) -> float:
        """The cost of one site under ``choice`` in the strategy's cost metric."""
        key = (name, choice)
        if key not in self._cost:
            self._cost[key] = self.ctx.costs.site_cost(name, choice, self.metric)
        return self._cost[key]

    # -- ask ------------------------------------------------------------------------------------
    def ask(self) -> list[Config]:
        if self._pending:
            return []  # waiting for the results of the last batch
        self._pending = [self._episode() for _ in range(self.batch)]
        return self.refiner.ensure_new([e.config for e in self._pending])

    def _episode(self) -> Episode:
        warm = self.episodes < self.warmup
        self.episodes += 1
        total = sum(self._dense)
        chosen: dict[str, Choice] = {}
        states, logits = [], []
        spent, prev = 0.0, 1.0
        h = torch.zeros(1, self.hidden)
        for t, site in enumerate(self.sites):
            left = sum(self._dense[t + 1 :])
            state = np.concatenate([self._static[t], [min(spent / total, 1), left / total, prev]])
            states.append(state)
            if warm:
                action = self.a_min + (1 - self.a_min) * self.ctx.rng.random()
            else:
                with torch.no_grad():
                    mean, h = self.policy.step(torch.as_tensor(state, dtype=torch.float32), h)
                    z = mean + float(self.policy.std()) * self.ctx.rng.standard_normal()
                logits.append(z)
                action = self.a_min + (1 - self.a_min) / (1 + math.exp(-z))
            index = min(self._nearest(t, action), self._wall(t, chosen))
            choice = self.grids[t][index]
            chosen[site.name] = choice
            spent += self.site_cost(site.name, choice)
            prev = float(np.mean(np.atleast_1d(choice.rank) / self.tops[t]))
        return Episode(
            Config(chosen),
            np.array(states, dtype=np.float32),
            None if warm else np.array(logits, dtype=np.float32),
        )

    def _nearest(self, t: int, action: float) -> int:
        """The grid index whose rank is nearest ``action`` times the top of the site's grid."""
        return nearest_rank([c.rank for c in self.grids[t]], action * self.tops[t])

    def _wall(self, t: int, chosen: dict[str, Choice]) -> int:
        """AMC's action wall: the largest grid index at site ``t`` that, with the earlier
        sites as chosen and the later ones at their smallest ranks, meets every cost
        constraint (0 when none does)."""
        grid = self.grids[t]
        if not self.constrained:
            return len(grid) - 1
        rest = {s.name: g[0] for s, g in zip(self.sites[t + 1 :], self.grids[t + 1 :], strict=True)}

        def fits(i: int) -> bool:
            return self.ctx.feasible(Config({**chosen, self.sites[t].name: grid[i], **rest}))

        lo, hi = 0, len(grid) - 1
        if fits(hi):
            return hi
        while lo < hi - 1:  # invariant: hi does not fit; lo fits or is 0
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # -- tell -----------------------------------------------------------------------------------
    def tell(self, results: Sequence[Result]) -> None:
        """Reward the pending episodes (those the search gave no result for, being past the
        budget, are dropped) and make one policy step on the learned ones."""
        by_key = {r.config.key: r for r in results}
        told = [(e, by_key[e.config.key]) for e in self._pending if e.config.key in by_key]
        self._pending = []
        scores = [self.reward(r) for _, r in told]
        worst = min([*self.rewards, *(s for s in scores if s is not None)], default=0.0)
        rewards = [worst if s is None else s for s in scores]
        learned = [(e, r) for (e, _), r in zip(told, rewards, strict=True) if e.logits is not None]
        if learned and self.baseline is not None:
            self._learn([e for e, _ in learned], [r - self.baseline for _, r in learned])
        for r in rewards:
            self.baseline = (
                r if self.baseline is None else self.decay * self.baseline + (1 - self.decay) * r
            )
        self.rewards.extend(rewards)

    def reward(self, result: Result) -> float | None:
        """The reward of a result (None for a failed one)."""
        # the quality objective, higher is better: accuracy, or −loss, −mse, ...
        accuracy = -self.ctx.quality.cost(result.metrics)
        if result.status == "failed" or not math.isfinite(accuracy):
            return None
        if self.constrained or not self.cost_weight:
            return float(accuracy)
        ratio = self.ctx.costs.ratio(self.metric, result.config)
        return float(accuracy) - self.cost_weight * math.log(ratio)

    def _learn(self, episodes: Sequence[Episode], advantages: Sequence[float]) -> None:
        """One REINFORCE step: ascend mean(advantage · Σ log π(logit | state))."""
        states = torch.as_tensor(np.stack([e.states for e in episodes]))
        logits = torch.as_tensor(np.stack([e.logits for e in episodes]))
        means = self.policy(states)
        std = self.policy.std()
        log_prob = (-0.5 * ((logits - means) / std) ** 2 - std.log()).sum(1)
        loss = -(torch.as_tensor(advantages, dtype=torch.float32) * log_prob).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
