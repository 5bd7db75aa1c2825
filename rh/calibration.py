"""Calibration of every registered claim family's decision rule, by simulation at a profile's sizes.

Each family registers its calibration (:class:`rh.claim_families.Calibration`: the simulator and
the effects to plant; rh's own in :mod:`rh.catalogue`, from the simulators here). For each family,
:func:`calibrate` plants data at the boundary of each hypothesis and runs the
very decision function the claim uses (``rh.rules.claims``), measuring

- **false support**: P(supported | effect at the support boundary, e.g. no drop), must be <= α;
- **false refute**: P(refuted | effect at Δ, or for "keeps" claims at the margin), must be <= α;
- **power**: P(supported | a planted effect) and P(refuted | no effect, or twice the margin).

Sizes come from the :class:`~rh.profiles.Profile` (validation prompts per task, depth and
intervention prompts, K levels, draws), never from constants, so the rates are the ones the runs
really have. ``python -m rh calibrate`` prints the table; ``tests/test_calibration.py`` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _sps

from rh import claim_families
from rh.profiles import Profile
from rh.rules.verdict import Verdict

__all__ = ["Rates", "sizes", "calibrate", "calibrate_all", "format_table", "pair", "shapes", "BASE_ACC", "LOG_NOISE",
           "PAIRED_SHAPES", "PairedItems", "paired_shapes"]

BASE_ACC = 0.9  # planted baseline accuracy of the simulated items
_FLIP = 0.02  # background flips each way


@dataclass(frozen=True)
class Rates:
    family: str
    sizes: dict
    alpha: float
    reps: int
    false_support: float  # at the support boundary
    false_refute: float  # at the refutation boundary
    power_support: float
    power_refute: float
    planted: dict = field(default_factory=dict)

    @property
    def mc_error(self) -> float:
        """Binomial standard error of a rate near α over ``reps`` simulations."""
        return math.sqrt(self.alpha * (1 - self.alpha) / self.reps)

    def as_dict(self) -> dict:
        return {"family": self.family, "sizes": self.sizes, "alpha": self.alpha, "reps": self.reps,
                "false_support": self.false_support, "false_refute": self.false_refute,
                "power_support": self.power_support, "power_refute": self.power_refute, "planted": self.planted,
                "mc_error": round(self.mc_error, 4)}


def sizes(p: Profile) -> dict:
    """The sample sizes a run of this profile decides with (validation split = 1 - identify_frac)."""
    per_task = p.n_per_setting * len(p.depths) * len(p.lengths)
    n_val = per_task - int(round(p.identify_frac * per_task))
    return {"n_val": n_val, "levels": len(p.ablation_levels), "draws": p.random_draws,
            "tasks": len(p.id_tasks), "task": p.task_n * len(p.depths), "depths": len(p.depths), "depth_n": p.depth_n,
            "iv": p.iv_n * len(p.depths), "inverse": p.inverse_n * len(p.depths), "inverse_levels": len(p.inverse_levels),
            "incremental_levels": len(p.incremental_levels), "dose_levels": len(p.dose_levels),
            "ig_n": p.ig_n, "id_k": p.id_k, "identify": per_task - n_val,
            "distractor": p.distractor_n * len(p.depths), "compress_levels": len(p.compress_levels) or 2,
            "group_k": p.group_k or 27, "content_free": p.content_free_n, "probe": p.probe_n * len(p.depths),
            "curve_levels": len(p.curve_fractions), "sweep": min(p.sweep_n, p.depth_n) * len(p.depths)}


def pair(rng: np.random.Generator, n: int, drop: float, base_acc: float = BASE_ACC) -> tuple[np.ndarray, np.ndarray]:
    """Paired 0/1 outcomes with a planted accuracy drop (negative: a gain) and background flips."""
    base = (rng.random(n) < base_acc).astype(float)
    u = rng.random(n)
    after = base.copy()
    lose = _FLIP + max(drop, 0.0)
    gain = _FLIP + max(-drop, 0.0)
    after[(base == 1) & (u < lose / base_acc)] = 0
    after[(base == 0) & (u < gain / (1 - base_acc))] = 1
    return base, after


#: the shapes of paired 0/1 data the paired families are calibrated under (the worst case is reported):
#: "uniform" every item alike; "heterogeneous" 40% of the items never flip (always right, or always
#: wrong), the others carry every flip; "ceiling" a baseline of 0.97, so few items can be lost or
#: gained; "shared-items" each item's fragility is shared by every condition and every task of the run
#: (an item one ablation loses the others tend to lose too; CA-4's tasks share the items' haystack
#: windows, as :func:`rh.niah.build_samples` builds them). Items of one arm stay independent: each
#: prompt of a fresh set has its own haystack window.
PAIRED_SHAPES = ("uniform", "heterogeneous", "ceiling", "shared-items")
_SURE = 0.4  # "heterogeneous": the share of items that never flip
_SHARED = 0.5  # "shared-items": the correlation of an item's latent fragility between two conditions


class PairedItems:
    """The items of one simulated run of a paired family under a :data:`PAIRED_SHAPES` shape: the
    baseline (:meth:`base`) and each condition's outcomes (:meth:`after`), with the planted drop
    exact in expectation for every shape (the background flips shrink where the ceiling leaves no
    room for them)."""

    def __init__(self, rng: np.random.Generator, n: int, shape: str = "uniform"):
        if shape not in PAIRED_SHAPES:
            raise ValueError(f"paired shape {shape!r}: use one of {', '.join(PAIRED_SHAPES)}")
        self.rng, self.n, self.shape = rng, n, shape
        self.base_acc = 0.97 if shape == "ceiling" else BASE_ACC
        self.movable = rng.random(n) >= _SURE if shape == "heterogeneous" else np.ones(n, bool)
        shared = shape == "shared-items"
        self.ease = rng.normal(size=n) if shared else None  # how easy an item is, for every task
        self.fragility = rng.normal(size=n) if shared else None  # how easily any condition loses (or gains) it

    def _uniform(self, latent: np.ndarray | None) -> np.ndarray:
        """Per item a U(0, 1) draw, correlated across calls through ``latent`` ("shared-items")."""
        if latent is None:
            return self.rng.random(self.n)
        z = math.sqrt(_SHARED) * latent + math.sqrt(1 - _SHARED) * self.rng.normal(size=self.n)
        return _sps.norm.cdf(z)

    def base(self) -> np.ndarray:
        """The baseline's 0/1 outcomes (accuracy ``base_acc`` in expectation; under "shared-items"
        correlated across the groups that call it, through the item's ease, which is independent of
        its fragility, so that each condition's drop stays exact)."""
        return (self._uniform(self.ease) < self.base_acc).astype(float)

    def after(self, base: np.ndarray, drop: float) -> np.ndarray:
        """One condition's 0/1 outcomes on these items: accuracy ``drop`` below ``base`` in
        expectation (negative: a gain), plus background flips each way."""
        acc = max(float(base.mean()), 1e-9)
        share = max(float(self.movable.mean()), 1e-9)  # flips fall on the movable items only
        room = min(_FLIP, 0.9 * (1 - acc) * share, 0.9 * acc * share)  # background flips the ceiling leaves room for
        lose = (room + max(drop, 0.0)) / (acc * share)
        gain = (room + max(-drop, 0.0)) / (max(1 - acc, 1e-9) * share)
        if max(lose, gain) > 1:
            raise ValueError(f"paired shape {self.shape!r}: a change of {-drop:+g} from a baseline of {acc:.2f} needs more "
                             "items than can flip")
        u = np.where(self.movable, self._uniform(self.fragility), 2.0)
        out = base.copy()
        out[(base == 1) & (u < lose)] = 0
        out[(base == 0) & (u < gain)] = 1
        return out


