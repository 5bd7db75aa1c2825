"""Multi-needle prompts in the style of RULER's NIAH variants (Hsieh et al. 2024): multi-key,
multi-value, multi-query, and passkey distractors, built on :mod:`rh.niah`'s exact-length,
token-space machinery.

Where rh follows RULER:

* the needle sentence ``"One of the special magic numbers for {key} is: {value}."`` and the
  question/answer wording ("... special magic number(s) for {key} mentioned in the provided
  text ...") of RULER's ``niah`` template;
* the four variants: ``multi_key`` (several keys, one asked; the others are distractors),
  ``multi_value`` (one key with several values, all to be recalled), ``multi_query`` (several
  keys, more than one asked), and needles in a Paul Graham essay haystack.

Where rh departs from RULER:

* prompts are built in token space (as in :mod:`rh.niah`): the haystack is tokenized once, a
  window is cut so the whole prompt has exactly ``length`` tokens, and each needle's tokens
  (``" " + sentence``, no special tokens) are spliced in, so every needle's token span and its
  value's span are known exactly rather than searched for afterwards;
* the prompt frame is rh's (:data:`rh.niah.INTRO`, ``<document>`` tags, "Question:"), not RULER's
  "Some special magic numbers are hidden within the following text..." preamble;
* values are 4-digit numbers (RULER: 7 digits; SmolLM2-135M is small), keys are single words
  from a fixed list that does not occur in the haystack (RULER: random wonderwords);
* the answer is teacher-forced after an answer prefix (RULER generates), the prefix ends with a
  space (RULER's ends with "are"), and single-value questions are singular ("What is the special
  magic number for ...?"; RULER always asks "What are all the special magic numbers ...?");
* ``multi_query`` asks exactly two keys, joined with " and " (RULER asks all its queries,
  comma-joined); ``multi_value`` answers the values in document order, joined with ", ";
* depths are controlled: the (first) target needle sits at the requested depth exactly as
  :func:`rh.niah.make_sample` places a single needle (a fraction of the haystack window, snapped
  back to a sentence start); the other needles go at seeded random depths, each at its own
  haystack position (RULER spreads needles by its own depth list);
* every distractor value's first answer token differs from the target answer's first token and
  from the other distractors' (values redrawn until so), so one teacher-forced pass tells
  "answered a distractor's value" apart from the argmax at the first answer position;
* ``distractor`` is not a RULER task: it is rh's ``passkey`` task (same needle, question and answer
  prefix) plus needles of the same format for other places ("... for the safe is 5120.").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rh.niah import Haystack, Sample, Template, fit_answer, prompt_template
from rh.tasks import get_task

MULTI_KINDS = ("multi_key", "multi_value", "multi_query", "distractor")

# RULER's needle (its type_needle_v = "numbers"), with rh's question/answer wording around it.
MAGIC_NEEDLE = "One of the special magic numbers for {key} is: {value}."
MAGIC_QUESTION_ONE = "What is the special magic number for {key} mentioned in the provided text?"
MAGIC_ANSWER_ONE = "The special magic number for {key} mentioned in the provided text is "
MAGIC_QUESTION_ALL = "What are all the special magic numbers for {key} mentioned in the provided text?"
MAGIC_ANSWER_ALL = "The special magic numbers for {key} mentioned in the provided text are "
MAGIC_QUESTION_TWO = "What are the special magic numbers for {key1} and {key2} mentioned in the provided text?"
MAGIC_ANSWER_TWO = "The special magic numbers for {key1} and {key2} mentioned in the provided text are "
MULTI_VALUE_SEP = ", "
MULTI_QUERY_SEP = " and "

# The distractor task is the passkey task; its distractors share the format but not the place.
PASSKEY_TASK = get_task("passkey")
PASSKEY_KEY = "vault"
PASSKEY_FORMAT = "The secret passcode for the {key} is {value}."
DISTRACTOR_PLACES = (
    "safe", "locker", "gate", "cellar", "garage", "office", "attic", "shed", "archive", "armory", "chapel",
    "bunker", "pantry", "greenhouse", "boathouse", "workshop",
)

# Keys for the magic-number kinds: single words that do not occur in the Paul Graham haystack and
# none of which is a substring of another (tests check both).
MAGIC_KEYS = (
    "walrus", "saffron", "tangerine", "quokka", "marmalade", "pelican", "zeppelin", "obsidian", "gondola",
    "paprika", "narwhal", "tamarind", "kumquat", "hibiscus", "juniper", "lynx", "mongoose", "nutmeg", "ocelot",
    "persimmon", "quince", "rhubarb", "sardine", "toucan", "wombat", "zucchini", "armadillo", "bagpipe",
    "cardamom", "eggplant", "flamingo", "gazelle", "hedgehog", "iguana", "kiwi", "lemur", "mandolin",
    "nectarine", "octopus", "platypus", "raccoon", "salamander", "tortoise", "vulture", "pistachio",
)

_MAX_DRAWS = 1000


def _draw_value(rng: random.Random) -> str:
    return str(rng.randint(1000, 9999))  # the passkey task's 4-digit values


@dataclass(frozen=True)
class MultiSweep:
    """A grid of multi-needle prompts of one ``kind``: ``lengths x depths x n_per_setting`` samples
    with ``n_needles`` needles each, from ``seed``. ``depths`` place the (first) target needle."""

    kind: str
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    n_per_setting: int
    n_needles: int = 4
    seed: int = 0
    snap_to_sentence: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "depths", tuple(float(x) for x in self.depths))
        if self.kind not in MULTI_KINDS:
            raise ValueError(f"kind={self.kind!r} is not a multi-needle kind: use one of {', '.join(MULTI_KINDS)}")
        if self.n_per_setting < 1:
            raise ValueError(f"n_per_setting={self.n_per_setting}: need at least one sample per setting")
        if not self.lengths or not self.depths:
            raise ValueError("a multi-needle sweep needs at least one length and one depth")
        for n in self.lengths:
            if n < 1:
                raise ValueError(f"length {n}: lengths are total prompt tokens and must be positive")
        for d in self.depths:
            if not (0.0 <= d <= 1.0):
                raise ValueError(f"depth {d} is outside [0, 1]: 0 puts the target needle first, 1 last")
        if int(self.n_needles) != self.n_needles:
            raise ValueError(f"n_needles={self.n_needles!r}: give a whole number of needles")
        object.__setattr__(self, "n_needles", int(self.n_needles))
        if self.kind == "multi_query" and self.n_needles < 2:
            raise ValueError(
                f"n_needles={self.n_needles}: multi_query asks for 2 keys, so it needs n_needles >= 2"
            )
        if self.n_needles < 2:
            raise ValueError(f"n_needles={self.n_needles}: a multi-needle prompt needs n_needles >= 2 "
                             "(use rh.niah.Sweep for one needle)")
        pool = DISTRACTOR_PLACES if self.kind == "distractor" else MAGIC_KEYS
        n_keys = self.n_needles - 1 if self.kind == "distractor" else self.n_needles
        if self.kind != "multi_value" and n_keys > len(pool):
            raise ValueError(f"n_needles={self.n_needles}: {self.kind} has only {len(pool)} distinct "
                             f"{'places' if self.kind == 'distractor' else 'keys'}; use n_needles <= "
                             f"{len(pool) + (self.kind == 'distractor')}")
        settings = [(length, f"{depth:.3f}") for length in self.lengths for depth in self.depths]
        if len(set(settings)) != len(settings):
            raise ValueError(
                f"lengths {list(self.lengths)} x depths {list(self.depths)} repeat a setting: sample ids keep "
                "lengths as integers and depths to 3 decimals; give each one once"
            )

    def groups(self) -> list[tuple[int, float, int, str]]:
        """(length, depth, index, group id), as :meth:`rh.niah.Sweep.groups`: the same group ids,
        and (for the same seed) the same haystack-window draw as a ``Sweep``'s samples."""
        return [(length, depth, i, f"L{length}-d{depth:.3f}-{i:03d}")
                for length in self.lengths for depth in self.depths for i in range(self.n_per_setting)]


