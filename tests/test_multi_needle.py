"""Unit tests of rh.multi_needle with the real (bundled SmolLM2) tokenizer: every needle's span,
exact lengths, the target and its question, teacher-forced answers, distinct distractor first
tokens, placement (no overlap, target depth, sentence snapping, untouched haystack),
determinism, and bad input."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from rh import multi_needle as mn
from rh.models import bundled_tokenizer
from rh.multi_needle import MULTI_KINDS, MultiSweep, build_multi_samples, check_multi_spans
from rh.niah import (
    PASSKEY_ANSWER_PREFIX,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    answer_ids,
    haystack_text,
    prompt_template,
)


DEPTHS = (0.0, 0.5, 1.0)
LENGTHS = (256, 700)


@pytest.fixture(scope="module")
def tok():
    return bundled_tokenizer()


@pytest.fixture(scope="module")
def built(tok):
    """kind -> samples over LENGTHS x DEPTHS x 2, 4 needles, seed 3 (chat format)."""
    return {kind: build_multi_samples(tok, MultiSweep(kind, LENGTHS, DEPTHS, 2, n_needles=4, seed=3))
            for kind in MULTI_KINDS}


@pytest.fixture(scope="module")
def hay_ids(tok) -> np.ndarray:
    """The haystack tokenized here, independently of ``Haystack``."""
    return np.asarray(tok(haystack_text(), add_special_tokens=False).input_ids)


def all_samples(built):
    return [s for kind in MULTI_KINDS for s in built[kind]]


def haystack_layout(sample):
    """(haystack tokens of the window, in order; each needle's haystack position), by cutting the
    needles back out of the context, without the builder's bookkeeping."""
    c0, c1 = sample.meta["context_span"]
    ids = list(sample.input_ids)
    window, positions, cur = [], [], c0
    for nd in sample.meta["needles"]:
        s, e = nd["span"]
        window += ids[cur:s]
        positions.append(len(window))
        cur = e
    window += ids[cur:c1]
    return window, positions


# ---------------------------------------------------------------------------- spans and lengths


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_every_needle_span_decodes_to_its_needle(tok, built, kind):
    """Catches off-by-one spans, spans not shifted by the needles spliced before them, and value
    spans cut from the wrong offset."""
    seen_depths = set()
    for s in built[kind]:
        needles = s.meta["needles"]
        assert len(needles) == 4
        for nd in needles:
            a, b = nd["span"]
            assert tok.decode(list(s.input_ids[a:b])).strip() == nd["text"]
            va, vb = nd["value_span"]
            assert a <= va < vb <= b
            assert tok.decode(list(s.input_ids[va:vb])).strip() == nd["value"]
            assert nd["value"] in nd["text"] and nd["key"] in nd["text"]
        seen_depths.add(s.depth)
        check_multi_spans(tok, s)
    assert seen_depths == set(DEPTHS)


def test_exact_length_and_ids(built):
    """Catches a context that is one haystack token too long or short per needle."""
    for s in all_samples(built):
        assert len(s.input_ids) == s.length
        assert s.length in LENGTHS
        assert s.task in MULTI_KINDS
        assert s.id == f"{s.task}-{s.group}"
    ids = [s.id for s in all_samples(built)]
    assert len(set(ids)) == len(ids)


def test_spans_do_not_overlap_and_haystack_separates_them(built):
    """Catches two needles spliced at one haystack position (adjacent or overlapping spans) and
    needles leaking out of the context into the template."""
    for s in all_samples(built):
        c0, c1 = s.meta["context_span"]
        spans = [nd["span"] for nd in s.meta["needles"]]
        assert spans == sorted(spans)
        assert c0 <= spans[0][0] and spans[-1][1] <= c1
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert a1 < b0, (s.id, spans)  # at least one haystack token between needles


def test_haystack_window_is_untouched(tok, built, hay_ids):
    """Cutting the needles out gives back one contiguous haystack window (catches dropped or
    duplicated haystack tokens around a splice), and the prompt frame is prompt_template's."""
    for s in all_samples(built):
        window, _ = haystack_layout(s)
        w0 = s.window_start
        assert window == hay_ids[w0 : w0 + len(window)].tolist(), s.id
        c0, c1 = s.meta["context_span"]
        prefix_text = tok.decode(list(s.input_ids[:c0]))
        assert "<document>" in prefix_text and s.question in tok.decode(list(s.input_ids[c1:]))


# ---------------------------------------------------------------------------- targets and answers


def test_target_is_marked_and_question_names_its_key(built):
    """Catches asking about a distractor's key, mislabelled roles, and the sample fields pointing
    at a needle other than the target."""
    for kind in MULTI_KINDS:
        for s in built[kind]:
            needles = s.meta["needles"]
            t = s.meta["target_index"]
            target = needles[t]
            assert target["role"] == "target"
            assert s.needle_span == target["span"] and s.answer_span == target["value_span"]
            assert s.needle == target["text"]
            roles = [nd["role"] for nd in needles]
            asked = [needles[i]["key"] for i in s.meta["asked"]]
            for nd in needles:
                named = re.search(rf"\b{re.escape(nd['key'])}\b", s.question) is not None
                assert named == (nd["role"] == "target"), (s.id, nd["key"], s.question)
            if kind == "distractor":
                assert roles.count("target") == 1 and target["key"] == "vault"
                assert s.question == PASSKEY_QUESTION
                assert target["text"] == PASSKEY_NEEDLE.format(value=target["value"])
                assert all(nd["text"].startswith("The secret passcode for the ") for nd in needles)
                assert len({nd["key"] for nd in needles}) == 4
            elif kind == "multi_key":
                assert roles.count("target") == 1 and asked == [target["key"]]
                assert len({nd["key"] for nd in needles}) == 4
            elif kind == "multi_query":
                assert roles.count("target") == 2 and len(asked) == 2
                assert asked[0] == target["key"]
                # the question names the keys in the order the answer gives their values
                assert s.question.index(asked[0]) < s.question.index(asked[1])
                assert len({nd["key"] for nd in needles}) == 4
            else:
                assert roles == ["target"] * 4 and len({nd["key"] for nd in needles}) == 1
            assert len({nd["value"] for nd in needles}) == 4


def test_answer_is_the_gold_and_answer_ids_decode_to_it(tok, built):
    """Catches answering a distractor's value, multi_value in draw rather than document order,
    multi_query in the wrong order, and answer ids that do not spell the answer."""
    for kind in MULTI_KINDS:
        for s in built[kind]:
            needles = s.meta["needles"]
            if kind in ("distractor", "multi_key"):
                want = needles[s.meta["target_index"]]["value"]
            elif kind == "multi_query":
                want = " and ".join(needles[i]["value"] for i in s.meta["asked"])
            else:
                want = ", ".join(nd["value"] for nd in needles)
            assert s.answer == want, s.id
            assert tok.decode(list(s.answer_ids)).strip() == s.answer
            # the ids are the natural tokenization after the prompt's own answer prefix
            tpl = prompt_template(tok, s.question, _answer_prefix(s), chat=True)
            assert tuple(s.input_ids[-len(tpl.suffix_ids):]) == tpl.suffix_ids
            assert s.answer_ids == answer_ids(tok, tpl, s.answer)


def _answer_prefix(sample):
    """The answer prefix written out here from the asked keys (not from the module's constants)."""
    if sample.task == "distractor":
        return PASSKEY_ANSWER_PREFIX
    keys = [sample.meta["needles"][i]["key"] for i in sample.meta["asked"]]
    if sample.task == "multi_key":
        return f"The special magic number for {keys[0]} mentioned in the provided text is "
    if sample.task == "multi_query":
        return f"The special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided text are "
    return f"The special magic numbers for {keys[0]} mentioned in the provided text are "


def test_distractor_task_uses_the_passkey_prompt_exactly(tok, built):
    """The passkey ranking's heads are ablated on this task: its prompt must end exactly as the
    passkey task's does."""
    tpl = prompt_template(tok, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, chat=True)
    for s in built["distractor"]:
        c0, c1 = s.meta["context_span"]
        assert tuple(s.input_ids[:c0]) == tpl.prefix_ids
        assert tuple(s.input_ids[c1:]) == tpl.suffix_ids


def test_distractor_first_ids_are_distinct_and_correct(tok, built):
    """Catches a distractor whose value starts like the target's (so the first-position argmax
    cannot tell them apart), duplicates among distractors, and ids that are not the value's first
    answer token after this prompt."""
    for kind in MULTI_KINDS:
        for s in built[kind]:
            needles = s.meta["needles"]
            dfi = s.meta["distractor_first_ids"]
            distractors = [nd for nd in needles if nd["role"] == "distractor"]
            if kind == "multi_value":
                assert dfi == []
                continue
            assert len(dfi) == len(distractors) == (2 if kind == "multi_query" else 3)
            assert len(set(dfi)) == len(dfi)
            assert s.answer_ids[0] not in dfi
            tpl = prompt_template(tok, s.question, _answer_prefix(s), chat=True)
            for nd, fid in zip(distractors, dfi):
                assert fid == answer_ids(tok, tpl, nd["value"])[0]
                assert nd["value"].startswith(tok.decode([fid]).strip())
            if kind == "multi_query":  # the second key asked is told apart from the first too
                second = needles[s.meta["asked"][1]]
                assert answer_ids(tok, tpl, second["value"])[0] not in {*dfi, s.answer_ids[0]}


# ---------------------------------------------------------------------------- placement


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_target_depth_is_honoured(built, ends_sentence, hay_ids, kind):
    """The target's haystack position is niah's: round(depth * n_ctx), snapped back to the last
    sentence start at or before it (kept where there is none). Catches the target placed at a
    random depth, depth measured with the needles counted in, and a lost snap."""
    for s in built[kind]:
        window, positions = haystack_layout(s)
        n_ctx = len(window)
        pos = positions[s.meta["target_index"]]
        raw = int(round(s.depth * n_ctx))
        if raw in (0, n_ctx):
            assert pos == raw, s.id
        else:
            assert pos <= raw
            w0 = s.window_start
            first = w0 == 0 or ends_sentence(hay_ids[w0 - 1])  # the window's first token starts a sentence
            starts = [i for i in range(raw + 1) if (i == 0 and first) or (i > 0 and ends_sentence(window[i - 1]))]
            assert pos == (starts[-1] if starts else raw), s.id
        assert s.depth_used == pytest.approx(pos / n_ctx)
        if s.depth == 0.0:
            assert s.meta["target_index"] == 0
        if s.depth == 1.0:
            assert s.meta["target_index"] == len(s.meta["needles"]) - 1


def test_other_needles_sit_at_sentence_starts(tok, ends_sentence):
    """With room to spare every needle starts at a sentence start (or an end of the window):
    catches distractors spliced mid-sentence."""
    for kind in MULTI_KINDS:
        for s in build_multi_samples(tok, MultiSweep(kind, (1500,), (0.3,), 2, n_needles=5, seed=1)):
            window, positions = haystack_layout(s)
            for p in positions:
                assert p in (0, len(window)) or ends_sentence(window[p - 1]), (s.id, p)


def test_no_snapping_when_off(tok, ends_sentence):
    """snap_to_sentence=False puts the target at exactly round(depth * n_ctx)."""
    for s in build_multi_samples(tok, MultiSweep("multi_key", (700,), (0.37, 0.61), 3, seed=2,
                                                 snap_to_sentence=False)):
        window, positions = haystack_layout(s)
        assert positions[s.meta["target_index"]] == int(round(s.depth * len(window)))


def test_needles_spread_over_the_window(tok):
    """The other needles go at random depths, not all next to the target."""
    depths = [d for s in build_multi_samples(tok, MultiSweep("multi_key", (1500,), (0.5,), 4, n_needles=4))
              for i, d in enumerate(s.meta["needle_depths"]) if i != s.meta["target_index"]]
    assert min(depths) < 0.3 and max(depths) > 0.7


# ---------------------------------------------------------------------------- reproducibility


def _fingerprint(samples):
    return [(s, repr(s.meta)) for s in samples]


def test_same_seed_same_samples_other_seed_different(tok, built):
    """Catches unseeded randomness (global random, set iteration order) and a seed that is ignored."""
    again = build_multi_samples(tok, MultiSweep("multi_query", LENGTHS, DEPTHS, 2, n_needles=4, seed=3))
    assert _fingerprint(again) == _fingerprint(built["multi_query"])
    other = build_multi_samples(tok, MultiSweep("multi_query", LENGTHS, DEPTHS, 2, n_needles=4, seed=4))
    assert [s.input_ids for s in other] != [s.input_ids for s in again]
    assert [s.answer for s in other] != [s.answer for s in again]


def test_base_model_format(tok):
    """chat=False builds plain-text prompts of the exact length too."""
    for kind in MULTI_KINDS:
        for s in build_multi_samples(tok, MultiSweep(kind, (300,), (0.5,), 1, n_needles=3), chat=False):
            assert len(s.input_ids) == 300 and "<|im_start|>" not in tok.decode(list(s.input_ids))
            assert tok.decode(list(s.input_ids)).endswith(s.question + "\nAnswer: " + _answer_prefix(s))
            check_multi_spans(tok, s)


def test_tiny_model_positions(tiny):
    """Builds for the tiny model's tokenizer within its position limit."""
    samples = build_multi_samples(tiny.tokenizer, MultiSweep("distractor", (200,), DEPTHS, 1),
                                  max_positions=tiny.max_positions)
    assert all(len(s.input_ids) + len(s.answer_ids) <= tiny.max_positions for s in samples)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_too_short_raises_naming_the_minimum_which_works(tok, kind):
    """The error names the minimum, the minimum builds whatever the seed draws, and one less
    raises (catches an off-by-one bound and a bound that only holds for one draw)."""
    with pytest.raises(ValueError, match=r"too short .* at least (\d+)") as err:
        build_multi_samples(tok, MultiSweep(kind, (60,), (0.5,), 1, n_needles=4))
    need = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert need > 60 and need == mn.min_multi_length(tok, kind, 4)
    for seed in range(3):
        for s in build_multi_samples(tok, MultiSweep(kind, (need,), DEPTHS, 2, n_needles=4, seed=seed)):
            assert len(s.input_ids) == need
            check_multi_spans(tok, s)
            assert len(haystack_layout(s)[0]) >= len(s.meta["needles"]) - 1
    with pytest.raises(ValueError, match=f"at least {need}"):
        build_multi_samples(tok, MultiSweep(kind, (need - 1, 400), (0.5,), 1, n_needles=4))


def test_too_long_and_max_positions_raise(tok):
    with pytest.raises(ValueError, match="at most"):
        build_multi_samples(tok, MultiSweep("multi_key", (10_000_000,), (0.5,), 1))
    with pytest.raises(ValueError, match="maximum of 300 positions"):
        build_multi_samples(tok, MultiSweep("multi_key", (299,), (0.5,), 1), max_positions=300)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "multikey"}, "kind='multikey'.*multi_key"),
        ({"kind": "passkey"}, "not a multi-needle kind"),
        ({"n_needles": 1}, "n_needles=1.*>= 2"),
        ({"kind": "multi_query", "n_needles": 1}, "multi_query asks for 2 keys"),
        ({"n_needles": 2.5}, "n_needles"),
        ({"depths": (1.5,)}, "depth 1.5 is outside"),
        ({"lengths": ()}, "at least one length"),
        ({"lengths": (0,)}, "length 0"),
        ({"n_per_setting": 0}, "n_per_setting=0"),
        ({"depths": (0.5, 0.5)}, "repeat a setting"),
        ({"kind": "distractor", "n_needles": 40}, "n_needles=40.*places"),
    ],
)
def test_bad_sweeps_raise(kwargs, match):
    args = {"kind": "multi_key", "lengths": (256,), "depths": (0.5,), "n_per_setting": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiSweep(**args)


def test_groups_match_niah_sweep():
    from rh.niah import Sweep

    a = MultiSweep("multi_key", (256, 512), (0.0, 0.5), 2).groups()
    b = Sweep((256, 512), (0.0, 0.5), 2).groups()
    assert a == b


def test_check_multi_spans_catches_corruption(tok, built):
    """The checker itself can fail: shifted spans, a swapped value span, a wrong target pointer."""
    s = built["multi_key"][3]
    needles = s.meta["needles"]
    bad = [dict(nd) for nd in needles]
    bad[1]["span"] = (bad[1]["span"][0] + 1, bad[1]["span"][1] + 1)
    with pytest.raises(AssertionError, match=s.id):
        check_multi_spans(tok, dataclasses.replace(s, meta={**s.meta, "needles": bad}))
    bad = [dict(nd) for nd in needles]
    bad[0]["value_span"], bad[1]["value_span"] = bad[1]["value_span"], bad[0]["value_span"]
    with pytest.raises(AssertionError, match=s.id):
        check_multi_spans(tok, dataclasses.replace(s, meta={**s.meta, "needles": bad}))
    other = (s.meta["target_index"] + 1) % len(needles)
    with pytest.raises(AssertionError, match=s.id):
        check_multi_spans(tok, dataclasses.replace(s, needle_span=needles[other]["span"]))
    bad = [dict(nd) for nd in needles]
    bad[2]["span"] = bad[1]["span"]
    with pytest.raises(AssertionError, match=s.id):
        check_multi_spans(tok, dataclasses.replace(s, meta={**s.meta, "needles": bad}))


def test_key_lists_are_clean():
    """Keys must not occur in the haystack (a key in the essays would be an unplanned distractor)
    nor inside one another (the question would name two keys at once)."""
    text = haystack_text().lower()
    for key in mn.MAGIC_KEYS:
        assert re.search(rf"\b{key}", text) is None, key
    for pool in (mn.MAGIC_KEYS, mn.DISTRACTOR_PLACES):
        assert len(set(pool)) == len(pool)
        for a in pool:
            for b in pool:
                assert a == b or a not in b, (a, b)
    assert "vault" not in mn.DISTRACTOR_PLACES


def test_too_many_needles_for_distinct_first_tokens_raises(tok):
    """SmolLM2 writes digits one per token: 4-digit values have only 9 distinct first tokens."""
    with pytest.raises(ValueError, match="first answer tokens differ.*fewer needles"):
        build_multi_samples(tok, MultiSweep("multi_key", (1000,), (0.5,), 1, n_needles=10))
    ok = build_multi_samples(tok, MultiSweep("multi_value", (1000,), (0.5,), 1, n_needles=10))  # no distractors
    assert len(ok[0].meta["needles"]) == 10 and ok[0].meta["distractor_first_ids"] == []