def paired_shapes(make: Callable[[str], Callable]) -> dict:
    """A paired family's simulator under each of :data:`PAIRED_SHAPES`."""
    return shapes(make, PAIRED_SHAPES)


def _rate(status: str, runs: list[list[Verdict]]) -> float:
    flat = [v for vs in runs for v in vs]
    return float(np.mean([v.status == status for v in flat])) if flat else float("nan")


# ----------------------------------------------------------------------------------- simulators
# Each returns the verdicts of one simulated run with the planted effect ``effect``.


def sim_ca1(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
    from rh.causal import NecessityOutcomes
    from rh.rules.claims import necessity

    n, draws = s["n_val"], s["draws"]
    outs = []
    for k in p.ablation_levels:
        base = (rng.random(n) < BASE_ACC).astype(float)
        # items differ in how easily random ablations lose them: most never, a quarter sometimes
        item_q = np.where(rng.random(n) < 0.25, rng.uniform(0.0, 0.3, n), 0.0)
        rand = ((rng.random((draws, n)) >= item_q) & (base == 1)).astype(float)
        top = ((rng.random(n) >= item_q + effect / BASE_ACC) & (base == 1)).astype(float)
        z = np.zeros(n)
        outs.append(NecessityOutcomes(k, [], [], base, z, top, z, rand, np.zeros((draws, n)), None))
    return list(necessity(outs, alpha=p.alpha, baseline_floor=p.baseline_floor, min_gap=p.ca1_min_gap,
                          n_boot=200, seed=int(rng.integers(1 << 30))).values())


def sim_drop(groups: int, n: int, shape: str = "uniform") -> Callable:
    """CA-4 (groups: tasks) and CA-6 (groups: depths): each group's items ablated with ``effect``
    dropped; under "shared-items" the groups share the items (CA-4's tasks share haystack windows)."""
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        from rh.rules.claims import drop_family

        items = PairedItems(rng, n, shape)
        data = {}
        for g in range(groups):
            base = items.base()
            data[g] = (base, items.after(base, effect))
        return list(drop_family("CA-4", data, param="g", n_heads=1, min_drop=p.min_drop, alpha=p.alpha,
                                baseline_floor=p.baseline_floor).values())
    return run


def sim_drop_with(groups: int, n: int) -> Callable[[str], Callable]:
    return lambda shape: sim_drop(groups, n, shape)


def sim_ca3_with(shape: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        from rh.rules.claims import inverse

        items = PairedItems(rng, s["inverse"], shape)
        base = items.base()
        ablated = {k: items.after(base, effect) for k in p.inverse_levels}
        return list(inverse(base, ablated, p.inverse_levels, margin=p.ni_margin, alpha=p.alpha,
                            baseline_floor=p.baseline_floor).values())
    return run


sim_ca3 = sim_ca3_with("uniform")


def _pair_from(rng, base: np.ndarray, drop: float) -> np.ndarray:
    acc = max(base.mean(), 1e-9)
    u = rng.random(base.size)
    after = base.copy()
    after[(base == 1) & (u < (_FLIP + max(drop, 0)) / acc)] = 0
    after[(base == 0) & (u < _FLIP / max(1 - acc, 1e-9))] = 1
    return after


def sim_iv1_with(shape: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        from rh.rules.claims import incremental

        items = PairedItems(rng, s["iv"], shape)
        base = items.base()
        abl = {m: items.after(base, effect) for m in p.incremental_levels}
        return list(incremental(base, abl, ["h"] * max(p.incremental_levels), min_drop=p.iv_min_drop, alpha=p.alpha,
                                baseline_floor=p.baseline_floor).values())
    return run


def sim_iv2_with(shape: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        """``effect`` is the hub drop; the non-hub arm sits at its boundary for the false rates."""
        from rh.rules.claims import position

        items = PairedItems(rng, s["iv"], shape)
        base = items.base()
        hub = items.after(base, effect)
        other = items.after(base, 0.0 if effect != p.iv_min_drop else p.iv_nonhub_max)
        return [position(base, hub, other, hub_min=p.iv_min_drop, nonhub_max=p.iv_nonhub_max, alpha=p.alpha,
                         baseline_floor=p.baseline_floor)]
    return run


def sim_iv3_hub_with(shape: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        """``effect``: the hub pattern's drop where the baseline is :data:`BASE_ACC`; scaled to the
        shape's baseline, since the claim's margin is a share of the baseline."""
        from rh.rules.claims import override

        items = PairedItems(rng, s["iv"], shape)
        base = items.base()
        drop = effect * items.base_acc / BASE_ACC
        return [override(base, {"hub": items.after(base, drop)}, keep=p.hub_keep, min_drop=p.iv_min_drop,
                         alpha=p.alpha, baseline_floor=p.baseline_floor)["hub"]]
    return run


sim_iv1, sim_iv2, sim_iv3_hub = sim_iv1_with("uniform"), sim_iv2_with("uniform"), sim_iv3_hub_with("uniform")


def sim_ca2_with(shape: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        """Per-prompt growth of the log-prob drop from the first to the last level: ``effect`` plus
        noise of :data:`LOG_NOISE`'s ``shape`` (x 2 nats; "both-ways": slopes of either sign, half
        the prompts shrinking), so its median is ``effect``; the levels between lie on the line
        with noise. CA-1 supported at every K (the dose part alone)."""
        from rh.rules.claims import dose_response

        n, levels = s["n_val"], list(p.dose_levels)
        frac = np.linspace(0, 1, len(levels))
        if shape == "both-ways":
            growth = effect + rng.choice([-1.0, 1.0], n) * (0.5 + np.abs(rng.normal(0, 1.5, n)))
        else:
            growth = effect + 2.0 * _noise(rng, shape, n)
        person = rng.normal(2.0, 1.0, n)[:, None]
        inner = rng.normal(0, 1.5, (n, len(levels)))
        inner[:, [0, -1]] = 0.0
        drops = person + growth[:, None] * frac[None, :] + inner
        base_lp = np.full(n, -0.1)
        tops = {k: base_lp - drops[:, j] for j, k in enumerate(levels)}
        ca1 = {k: Verdict(claim="CA-1", params={"k": k}, status="supported", reason="", test="", statistic=None,
                          p_value=None, p_adjusted=None, effect=0.3, ci=None) for k in p.ablation_levels}
        return [dose_response(base_lp, tops, ca1, alpha=p.alpha, min_growth=p.dose_min_growth,
                              baseline_floor=p.baseline_floor, baseline_accuracy=BASE_ACC)]
    return run


def sim_iv7(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
    """A softmax over the answer and 20 alternatives; ablation lowers the answer logit by 1.5 for
    every item (a uniform shift: no interaction) plus ``effect`` more on the less confident half."""
    from rh.rules.claims import difficulty

    n = s["iv"]
    a = rng.normal(2.5, 1.5, n)
    others = rng.normal(0, 1, (n, 20))

    def lp(x):
        full = np.concatenate([x[:, None], others], axis=1)
        return x - np.log(np.exp(full).sum(axis=1))

    base_lp = lp(a)
    correct = (a > others.max(axis=1)).astype(float)
    hard = base_lp < np.median(base_lp[correct == 1]) if correct.any() else np.zeros(n, bool)
    shift = 1.5 + effect * hard + rng.normal(0, 0.5, n)
    return [difficulty(correct, base_lp, lp(a - shift), min_effect=p.iv7_min_effect, alpha=p.alpha,
                       baseline_floor=p.baseline_floor)]


# Log-ratio noise with median 0 in shapes a real run shows, as quantile functions of u in (0, 1): the
# claims are about the median ratio, so a rule must hold its rates whatever the skew (the signed-rank
# test did not: it tests the pseudo-median).
LOG_NOISE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "normal": lambda u: _sps.norm.ppf(u),
    "right-skewed": lambda u: -np.log1p(-u) - math.log(2.0),
    "left-skewed": lambda u: np.log(u) + math.log(2.0),
    "heavy-tailed": lambda u: _sps.t.ppf(u, 2) * 0.7,
}


def shapes(sim: Callable[[str], Callable], names=tuple(LOG_NOISE)) -> dict:
    """A family's simulator under each data shape: ``{shape: sim(shape)}``."""
    return {name: sim(name) for name in names}


def _noise(rng, shape: str, size) -> np.ndarray:
    return LOG_NOISE[shape](rng.random(size))


def sim_ratio(n_key: str, support: Callable[[Profile], float], refute: Callable[[Profile], float],
               noise: str = "normal") -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        """Log ratios around log(``effect``), the median, with :data:`LOG_NOISE`'s ``noise``."""
        from rh.rules.claims import ratio_rule

        r = np.exp(math.log(effect) + _noise(rng, noise, s[n_key]))
        return [ratio_rule("ID-2", r, support_ratio=support(p), refute_ratio=refute(p), alpha=p.alpha, test="",
                           effect_name="", describe="")]
    return run


def sim_id5_with(noise: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        """Three candidate heads; each task's prompts share a window effect across tasks (the
        dependence a uniform null ignores), and the per-prompt noise has :data:`LOG_NOISE`'s
        ``noise`` shape with median 0. ``effect``: every candidate's true median ratio (the boundary
        is the threshold)."""
        from rh.rules.claims import general_heads_rule

        n = s["task"]
        window = rng.normal(0, 1, (n, 3))  # shared by every task: the same windows and needle positions
        # each task's noise: correlated with the others through the window (a Gaussian copula), shaped
        # by a monotone map, so its median stays 0 whatever the shape
        ratios = {f"t{t}": np.exp(math.log(effect) + LOG_NOISE[noise](
            _sps.norm.cdf((window + rng.normal(0, 1, (n, 3))) / math.sqrt(2.0)))) for t in range(s["tasks"])}
        acc = {t: BASE_ACC for t in ratios}
        return [general_heads_rule(ratios, ["a", "b", "c"], ratio=p.spike_ratio, alpha=p.alpha, accuracy=acc,
                                   baseline_floor=p.baseline_floor, k=p.general_k)]
    return run


def _agree_means(rng, k: int, heads: int, effect: float, swap_at: str = "edge") -> tuple[np.ndarray, np.ndarray]:
    """Two methods' true head scores: B's top K is A's with ``effect`` heads swapped for heads ranked
    3K and below (0: the same heads; K: disjoint). ``swap_at`` "edge": the weakest of A's top K are
    the ones B lacks (the hardest to tell apart from the heads just outside); "anywhere": drawn at
    random from the top K."""
    mu_a = np.sort(rng.gamma(1.0, 1.0, heads))[::-1]
    mu_b = mu_a.copy()
    swap = int(round(effect))
    if swap:
        idx_in = np.arange(k - swap, k) if swap_at == "edge" else np.sort(rng.choice(k, swap, replace=False))
        idx_out = np.arange(3 * k, 3 * k + swap)
        mu_b[idx_in], mu_b[idx_out] = mu_a[idx_out], mu_a[idx_in]
    return mu_a, mu_b


#: the data structures ID-3/ID-4/ID-7 are simulated under: (where the differing heads sit, per-prompt
#: noise SD, whether the noise is shared by each KV group of 3 heads). Under noise of SD 3 (the
#: top 10 pinned down to about one head) the rule neither supports nor refutes anything: measured
#: once (0.000 and 0.000 at 300 runs), left out of the table, whose powers it would zero.
_AGREE_SHAPES = {"edge": ("edge", 1.0, False), "anywhere": ("anywhere", 1.0, False),
                 "group-noise": ("anywhere", 1.0, True), "noisy": ("edge", 3.0, False)}
AGREE_TABLE = ("edge", "anywhere", "group-noise")


def _agree_noise(rng, n: int, heads: int, sd: float, grouped: bool) -> np.ndarray:
    noise = rng.normal(0, sd, (n, heads))
    if grouped:  # half the variance shared within groups of three neighbouring heads
        shared = np.repeat(rng.normal(0, sd, (n, heads // 3 + 1)), 3, axis=1)[:, :heads]
        noise = np.sqrt(0.5) * noise + np.sqrt(0.5) * shared
    return noise


def sim_agree_with(shape: str) -> Callable:
    return lambda p, s, rng, effect: sim_agree(p, s, rng, effect, shape)


def sim_agree(p: Profile, s: dict, rng, effect: float, shape: str = "edge") -> list[Verdict]:
    """Two methods on the same prompts: heads' true scores, per-prompt noise; ``effect`` is the number
    of B's true top-K heads that are not A's (0: the same heads; K: disjoint)."""
    from rh.rules.claims import agreement

    swap_at, sd, grouped = _AGREE_SHAPES[shape]
    n, k, heads = s["identify"], p.id_k, 270
    mu_a, mu_b = _agree_means(rng, k, heads, effect, swap_at)
    prompt = rng.normal(0, 0.5, (n, 1))
    A = mu_a[None] + prompt + _agree_noise(rng, n, heads, sd, grouped)
    B = mu_b[None] + prompt + _agree_noise(rng, n, heads, sd, grouped)
    return [agreement("ID-4", A, B, k=k, min_effect=p.agree_min_effect * k, same_prompts=True, alpha=p.alpha,
                      n_boot=200, seed=int(rng.integers(1 << 30)), baseline_accuracy=BASE_ACC,
                      baseline_floor=p.baseline_floor)]


def sim_id7_with(shape: str) -> Callable:
    return lambda p, s, rng, effect: sim_id7(p, s, rng, effect, shape)


def sim_id7(p: Profile, s: dict, rng, effect: float, shape: str = "edge") -> list[Verdict]:
    """ID-7 for a content-free method: A scored on the identification prompts, B on its own random
    sequences (independent inputs); ``effect`` as in :func:`sim_agree`."""
    from rh.rules.field import method_agreement

    swap_at, sd, grouped = _AGREE_SHAPES[shape]
    n_a, n_b, k, heads = s["identify"], s["content_free"], p.id_k, 270
    mu_a, mu_b = _agree_means(rng, k, heads, effect, swap_at)
    A = mu_a[None] + rng.normal(0, 0.5, (n_a, 1)) + _agree_noise(rng, n_a, heads, sd, grouped)
    B = mu_b[None] + rng.normal(0, 0.5, (n_b, 1)) + _agree_noise(rng, n_b, heads, sd, grouped)
    return [method_agreement("echo", A, B, k=k, min_effect=p.agree_min_effect * k, same_prompts=False, alpha=p.alpha,
                             n_boot=200, seed=int(rng.integers(1 << 30)), baseline_accuracy=BASE_ACC,
                             baseline_floor=p.baseline_floor)]


# SmolLM2-135M's grid: 30 layers of 9 query heads reading 3 KV heads (the quick profile's model)
_GRID = (30, 9, 3)


def _planted_top(rng, effect: float, k: int) -> np.ndarray:
    """A true top-K of flat head indices on :data:`_GRID`, three heads in each of K/3 layers.
    ``effect`` 0: each layer's heads placed uniformly (the null itself); > 0: a fixed placement
    whose same-group share of within-layer pairs is chance + ``effect`` (rounded up to whole pairs)."""
    n_layers, n_heads, n_kv = _GRID
    group = n_heads // n_kv
    per = 3
    layers = rng.choice(n_layers, size=max(1, k // per), replace=False)
    chance = (group - 1) / (n_heads - 1)
    pairs = len(layers) * per * (per - 1) // 2
    if effect <= 0:
        return np.concatenate([l * n_heads + rng.choice(n_heads, per, replace=False) for l in layers])
    want = int(np.ceil((chance + effect) * pairs - 1e-9))
    # a layer holds 3 same-group pairs (all in one group), 1 (two in one group) or 0 (one per group)
    full, rest = divmod(want, 3)
    out = []
    for i, l in enumerate(layers):
        g = rng.permutation(n_kv)
        if i < full:
            heads = g[0] * group + rng.permutation(group)[:3]
        elif i < full + rest:
            two = g[0] * group + rng.permutation(group)[:2]
            heads = np.append(two, g[1] * group + rng.integers(group))
        else:
            heads = g * group + rng.integers(group, size=n_kv)
        out.append(l * n_heads + np.asarray(heads))
    return np.concatenate(out)


def _tilted_top(rng, effect: float, k: int) -> np.ndarray:
    """A true top-K on :data:`_GRID`, three heads in each of K/3 layers, each layer's placement drawn
    with weight e^(λ·its same-group pairs), λ such that the expected same-group share is chance +
    ``effect``: a placement *propensity* of exactly ``effect``, the realised share varying around
    it as real placements would (``effect`` 0: uniform placement)."""
    from rh.rules.field import _layer_pair_pmf, _solve_tilt, _tilted

    n_layers, n_heads, n_kv = _GRID
    group = n_heads // n_kv
    chance = (group - 1) / (n_heads - 1)
    pmf = _layer_pair_pmf(3, n_heads, group)  # P(0, 1, 2, 3 same-group pairs) of 3 uniform heads
    t = np.arange(pmf.size)
    q = _tilted(pmf, _solve_tilt(pmf, lambda d: float(d @ t) / 3 - chance, effect)) if effect > 0 else pmf
    layers = rng.choice(n_layers, size=max(1, k // 3), replace=False)
    out = []
    for l in layers:
        m = int(rng.choice(t, p=q))
        g = rng.permutation(n_kv)
        if m == 3:
            heads = g[0] * group + rng.permutation(group)[:3]
        elif m == 1:
            heads = np.append(g[0] * group + rng.permutation(group)[:2], g[1] * group + rng.integers(group))
        else:
            heads = g * group + rng.integers(group, size=n_kv)
        out.append(l * n_heads + np.asarray(heads))
    return np.concatenate(out)


def sim_id8_with(placement: str) -> Callable:
    """ID-8 with the true top K placed by :func:`_planted_top` ("fixed": a realised share of exactly
    chance + effect), by :func:`_tilted_top` ("propensity": placed at random with that expected
    share), or uniformly with noise shared within each KV group ("group-noise": per-prompt noise
    correlated 0.5 among a group's heads, the null a shared KV head could fake)."""
    return lambda p, s, rng, effect: sim_id8(p, s, rng, effect, placement)


def sim_id8(p: Profile, s: dict, rng, effect: float, placement: str = "fixed") -> list[Verdict]:
    """ID-8: per-prompt scores of the 270 heads, the planted top K a margin above the rest with
    per-prompt noise, so the estimated and the resampled top K differ from the true one as real
    rankings do; the rule gets the estimated top K and its bootstrap over prompts."""
    from rh.rules.field import kv_clustering

    n_layers, n_heads, n_kv = _GRID
    k, n = s["group_k"] // 3 * 3, s["identify"]
    true = (_tilted_top if placement == "propensity" else _planted_top)(rng, effect, k)
    mu = rng.normal(0.0, 0.3, n_layers * n_heads)
    mu[true] = 1.0 + rng.uniform(0, 0.5, true.size)
    noise = rng.normal(0, 1.5, (n, mu.size))
    if placement == "group-noise":  # half of each head's noise variance shared with its KV group
        shared = rng.normal(0, 1.5, (n, n_layers * n_kv))
        noise = np.sqrt(0.5) * noise + np.sqrt(0.5) * np.repeat(shared, n_heads // n_kv, axis=1)
    x = mu[None] + noise
    top = np.argsort(-x.mean(axis=0), kind="stable")[:k]
    idx = rng.integers(0, n, (100, n))
    boot = np.argsort(-x[idx].mean(axis=1), axis=1, kind="stable")[:, :k]
    return [kv_clustering(top, boot, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                          min_effect=p.group_min_effect, alpha=p.alpha, baseline_accuracy=BASE_ACC,
                          baseline_floor=p.baseline_floor)]


def sim_ca7(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
    """CA-7: ``effect`` in units of Δ: the top K's gap over random K-sets is ``effect`` x the CA-1
    Δ and the rise of distractor answers ``effect`` x its Δ (both parts at their boundaries at 0 and 1)."""
    from rh.causal import NecessityOutcomes
    from rh.rules.field import distractor_necessity

    n, draws, k = s["distractor"], s["draws"], p.id_k
    gap = effect * p.ca1_min_gap
    base = (rng.random(n) < BASE_ACC).astype(float)
    item_q = np.where(rng.random(n) < 0.25, rng.uniform(0.0, 0.3, n), 0.0)
    rand = ((rng.random((draws, n)) >= item_q) & (base == 1)).astype(float)
    top = ((rng.random(n) >= item_q + gap / BASE_ACC) & (base == 1)).astype(float)
    z = np.zeros(n)
    out = NecessityOutcomes(k, [], [], base, z, top, z, rand, np.zeros((draws, n)), None)
    d_base = (rng.random(n) < 0.05).astype(float)
    d_top = 1 - _pair_from(rng, 1 - d_base, effect * p.distractor_min_rise)
    v = distractor_necessity(out, d_base, d_top, alpha=p.alpha, baseline_floor=p.baseline_floor,
                             min_gap=p.ca1_min_gap, min_rise=p.distractor_min_rise, n_boot=200,
                             seed=int(rng.integers(1 << 30)))
    return list(v.values())


def sim_ca8_with(shape: str) -> Callable:
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        """CA-8: ``effect`` names the scenario, each arm planted at once: 0 both arms at their support
        boundaries (the others' loss = the margin, the top K's drop 0), 1 at their refutation boundaries
        (loss = margin, drop = Δ), 2 both true (no loss, drop Δ + 0.1), 3 both false (loss 2 x margin, no drop)."""
        from rh.rules.field import compression_safety

        items = PairedItems(rng, s["inverse"], shape)
        levels = s["compress_levels"]
        base = items.base()
        loss_others, drop_top = {0: (p.compress_margin, 0.0), 1: (p.compress_margin, p.min_drop),
                                 2: (0.0, p.min_drop + 0.1), 3: (2 * p.compress_margin, 0.0)}[int(effect)]
        others = {k: items.after(base, loss_others) for k in range(levels)}
        top = {k: items.after(base, drop_top) for k in range(levels)}
        return list(compression_safety(base, others, top, margin=p.compress_margin, min_drop=p.min_drop,
                                       alpha=p.alpha, baseline_floor=p.baseline_floor).values())
    return run


sim_ca8 = sim_ca8_with("uniform")


def sim_id1_with(shape: str) -> Callable:
    """ID-1 with per-trial scores "smooth" (each head's mean plus normal noise, clipped to [0, 1]) or
    "zero-inflated" as Wu24's are (a head scores 0 on most trials and a share of the needle, 0.2-1,
    on the others; most heads never score)."""
    return lambda p, s, rng, effect: sim_id1(p, s, rng, effect, shape)


def sim_id1(p: Profile, s: dict, rng, effect: float, shape: str = "smooth") -> list[Verdict]:
    """Wu24 scores of 270 heads over the counted trials: ``effect`` is the true fraction of heads whose
    mean exceeds the threshold (rounded to whole heads); as many heads again sit just below it, so
    the fraction is estimated, not read off; the rest score near 0."""
    from rh.id_claims import sparsity
    from rh.scoring import SampleScores

    n, heads, thr = s["identify"], 270, p.sparsity_threshold
    above = int(round(effect * heads))
    if shape == "zero-inflated":  # most heads never score; a tenth copy a needle token now and then
        mu = np.where(rng.random(heads) < 0.9, 0.0, rng.uniform(0.0, 0.005, heads))
    else:
        mu = np.zeros(heads)
    mu[:above] = rng.uniform(thr + 0.005, 0.6, above)  # retrieval heads: from just above t to well above
    mu[above:2 * above] = rng.uniform(thr - 0.05, thr - 0.005, above)
    if shape == "zero-inflated":  # a hit scores U(0.2, 1) (mean 0.6): hit rate mean / 0.6
        hits = rng.random((n, heads)) < (mu / 0.6)[None, :]
        x = hits * rng.uniform(0.2, 1.0, (n, heads))
    else:  # normal noise clipped at 0: about half of a silent head's trials are 0, the rest small
        x = np.clip(mu[None, :] + rng.normal(0, 0.03, (n, heads)), 0, 1)
    scored = SampleScores("wu24", [str(i) for i in range(n)], x[:, None, :], np.ones(n, bool), [{} for _ in range(n)])
    return [sparsity(scored, threshold=thr, max_fraction=p.sparsity_max_fraction, alpha=p.alpha, n_boot=200,
                     seed=int(rng.integers(1 << 30)))]


def sim_iv5_with(shape: str) -> Callable:
    """IV-5's layer probes: 31 residual indices (SmolLM2's 30 layers), the first critical head
    writing at index 16, chance 0.2, every late index decoding at 0.7, and the early indices at
    chance + ``effect``: all of them (``"flat"``), only the last one before the write, the others
    at chance (``"last-early"``), or all of them with each prompt's hits shared across indices (a
    prompt a probe gets right at one index it gets right at every index its accuracy allows:
    ``"correlated"``, the strongest dependence between indices)."""
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        import pandas as pd

        from rh.probes import decodable_after_heads

        n, m, first, chance = s["probe"], 31, 16, 0.2
        acc = np.full(m, chance)
        if shape == "last-early":
            acc[first - 1] = chance + effect
        else:
            acc[:first] = chance + effect
        acc[first:] = 0.7
        if shape == "correlated":
            u = rng.random(n)
            hits = (u[None, :] < acc[:, None]).sum(axis=1)
        else:
            hits = rng.binomial(n, acc)
        p_gt = _sps.binom.sf(hits - 1, n, chance)
        df = pd.DataFrame({"layer": np.arange(m), "accuracy": hits / n, "n": n, "n_correct": hits,
                           "chance": chance, "p_value": p_gt})
        return [decodable_after_heads(df, [first - 1], alpha=p.alpha, margin=p.probe_margin)]
    return run


def _latent_correct(rng, u: np.ndarray, loss: np.ndarray, mix: float) -> np.ndarray:
    """0/1 outcomes with P(correct) = 1 - loss exactly, item by item: with probability 1 - ``mix`` an
    item keeps its latent ``u`` (so its outcomes across conditions move together: an item lost at a
    small K is lost at larger ones), else it draws afresh."""
    fresh = rng.random(loss.shape)
    keep = rng.random(loss.shape) >= mix
    return (np.where(keep, np.broadcast_to(u, loss.shape), fresh) >= loss).astype(float)


def _curve_gap(shape: str, x: np.ndarray, effect: float) -> np.ndarray:
    """CA-9's planted gap (top-K loss minus random-K loss) at sweep positions ``x`` in [0, 1], its
    mean over the levels exactly ``effect``: ``flat``; ``peaked`` at the middle K; ``crossing`` (the
    top set hurts less than random at the smallest K, more at the largest)."""
    if shape == "flat":
        return np.full_like(x, effect)
    if shape == "peaked":
        w = np.exp(-(((x - 0.5) / 0.18) ** 2))
        return effect * w / w.mean()
    if shape == "crossing":
        return effect + 2.0 * (effect + 0.05) * (x - x.mean())
    raise ValueError(f"unknown CA-9 curve shape {shape!r}")


def sim_ca9_with(shape: str) -> Callable:
    """CA-9 under a curve shape (:func:`_curve_gap`): the random-K loss grows with K (0.15 at the
    smallest, 0.45 at the largest: the baseline's 10% misses included), the top-K loss adds the
    planted gap; items correlated across conditions and K (:func:`_latent_correct`). Planted
    effects up to 0.25 keep every probability in range, so the mean gap is exactly the effect."""
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        from rh.rules.sweep import ablation_curve

        n, levels = s["sweep"], s["curve_levels"]
        x = np.linspace(0.0, 1.0, levels)
        rand_loss = 0.15 + 0.3 * x ** 2
        top_loss = rand_loss + _curve_gap(shape, x, effect)
        if top_loss.min() < 0.1 - 1e-12 or top_loss.max() > 1.0 + 1e-12:
            raise ValueError(f"CA-9's simulation plants effects in [0, 0.25]; {effect} puts a loss out of range")
        u = rng.random((n, 1))
        base = (u[:, 0] >= 0.1).astype(float)
        top = _latent_correct(rng, u, np.broadcast_to(top_loss, (n, levels)), 0.3)
        rand = _latent_correct(rng, u, np.broadcast_to(rand_loss, (n, levels)), 0.3)
        return [ablation_curve(base, top, rand, list(range(1, levels + 1)), min_area=p.curve_min_area, alpha=p.alpha,
                               baseline_floor=p.baseline_floor, n_boot=50, seed=int(rng.integers(1 << 30)))]
    return run


def sim_ca10_with(shape: str) -> Callable:
    """CA-10: the top-K set ablated loses 60% of the items; dropping head h from it recovers r_h
    (P(correct) rises by exactly r_h), items correlated across the heads. ``effect`` is the
    recovery of the least-needed head: ``one-weak``, the others recover 0.3 more; ``all-equal``,
    every head recovers the effect (the worst case for a false refutation at δ)."""
    def run(p: Profile, s: dict, rng, effect: float) -> list[Verdict]:
        from rh.rules.sweep import minimality

        n, k = s["sweep"], s["id_k"]
        rec = np.full(k, effect) if shape == "all-equal" else np.r_[effect, np.full(k - 1, min(effect + 0.3, 0.55))]
        u = rng.random((n, 1))
        base = (u[:, 0] >= 0.1).astype(float)
        top_loss = 0.7
        top = _latent_correct(rng, u, np.full((n, 1), top_loss), 0.3)[:, 0]
        dropped = _latent_correct(rng, u, np.broadcast_to(top_loss - rec, (n, k)), 0.3)
        return [minimality(top, {f"h{j}": dropped[:, j] for j in range(k)}, base,
                           min_recovery=p.minimal_min_recovery, alpha=p.alpha, baseline_floor=p.baseline_floor)]
    return run


def calibrate(family: str, profile: Profile, *, reps: int = 200, seed: int | None = None) -> Rates:
    """Simulate ``reps`` runs per scenario for one registered family (:mod:`rh.claim_families`) at
    ``profile``'s sizes, with the family's own seed unless ``seed`` is given. A family simulated
    under several data shapes (skewed, heavy-tailed, ...) reports the worst case over them: the
    largest false-support and false-refute rates and the smallest powers (each shape's rates are in
    ``planted["structures"]``)."""
    fam = claim_families.family(family)
    if fam.calibration is None:
        raise ValueError(f"claim family {family!r} has no calibration: choose one of "
                         f"{', '.join(claim_families.calibrated())}")
    s = sizes(profile)
    spec = fam.calibration(profile, s)
    sims = spec.simulate if isinstance(spec.simulate, Mapping) else {"": spec.simulate}
    at_sup, at_ref, pw_sup, pw_ref = spec.at_support, spec.at_refute, spec.power_support, spec.power_refute
    if seed is None:
        seed = spec.seed if spec.seed is not None else fam.seed
    rng = np.random.default_rng(seed)
    from rh.rules.paired import decisions_only

    per = {}
    for name, sim in sims.items():
        def runs(effect):
            return [sim(profile, s, rng, effect) for _ in range(reps)]

        with decisions_only():
            fs, fr = runs(at_sup), runs(at_ref)
            ps, pr = runs(pw_sup), runs(pw_ref)
        per[name] = (_rate("supported", fs), _rate("refuted", fr), _rate("supported", ps), _rate("refuted", pr))
    planted = {"false_support_at": at_sup, "false_refute_at": at_ref, "power_support_at": pw_sup,
               "power_refute_at": pw_ref}
    if len(per) > 1:  # the worst case over the data's shapes: the largest false rates, the smallest powers
        planted["structures"] = {name: dict(zip(("false_support", "false_refute", "power_support", "power_refute"),
                                                rates)) for name, rates in per.items()}
    rates = list(per.values())
    return Rates(family, s, profile.alpha, reps, max(r[0] for r in rates), max(r[1] for r in rates),
                 min(r[2] for r in rates), min(r[3] for r in rates), planted=planted)


def calibrate_all(profile: Profile, *, reps: int = 200, families: Sequence[str] | None = None) -> list[Rates]:
    """:func:`calibrate` for ``families`` (default: every registered family with a calibration)."""
    return [calibrate(f, profile, reps=reps) for f in (claim_families.calibrated() if families is None else families)]


def format_table(rows: list[Rates]) -> str:
    out = [f"{'family':10} {'false support':>13} {'false refute':>12} {'power (support)':>16} {'power (refute)':>15}"
           f"  planted (support / refute)"]
    for r in rows:
        pl = r.planted
        out.append(f"{r.family:10} {r.false_support:13.3f} {r.false_refute:12.3f} {r.power_support:16.2f} "
                   f"{r.power_refute:15.2f}  {pl['power_support_at']:g} / {pl['power_refute_at']:g}")
    if rows:
        out.append(f"alpha = {rows[0].alpha:g}, {rows[0].reps} simulated runs per cell (Monte-Carlo error of a rate "
                   f"near alpha: {rows[0].mc_error:.3f})")
    return "\n".join(out)