@dataclass
class _Plan:
    """What one sample holds before it is spliced: needles in draw order (the first is the target
    placed at the requested depth), question and template."""

    kind: str
    keys: list[str]
    values: list[str]
    texts: list[str]
    roles: list[str]
    needle_ids: list[list[int]]
    value_tok: list[tuple[int, int]]  # value's token range inside the needle's ids
    question: str
    template: Template  # as fit_answer leaves it for the (provisional) answer
    answer: str
    asked: list[int]  # needle indices the question asks, in the order it names them
    first_ids: list[int]  # each value's first answer token after this prompt

    def fixed(self) -> int:
        return len(self.template.prefix_ids) + len(self.template.suffix_ids) + sum(map(len, self.needle_ids))

    def min_length(self) -> int:
        # n_needles distinct haystack positions need n_needles - 1 haystack tokens
        return self.fixed() + len(self.texts) - 1


def _first_id(tokenizer: Any, template: Template, value: str) -> int:
    return fit_answer(tokenizer, template, value)[1][0]


def _tokenize_needle(tokenizer: Any, text: str, value: str) -> tuple[list[int], tuple[int, int]]:
    enc = tokenizer(" " + text, add_special_tokens=False, return_offsets_mapping=True)
    a0 = 1 + text.rindex(value)
    a1 = a0 + len(value)
    inside = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < a1 and e > a0]
    return list(enc.input_ids), (inside[0], inside[-1] + 1)


