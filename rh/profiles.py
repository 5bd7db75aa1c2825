"""Profiles: how much evidence a run gathers (design decision 6). ``quick`` checks the catalogue
in minutes; ``full`` is what a paper would cite. Scaled by the model's head count, since head
counts differ by 20x between SmolLM2 (270) and Llama-3.3-70B (5120)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from rh.heads import HeadShape
from rh.niah import Sample, Sweep, build_samples
from rh.seeds import prompt_seed


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: str
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    n_per_setting: int  # samples per (length, depth)
    ablation_levels: tuple[int, ...]  # K values for top-K vs random-K
    random_draws: int  # random head sets per K: the head-set null needs more than len(levels)/alpha - 1
    alpha: float = 0.05
    baseline_floor: float = 0.5  # below this baseline accuracy an ablation drop cannot be shown
    identify_frac: float = 0.8
    split_seed: int = 0
    sample_seed: int = 0
    draw_seed: int = 0
    batch_size: int = 8
    n_boot: int = 10_000
    tasks: tuple[str, ...] = ("passkey",)  # the tasks CA-1 identifies and ablates on
    id_tasks: tuple[str, ...] = ("passkey", "employee_count", "hq_state", "inc_state", "inc_year")  # ID-5, CA-4
    id_k: int = 10  # top-K compared by the identification claims, ablated by CA-5 and CA-6
    general_k: int = 10  # per-task top-K whose intersection are the general heads (ID-5, CA-4)
    stability_length: int = 1024  # ID-3 compares rankings at lengths[0] and this length
    inverse_levels: tuple[int, ...] = (10, 50, 100)  # CA-3: K lowest-scoring heads
    ni_margin: float = 0.1  # CA-3's non-inferiority margin (accuracy)
    inverse_n: int = 16  # CA-3: fresh prompts per depth (n = 16 x 5 depths = 80 gives power ~0.9 at margin 0.1)
    depth_n: int = 8  # CA-6: fresh validation prompts per depth
    task_n: int = 4  # CA-4, ID-5: fresh prompts per depth and task (5 depths x 8 = 40 per task in quick)
    sparsity_threshold: float = 0.1  # ID-1
    sparsity_max_fraction: float = 0.05  # ID-1
    spike_ratio: float = 10.0  # ID-2
    # Seed 004's interventions (IV-*): "critical heads" are the ranking's top ``critical_k``.
    critical_k: int = 3  # seed 004 ablates, patches and overrides the top 3
    incremental_levels: tuple[int, ...] = (1, 2, 3)  # IV-1
    iv_n: int = 16  # IV-1/2/3/4/7: fresh prompts per depth (IV-2's "< 5 points" needs about 60 to be testable)
    iv_min_drop: float = 0.10  # IV-1, IV-2: the hub drop must exceed this
    iv_nonhub_max: float = 0.05  # IV-2: the non-hub drop must stay under this
    patch_mode: str = "noise"  # IV-2
    hub_fraction: float = 0.8  # IV-3: the hub pattern's share of attention
    hub_keep: float = 0.9  # IV-3: the hub pattern keeps this share of the baseline
    override_patterns: tuple[str, ...] = ("hub", "uniform", "sequential")  # IV-3
    transplant_keep: float = 0.8  # IV-4
    probe_n: int = 24  # IV-5: prompts per depth for the layer probes (the first of CA-6's fresh prompts)
    ig_n: int = 8  # IV-6: prompts attributed
    ig_steps: int = 32  # IV-6: integration steps
    ig_tolerance: float = 0.05  # IV-6: IG's completeness error allowed, relative to F(x) - F(baseline)
    # Smallest effects of interest Δ (CLAIMS.md's three-way rule: refuted only when shown below Δ).
    ca1_min_gap: float = 0.2  # CA-1: top-K drop minus random-K drop (accuracy)
    ca1_control: str = "outside_top"  # CA-1's deciding control: "outside_top" or "layer_matched" random K-sets
    matched_draws: int = 0  # CA-1: layer-matched random K-sets per K (reported beside; decide when chosen)
    dose_levels: tuple[int, ...] = (5, 10, 20, 40)  # CA-2: top-K ablated at each (>= 3 levels)
    dose_min_growth: float = 1.0  # CA-2: growth of the answer log-prob drop, smallest to largest K (nats)
    min_drop: float = 0.2  # CA-4, CA-6, IV-3 (uniform, sequential): accuracy drop
    agree_min_effect: float = 0.2  # ID-3, ID-4: self- minus cross-agreement, as a fraction of id_k
    iv7_min_effect: float = 0.5  # IV-7: log-odds drop, hard half minus easy half (nats)
    ig_min_ratio: float = 2.0  # IV-6: attribution concentration (times the uniform share)
    probe_margin: float = 0.1  # IV-5: probe accuracy above chance that counts as decodable
    # Beyond the seeds (CLAIMS.md): ID-7, ID-8, CA-7, CA-8 and the ranking's uncertainty.
    id_methods: tuple[str, ...] = ("qrhead", "echo", "induction")  # ID-7: compared with sum attention
    content_free_n: int = 64  # ID-7: random repeated-token sequences for the echo and induction scores
    content_free_len: int = 128  # ID-7: tokens in each copy of a content-free sequence
    group_k: int = 0  # ID-8: top-K heads whose KV groups are counted (0: max(id_k, 10% of the heads))
    group_min_effect: float = 0.15  # ID-8: same-group share of within-layer pairs above chance
    uncertainty_boot: int = 500  # bootstrap rounds over prompt groups (ranking uncertainty, ID-8)
    distractor_n: int = 16  # CA-7: fresh prompts per depth with distractor needles
    distractor_needles: int = 4  # CA-7: needles per prompt, the target and its distractors
    distractor_min_rise: float = 0.1  # CA-7: rise of the distractor-answer rate
    compress_levels: tuple[int, ...] = ()  # CA-8: K heads kept whole (empty: id_k and a quarter of the heads)
    compress_sink: int = 4  # CA-8: first tokens every restricted head keeps (the attention sink)
    compress_window: int = 64  # CA-8: most recent tokens every restricted head keeps
    compress_margin: float = 0.1  # CA-8: accuracy the restriction of the other heads may cost
    curve_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # CA-9: K as fractions of the heads
    curve_min_area: float = 0.1  # CA-9: area between the random-K and top-K accuracy curves (mean gap over K)
    minimal_min_recovery: float = 0.1  # CA-10: accuracy one head's return to the ablated set must recover
    # CA-9 and CA-10 evaluate many conditions per prompt: "decode" (Wu24's protocol) shares each prompt's
    # clean prefill between them, so each costs its answer steps; "all" ablates every position (full passes)
    sweep_phase: str = "decode"
    sweep_n: int = 8  # CA-9, CA-10: prompts per depth, the first of CA-6's fresh prompts (their baselines are CA-6's)

    def sweep(self) -> Sweep:
        """The prompt grid this profile asks for: every task of CA-1 and of the identification claims."""
        tasks = tuple(dict.fromkeys((*self.tasks, *self.id_tasks)))
        return Sweep(self.lengths, self.depths, self.n_per_setting, tasks, self.sample_seed)

    def fresh_sweep(self, stream: str, per_depth: int, tasks: Sequence[str] | None = None) -> Sweep:
        """A claim's fresh prompts: the sweep at the first length, ``per_depth`` prompts per depth and
        task (default: CA-1's ``tasks``), seeded by the prompt stream ``stream``
        (:data:`rh.seeds.PROMPT_STREAMS`), so that no identification prompt is among them."""
        return replace(self.sweep(), lengths=self.lengths[:1], tasks=tuple(tasks or self.tasks),
                       n_per_setting=per_depth, seed=prompt_seed(self.sample_seed, stream))

    def fresh_samples(self, model: Any, stream: str, per_depth: int, tasks: Sequence[str] | None = None) -> list[Sample]:
        """The prompts of :meth:`fresh_sweep`, built for ``model`` (a ``LoadedModel``: its tokenizer,
        chat template where it is an instruct model, and context length)."""
        return build_samples(model.tokenizer, self.fresh_sweep(stream, per_depth, tasks), chat=model.instruct,
                             max_positions=model.max_positions)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_DEPTHS_5 = (0.0, 0.25, 0.5, 0.75, 1.0)
_DEPTHS_11 = tuple(round(i / 10, 1) for i in range(11))

# (quick, full) per size class, keyed by the model's total number of query heads.
_TABLE: dict[str, tuple[Profile, Profile]] = {
    "tiny": (  # random test models (< 100 heads)
        Profile(name="quick", lengths=(128,), depths=(0.0, 0.5, 1.0), n_per_setting=4, ablation_levels=(2, 4),
                random_draws=49, batch_size=16, id_tasks=("passkey", "inc_year"), id_k=4, general_k=8,
                stability_length=160, inverse_levels=(2, 4), depth_n=4, iv_n=4, probe_n=8, ig_n=5, ig_steps=16,
                dose_levels=(1, 2, 4), inverse_n=4, distractor_n=4, distractor_needles=2, content_free_n=16,
                content_free_len=16, uncertainty_boot=100),
        Profile(name="full", lengths=(128, 256), depths=_DEPTHS_5, n_per_setting=8, ablation_levels=(2, 4, 8),
                random_draws=79, batch_size=16, id_k=4, general_k=8, stability_length=384, inverse_levels=(2, 4, 8),
                depth_n=8, iv_n=8, probe_n=16, dose_levels=(1, 2, 4, 8)),
    ),
    "small": (  # SmolLM2-135M (270 heads)
        Profile(name="quick", lengths=(512,), depths=_DEPTHS_5, n_per_setting=16, ablation_levels=(10, 20),
                random_draws=49, depth_n=40, task_n=8),
        Profile(name="full", lengths=(512, 1024, 2048), depths=_DEPTHS_11, n_per_setting=20,
                ablation_levels=(5, 10, 20, 30, 40, 50), random_draws=199, stability_length=2048, depth_n=32, iv_n=20,
                probe_n=40, ig_n=32, ig_steps=64, dose_levels=(5, 10, 20, 30, 40, 50)),
    ),
    "large": (  # Llama-3-8B (1024), Llama-3.3-70B (5120)
        Profile(name="quick", lengths=(2048,), depths=_DEPTHS_5, n_per_setting=8, ablation_levels=(10, 20, 50),
                random_draws=79, batch_size=4, id_k=20, general_k=50, stability_length=4096,
                inverse_levels=(50, 200, 500), dose_levels=(10, 20, 50, 100)),
        Profile(name="full", lengths=(2048, 4096, 8192), depths=_DEPTHS_11, n_per_setting=10,
                ablation_levels=(5, 10, 20, 30, 40, 50, 100), random_draws=199, batch_size=2, id_k=20, general_k=50,
                stability_length=16384, inverse_levels=(50, 200, 500, 1000), depth_n=16, iv_n=20, probe_n=40, ig_n=32,
                ig_steps=64, dose_levels=(5, 10, 20, 50, 100)),
    ),
}


#: the profiles, smallest first: ``smoke`` for a first try of one's own claim (under a minute for the
#: guide's example on the bundled model: few, short prompts, so most claims end inconclusive), ``quick``
#: the catalogue's check, ``full`` the evidence a paper would want
PROFILES = ("smoke", "quick", "full")


def _smoke(quick: Profile) -> Profile:
    """``quick`` cut to the least that still runs every claim: one short length, three depths, a few
    prompts per setting, one K level with just enough random draws for the head-set null."""
    length = min(quick.lengths[0], 256)
    small = {f: min(getattr(quick, f), v) for f, v in (
        ("n_per_setting", 4), ("depth_n", 4), ("task_n", 2), ("inverse_n", 4), ("iv_n", 4), ("probe_n", 4),
        ("ig_n", 2), ("ig_steps", 8), ("distractor_n", 2), ("content_free_n", 8), ("content_free_len", 16),
        ("uncertainty_boot", 50))}
    return replace(quick, name="smoke", lengths=(length,), depths=(0.0, 0.5, 1.0),
                   ablation_levels=quick.ablation_levels[:1], random_draws=29, stability_length=2 * length,
                   inverse_levels=quick.inverse_levels[:1], incremental_levels=quick.incremental_levels[:1], **small)


def size_class(shape: HeadShape) -> str:
    if shape.n_total < 100:
        return "tiny"
    if shape.n_total < 1000:
        return "small"
    return "large"


def get_profile(name: str, shape: HeadShape, **overrides: Any) -> Profile:
    """The ``smoke``, ``quick`` or ``full`` profile for a model of this shape, with any field overridden."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {', '.join(PROFILES)}")
    quick, full = _TABLE[size_class(shape)]
    prof = full if name == "full" else _smoke(quick) if name == "smoke" else quick
    overrides = {k: v for k, v in overrides.items() if v is not None}
    prof = replace(prof, **overrides)
    if not (0 < prof.alpha < 1):
        raise ValueError(f"alpha={prof.alpha}: choose a significance level strictly between 0 and 1")
    need = len(prof.ablation_levels) / prof.alpha
    if prof.random_draws + 1 <= need:
        raise ValueError(
            f"random_draws={prof.random_draws} is too few: with {len(prof.ablation_levels)} K levels at alpha="
            f"{prof.alpha}, the head-set null needs at least {int(need)} draws to be able to pass Holm's threshold: "
            f"use an alpha above {len(prof.ablation_levels) / (prof.random_draws + 1):.3g} with this profile, or the full "
            "profile (more draws)"
        )
    if prof.sweep_phase not in ("all", "decode"):
        raise ValueError(f"sweep_phase={prof.sweep_phase!r}: use 'decode' (Wu24's protocol) or 'all' (every position)")
    if prof.ca1_control not in ("outside_top", "layer_matched"):
        raise ValueError(f"ca1_control={prof.ca1_control!r}: use 'outside_top' or 'layer_matched'")
    if prof.ca1_control == "layer_matched" and prof.matched_draws + 1 <= need:
        raise ValueError(f"ca1_control='layer_matched' with matched_draws={prof.matched_draws}: the deciding null "
                         f"needs more than {int(need) - 1} draws")
    if len(prof.dose_levels) and len(prof.dose_levels) < 3:
        raise ValueError(f"dose_levels={prof.dose_levels}: CA-2's trend needs at least three K levels")
    if any(k > shape.n_total for k in prof.dose_levels):
        raise ValueError(f"dose_levels={prof.dose_levels} exceed the model's {shape.n_total} heads")
    too_big = [k for k in prof.ablation_levels if 2 * k > shape.n_total]
    if too_big:
        raise ValueError(
            f"ablation levels {too_big} are too large for a model with {shape.n_total} heads: K random "
            f"heads are drawn from outside the top K, so K may be at most {shape.n_total // 2}"
        )
    resolved = {}
    if not prof.group_k:
        resolved["group_k"] = max(prof.id_k, shape.n_total // 10)
    if not prof.compress_levels:
        resolved["compress_levels"] = tuple(sorted({prof.id_k, shape.n_total // 4}))
    prof = replace(prof, **resolved)
    if any(not 0 < k < shape.n_total for k in (*prof.compress_levels, prof.group_k)):
        raise ValueError(f"compress_levels={prof.compress_levels}, group_k={prof.group_k}: each must lie between 1 "
                         f"and the model's {shape.n_total - 1} heads")
    if prof.compress_sink < 0 or prof.compress_window < 1:
        raise ValueError(f"compress_sink={prof.compress_sink}, compress_window={prof.compress_window}: the sink "
                         "needs >= 0 tokens and the window >= 1")
    return prof