def _plan(tokenizer: Any, kind: str, n: int, rng: random.Random, chat: bool, sid: str) -> _Plan:
    """Draw keys and values, build the question and template, and redraw values until their first
    answer tokens are distinct where the kind needs it (all kinds but multi_value)."""
    if kind == "distractor":
        keys = [PASSKEY_KEY, *rng.sample(DISTRACTOR_PLACES, n - 1)]
        question, prefix = PASSKEY_TASK.question, PASSKEY_TASK.answer_prefix
        roles = ["target"] + ["distractor"] * (n - 1)
        asked = [0]
    elif kind == "multi_key":
        keys = rng.sample(MAGIC_KEYS, n)
        question, prefix = MAGIC_QUESTION_ONE.format(key=keys[0]), MAGIC_ANSWER_ONE.format(key=keys[0])
        roles = ["target"] + ["distractor"] * (n - 1)
        asked = [0]
    elif kind == "multi_query":
        keys = rng.sample(MAGIC_KEYS, n)
        question = MAGIC_QUESTION_TWO.format(key1=keys[0], key2=keys[1])
        prefix = MAGIC_ANSWER_TWO.format(key1=keys[0], key2=keys[1])
        roles = ["target", "target"] + ["distractor"] * (n - 2)
        asked = [0, 1]
    elif kind == "multi_value":
        keys = [rng.choice(MAGIC_KEYS)] * n
        question, prefix = MAGIC_QUESTION_ALL.format(key=keys[0]), MAGIC_ANSWER_ALL.format(key=keys[0])
        roles = ["target"] * n
        asked = list(range(n))
    else:  # pragma: no cover - MultiSweep validates the kind
        raise ValueError(f"kind={kind!r} is not a multi-needle kind: use one of {', '.join(MULTI_KINDS)}")
    base = prompt_template(tokenizer, question, prefix, chat=chat)
    distinct_first = kind != "multi_value"
    values: list[str] = []
    first_ids: list[int] = []
    for _ in range(n):
        for _attempt in range(_MAX_DRAWS):
            v = _draw_value(rng)
            if v in values:
                continue
            fid = _first_id(tokenizer, base, v)
            if not distinct_first or fid not in first_ids:
                break
        else:
            raise ValueError(
                f"{sid}: cannot draw {n} 4-digit values whose first answer tokens differ under this tokenizer "
                f"(found {len(values)}); use fewer needles"
            )
        values.append(v)
        first_ids.append(fid)
    fmt = PASSKEY_FORMAT if kind == "distractor" else MAGIC_NEEDLE
    texts = [fmt.format(key=k, value=v) for k, v in zip(keys, values)]
    if kind == "distractor":
        assert texts[0] == PASSKEY_TASK.needle.format(value=values[0])
    toks = [_tokenize_needle(tokenizer, t, v) for t, v in zip(texts, values)]
    if kind == "multi_query":
        answer = MULTI_QUERY_SEP.join(values[i] for i in asked)
    elif kind == "multi_value":
        answer = MULTI_VALUE_SEP.join(values)  # provisional: the builder reorders to document order
    else:
        answer = values[0]
    template, _ = fit_answer(tokenizer, base, answer)
    return _Plan(kind, keys, values, texts, roles, [t[0] for t in toks], [t[1] for t in toks], question,
                 template, answer, asked, first_ids)


_PROBE_VALUES = ("1000", "9999", "1234", "5678", "4321", "8765", "1111", "7070", "2025", "6842")
_MIN_CACHE: dict[tuple, tuple[Any, int]] = {}


def min_multi_length(tokenizer: Any, kind: str, n_needles: int, *, chat: bool = True) -> int:
    """The shortest prompt that holds the template, the question and ``n_needles`` needles of
    ``kind`` (plus the ``n_needles - 1`` haystack tokens that keep needles apart), whatever keys
    and values a seed draws: a bound from the longest keys (every key is tried) and the longest
    value tokenization among a few probe 4-digit values (exact where digits tokenize one by one or
    in fixed groups, as in SmolLM2 and Llama 3). The builder refuses shorter lengths."""
    if kind not in MULTI_KINDS:
        raise ValueError(f"kind={kind!r} is not a multi-needle kind: use one of {', '.join(MULTI_KINDS)}")
    n = int(n_needles)
    memo = _MIN_CACHE.get((id(tokenizer), kind, n, chat))
    if memo is not None and memo[0] is tokenizer:
        return memo[1]
    fmt = PASSKEY_FORMAT if kind == "distractor" else MAGIC_NEEDLE
    pool = DISTRACTOR_PLACES if kind == "distractor" else MAGIC_KEYS

    def n_tok(text: str) -> int:
        return len(tokenizer(" " + text, add_special_tokens=False).input_ids)

    v_extra = max(n_tok(fmt.format(key=pool[0], value=v)) for v in _PROBE_VALUES) - n_tok(
        fmt.format(key=pool[0], value=_PROBE_VALUES[0]))
    lens = sorted((n_tok(fmt.format(key=k, value=_PROBE_VALUES[0])) + v_extra for k in pool), reverse=True)
    if kind == "distractor":
        needles = n_tok(PASSKEY_FORMAT.format(key=PASSKEY_KEY, value=_PROBE_VALUES[0])) + v_extra + sum(lens[: n - 1])
    elif kind == "multi_value":
        needles = n * lens[0]
    else:
        needles = sum(lens[:n])

    def frame(question: str, prefix: str) -> int:
        base = prompt_template(tokenizer, question, prefix, chat=chat)
        worst = 0
        for v in _PROBE_VALUES[:3]:
            answer = v if kind in ("distractor", "multi_key") else (
                MULTI_QUERY_SEP if kind == "multi_query" else MULTI_VALUE_SEP).join([v] * 2)
            tpl, _ = fit_answer(tokenizer, base, answer)
            worst = max(worst, len(tpl.prefix_ids) + len(tpl.suffix_ids))
        return worst

    if kind == "distractor":
        fixed = frame(PASSKEY_TASK.question, PASSKEY_TASK.answer_prefix)
    else:
        one, ans = ((MAGIC_QUESTION_ONE, MAGIC_ANSWER_ONE) if kind == "multi_key"
                    else (MAGIC_QUESTION_ALL, MAGIC_ANSWER_ALL))
        per_key = {k: frame(one.format(key=k), ans.format(key=k)) for k in MAGIC_KEYS}
        if kind == "multi_query":
            top = sorted(MAGIC_KEYS, key=lambda k: -per_key[k])[:3]
            fixed = max(frame(MAGIC_QUESTION_TWO.format(key1=a, key2=b), MAGIC_ANSWER_TWO.format(key1=a, key2=b))
                        for a in top for b in top if a != b)
        else:
            fixed = max(per_key.values())
    bound = fixed + needles + n - 1
    _MIN_CACHE[(id(tokenizer), kind, n, chat)] = (tokenizer, bound)
    return bound


def _snap(hay: Haystack, start: int, pos: int, n_ctx: int, snap: bool) -> int:
    """rh.niah's rule: back to the last sentence start at or before ``pos`` (ends stay put)."""
    if snap and 0 < pos < n_ctx:
        starts = np.flatnonzero(hay.sentence_start[start : start + pos + 1])
        if len(starts):
            return int(starts[-1])
    return pos


def _positions(hay: Haystack, start: int, n_ctx: int, depth: float, n: int, rng: random.Random,
               snap: bool) -> list[int]:
    """Haystack positions (tokens of the window before each needle), target first: the target as
    rh.niah places one needle, the others at seeded random depths, snapped the same way (redrawn
    while the snap lands mid-sentence before the window's first sentence start, up to 32 times);
    no two needles share a position, so haystack separates every pair."""
    taken = [_snap(hay, start, int(round(depth * n_ctx)), n_ctx, snap)]
    ss = hay.sentence_start[start : start + n_ctx]
    for _ in range(n - 1):
        for attempt in range(64):
            p = _snap(hay, start, int(round(rng.random() * n_ctx)), n_ctx, snap)
            # prefer a true sentence start (niah leaves a position before the window's first one as
            # is, which would split a word); accept niah's rule after 32 tries
            clean = not snap or p in (0, n_ctx) or bool(ss[p]) or attempt >= 32
            if clean and p not in taken:
                break
        else:  # few sentence starts in a short window: any free snapped position, else any free one
            first = int(np.argmax(ss)) if ss.any() else n_ctx
            fixed_points = [q for q in range(n_ctx + 1) if q == 0 or q == n_ctx or q <= first or ss[q]]
            free = [q for q in (fixed_points if snap else range(n_ctx + 1)) if q not in taken]
            if not free:
                free = [q for q in range(n_ctx + 1) if q not in taken]
            p = rng.choice(free)
        taken.append(p)
    return taken


def build_multi_samples(tokenizer: Any, sweep: MultiSweep, *, chat: bool = True,
                        max_positions: int | None = None) -> list[Sample]:
    """Every sample of ``sweep``, reproducibly from its seed: exactly ``length`` tokens each, with
    every needle's token span known (see the module docstring for how this follows RULER).

    ``Sample`` fields: ``task`` = the kind; ``needle_span``/``needle``/``depth``/``depth_used`` =
    the (first) target needle's, placed at the requested depth as :func:`rh.niah.make_sample`
    places one needle (for ``multi_query`` the first key asked; for ``multi_value`` the value the
    depth controls, not necessarily the first in the document); ``answer_span`` = that needle's
    value tokens; ``answer``/``answer_ids`` = the teacher-forced gold answer (ids from
    :func:`rh.niah.fit_answer`, so they match the natural tokenization after the prompt).

    ``meta``: ``"needles"`` (document order; dicts with ``span``, ``value_span``, ``key``,
    ``value``, ``text``, ``role``), ``"target_index"`` (the needle at the requested depth, in that
    list), ``"asked"`` (indices of the needles the question names, in the order it names them; for
    ``multi_value`` all of them in document order), ``"value_first_ids"`` (each needle's value's
    first answer token after this prompt), ``"distractor_first_ids"`` (those of the distractors,
    in document order; distinct from the target answer's first token and from each other; empty
    for ``multi_value``), ``"needle_depths"`` (each needle's haystack position as a fraction of
    the window), ``"context_span"`` and ``"kind"``/``"n_needles"``.

    Raises ValueError when a length is too short for the template and all needles (before any
    work; naming the minimum, :func:`min_multi_length`, which holds for every seed), and before
    any prompt is spliced when a length needs more haystack than there is or passes
    ``max_positions`` with the answer.
    """
    kind, n = sweep.kind, sweep.n_needles
    need = min_multi_length(tokenizer, kind, n, chat=chat)
    for length in sweep.lengths:
        if length < need:
            raise ValueError(
                f"length={length} tokens is too short for {kind} with {n} needles: the template, question and "
                f"needles take up to {need - (n - 1)} tokens under this tokenizer, and the needles need {n - 1} "
                f"haystack tokens between them; use a length of at least {need}"
            )
    hay = Haystack.for_tokenizer(tokenizer)
    plans = []
    for length, depth, _, group in sweep.groups():
        sid = f"{kind}-{group}"
        plan = _plan(tokenizer, kind, n, random.Random(f"{sweep.seed}:multi:{kind}:{n}:{group}"), chat, sid)
        if length < plan.min_length():  # pragma: no cover - min_multi_length bounds every draw
            raise ValueError(f"{sid}: length={length} tokens is too short for its needles; use a length of at "
                             f"least {plan.min_length()}")
        plans.append((length, depth, group, sid, plan))
    for length in sweep.lengths:
        mine = [p for (L, _, _, _, p) in plans if L == length]
        most = min(len(hay) + p.fixed() for p in mine)
        if length > most:
            raise ValueError(f"length={length} tokens needs more haystack than the {len(hay)} tokens there are; "
                             f"use a length of at most {most}")
        if max_positions is not None:
            n_ans = max(len(fit_answer(tokenizer, p.template, p.answer)[1]) for p in mine)
            if length + n_ans > max_positions:
                raise ValueError(
                    f"length={length} plus the {n_ans}-token answer exceeds the model's maximum of {max_positions} "
                    f"positions; use a length of at most {max_positions - n_ans}"
                )
    samples = []
    for length, depth, group, sid, plan in plans:
        samples.append(_splice(tokenizer, hay, plan, sid=sid, length=length, depth=depth, group=group,
                               seed=sweep.seed, snap=sweep.snap_to_sentence, max_positions=max_positions))
    return samples


def _splice(tokenizer: Any, hay: Haystack, plan: _Plan, *, sid: str, length: int, depth: float, group: str,
            seed: int, snap: bool, max_positions: int | None) -> Sample:
    n = len(plan.texts)
    template = plan.template
    n_ctx = length - plan.fixed()
    window_u = random.Random(f"{seed}:window:{group}").random()  # as rh.niah draws a group's window
    start = min(int(window_u * (len(hay) - n_ctx + 1)), len(hay) - n_ctx)
    window = hay.ids[start : start + n_ctx]
    pos = _positions(hay, start, n_ctx, depth, n, random.Random(f"{seed}:depths:{plan.kind}:{n}:{group}"), snap)
    order = sorted(range(n), key=lambda i: pos[i])  # document order, as draw indices
    rank = {i: r for r, i in enumerate(order)}
    pieces, spans, cursor, prev = [], {}, len(template.prefix_ids), 0
    for i in order:
        pieces.append(window[prev : pos[i]])
        cursor += pos[i] - prev
        pieces.append(np.asarray(plan.needle_ids[i], dtype=np.int64))
        spans[i] = (cursor, cursor + len(plan.needle_ids[i]))
        cursor += len(plan.needle_ids[i])
        prev = pos[i]
    pieces.append(window[prev:])
    context = np.concatenate(pieces)
    ids = tuple(int(x) for x in (*template.prefix_ids, *context.tolist(), *template.suffix_ids))
    assert len(ids) == length, (len(ids), length)

    asked, answer = plan.asked, plan.answer
    if plan.kind == "multi_value":
        asked = order
        answer = MULTI_VALUE_SEP.join(plan.values[i] for i in order)
    fitted, ans = fit_answer(tokenizer, template, answer)
    if fitted.suffix_ids != template.suffix_ids:  # pragma: no cover - digits never merge this way
        raise ValueError(f"{sid}: the answer {answer!r} changes how the prompt ends under this tokenizer")
    if max_positions is not None and length + len(ans) > max_positions:
        raise ValueError(f"length={length} plus the {len(ans)}-token answer exceeds the model's maximum of "
                         f"{max_positions} positions; use a length of at most {max_positions - len(ans)}")
    needles = []
    for i in order:
        s, _e = spans[i]
        a, b = plan.value_tok[i]
        needles.append({"span": spans[i], "value_span": (s + a, s + b), "key": plan.keys[i],
                        "value": plan.values[i], "text": plan.texts[i], "role": plan.roles[i]})
    t = 0  # the target placed at the requested depth is draw index 0
    prefix_len = len(template.prefix_ids)
    sample = Sample(
        id=sid, task=plan.kind, input_ids=ids, needle_span=spans[t], answer_ids=ans, answer=answer,
        needle=plan.texts[t], length=length, depth=depth, depth_used=pos[t] / n_ctx if n_ctx else depth,
        window_start=start, group=group, question=plan.question,
        answer_span=needles[rank[t]]["value_span"],
        meta={
            "context_span": (prefix_len, prefix_len + len(context)),
            "needles": needles,
            "target_index": rank[t],
            "asked": [rank[i] for i in asked],
            "value_first_ids": [plan.first_ids[i] for i in order],
            "distractor_first_ids": [plan.first_ids[i] for i in order if plan.roles[i] == "distractor"],
            "needle_depths": [pos[i] / n_ctx if n_ctx else 0.0 for i in order],
            "kind": plan.kind,
            "n_needles": n,
        },
    )
    if plan.kind != "multi_value":
        assert plan.first_ids[0] == ans[0], (sid, plan.first_ids[0], ans[0])
    check_multi_spans(tokenizer, sample)
    return sample


def check_multi_spans(tokenizer: Any, sample: Sample) -> None:
    """Every needle span must decode to its needle's text and every value span hold its value,
    inside its needle, in document order without overlap, within the context; the sample's
    ``needle_span``/``answer_span`` must be a target needle's. Raises AssertionError naming the
    sample otherwise."""
    ids = list(sample.input_ids)
    needles = sample.meta.get("needles")
    if not needles:
        raise AssertionError(f"{sample.id} has no meta['needles']")
    c0, c1 = sample.meta.get("context_span", (0, len(ids)))
    prev_end = c0
    for k, nd in enumerate(needles):
        s, e = nd["span"]
        a, b = nd["value_span"]
        if not (prev_end <= s < e <= c1):
            raise AssertionError(f"needle {k} of {sample.id} spans [{s}, {e}), which overlaps the previous "
                                 f"needle or leaves the context [{c0}, {c1})")
        got = tokenizer.decode(ids[s:e]).strip()
        if got != nd["text"].strip():
            raise AssertionError(f"needle {k} of {sample.id} decodes to {got!r}, not {nd['text']!r}")
        got = tokenizer.decode(ids[a:b])
        if not (s <= a < b <= e) or nd["value"] not in got:
            raise AssertionError(f"value span of needle {k} of {sample.id} decodes to {got!r}, which does not "
                                 f"hold {nd['value']!r}")
        if nd["role"] not in ("target", "distractor"):
            raise AssertionError(f"needle {k} of {sample.id} has role {nd['role']!r}")
        prev_end = e
    t = sample.meta.get("target_index", 0)
    if (needles[t]["span"] != tuple(sample.needle_span) or needles[t]["role"] != "target"
            or needles[t]["value_span"] != tuple(sample.answer_span)):
        raise AssertionError(f"needle_span/answer_span of {sample.id} are not those of its target needle {t}")


def render_multi_sample(tokenizer: Any, sample: Sample, *, around: int | None = None) -> str:
    """The prompt as text with targets marked »...« and distractors ‹...›; ``around`` keeps only
    that many tokens either side of the needles."""
    ids = list(sample.input_ids)
    needles = sample.meta["needles"]
    lo, hi = 0, len(ids)
    if around is not None:
        lo, hi = max(0, needles[0]["span"][0] - around), min(len(ids), needles[-1]["span"][1] + around)
    out, cur = [], lo
    for nd in needles:
        s, e = nd["span"]
        left, right = ("»", "«") if nd["role"] == "target" else ("‹", "›")
        out += [tokenizer.decode(ids[cur:s]), left, tokenizer.decode(ids[s:e]), right]
        cur = e
    out.append(tokenizer.decode(ids[cur:hi]))
    header = (f"# {sample.id}: task={sample.task} length={sample.length} depth={sample.depth:g} "
              f"(used {sample.depth_used:.3f}) gold answer {sample.answer!r} = ids {list(sample.answer_ids)}\n")
    return header + ("…" if lo else "") + "".join(out) + ("…" if hi < len(ids) else "")


def build_multi(tokenizer: Any, kind: str, *, lengths: Sequence[int], depths: Sequence[float], n_per_setting: int,
                n_needles: int = 4, seed: int = 0, chat: bool = True, max_positions: int | None = None,
                snap_to_sentence: bool = True) -> list[Sample]:
    """Shorthand for ``build_multi_samples(tokenizer, MultiSweep(kind, ...))``."""
    sweep = MultiSweep(kind, tuple(lengths), tuple(depths), n_per_setting, n_needles, seed, snap_to_sentence)
    return build_multi_samples(tokenizer, sweep, chat=chat, max_positions=max_positions)


__all__ = [
    "MULTI_KINDS", "MultiSweep", "build_multi_samples", "build_multi", "check_multi_spans", "min_multi_length",
    "render_multi_sample",
    "MAGIC_NEEDLE", "MAGIC_KEYS", "DISTRACTOR_PLACES", "PASSKEY_FORMAT",
]
