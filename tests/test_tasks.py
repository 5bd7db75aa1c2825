"""Tasks, multi-task sweeps and their split, and the inspection CLI, with the bundled tokenizer."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rh.models import bundled_tokenizer
from rh.niah import Sweep, build_samples, main, split_samples
from rh.tasks import FILING_TASKS, TASKS, US_STATES, Task, get_task, register_task



@pytest.fixture(scope="module")
def tok():
    return bundled_tokenizer()


def test_the_registry_has_the_seed_tasks():
    assert {"passkey", "sf_activity", *FILING_TASKS} <= set(TASKS)
    assert get_task("passkey").kind == "numeric" and get_task("sf_activity").kind == "phrase"
    with pytest.raises(ValueError, match="unknown task 'hq_city'.*hq_state"):
        get_task("hq_city")


def test_answers_are_realistic_and_sit_in_their_needle():
    rng = random.Random(0)
    for _ in range(200):
        for name, task in TASKS.items():
            needle, answer = task.make(rng)
            assert needle == task.needle.format(value=answer) and needle.count(answer) >= 1
            if name in ("hq_state", "inc_state"):
                assert answer in US_STATES
            elif name == "inc_year":
                assert 1880 <= int(answer) <= 2015
            elif name == "employee_count":
                assert re.fullmatch(r"\d{1,3}(,\d{3})*", answer) and 150 <= int(answer.replace(",", "")) <= 260_000
            elif name == "passkey":
                assert re.fullmatch(r"\d{4}", answer)


def test_registering_a_task_in_one_place_makes_it_buildable(tok):
    t = Task("fav_color", "My favourite colour is {value}.", "What is my favourite colour?", "My favourite colour is ",
             lambda rng: rng.choice(["teal", "crimson", "ochre"]), "categorical")
    try:
        register_task(t)
        with pytest.raises(ValueError, match="already registered"):
            register_task(t)
        (s,) = build_samples(tok, Sweep((200,), (0.5,), 1, ("fav_color",)))
        assert tok.decode(list(s.answer_ids)).strip() == s.answer
    finally:
        TASKS.pop("fav_color", None)
    with pytest.raises(ValueError, match="exactly once"):
        Task("bad", "no slot", "q?", "a ", lambda rng: "x", "phrase")
    with pytest.raises(ValueError, match="space"):
        Task("bad", "{value}", "q?", "a", lambda rng: "x", "phrase")


@settings(max_examples=20, deadline=None)
@given(task=st.sampled_from(sorted(TASKS)), length=st.integers(160, 1500), depth=st.floats(0.0, 1.0),
       chat=st.booleans(), seed=st.integers(0, 10**6))
def test_every_task_gives_exact_length_and_true_spans(tok, task, length, depth, chat, seed):
    (s,) = build_samples(tok, Sweep((length,), (depth,), 1, (task,), seed), chat=chat)
    assert len(s.input_ids) == length
    a, b = s.needle_span
    assert tok.decode(list(s.input_ids[a:b])).strip() == s.needle
    x, y = s.answer_span
    assert a <= x < y <= b
    assert s.answer in tok.decode(list(s.input_ids[x:y]))
    # the answer span is minimal: dropping either end token loses part of the answer
    assert s.answer not in tok.decode(list(s.input_ids[x + 1 : y]))
    assert s.answer not in tok.decode(list(s.input_ids[x : y - 1]))
    # the teacher-forced answer is the answer, and the prompt ends where the answer starts
    assert tok.decode(list(s.answer_ids)).strip() == s.answer
    full = tok.decode(list(s.input_ids) + list(s.answer_ids))
    assert full.endswith(get_task(task).answer_prefix.rstrip() + " " + s.answer)


def test_tasks_of_one_group_share_the_window_and_differ_in_the_needle(tok):
    sweep = Sweep((400,), (0.3, 0.8), 3, ("passkey", "hq_state", "inc_year"), seed=5)
    samples = build_samples(tok, sweep)
    assert len(samples) == 2 * 3 * 3 and len({s.id for s in samples}) == len(samples)
    by_group: dict[str, list] = {}
    for s in samples:
        by_group.setdefault(s.group, []).append(s)
    assert len(by_group) == 6
    for group in by_group.values():
        assert {s.task for s in group} == set(sweep.tasks)
        # window starts agree up to the small difference in room each needle leaves
        starts = [s.window_start for s in group]
        assert max(starts) - min(starts) <= 0.001 * 150_000 + 1
    assert build_samples(tok, sweep) == samples  # reproducible


def test_the_split_never_leaks_ids_windows_or_needle_values(tok):
    sweep = Sweep((300, 420), (0.0, 0.5, 1.0), 5, ("passkey", "inc_state"), seed=2)
    samples = build_samples(tok, sweep)
    ident, val = split_samples(samples, frac=0.8, seed=9)
    assert len(ident) + len(val) == len(samples) and val
    assert not {s.id for s in ident} & {s.id for s in val}
    assert not {s.group for s in ident} & {s.group for s in val}
    assert not {(s.window_start, s.answer) for s in ident} & {(s.window_start, s.answer) for s in val}
    assert len({s.group for s in val}) == round(0.2 * len({s.group for s in samples}))


def test_sweep_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown task"):
        Sweep((512,), (0.5,), 1, ("nope",))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        Sweep((512,), (1.5,), 1)
    with pytest.raises(ValueError, match="repeat"):
        Sweep((512,), (0.5,), 1, ("passkey", "passkey"))
    with pytest.raises(ValueError, match="at least one"):
        Sweep((), (0.5,), 1)


def test_cli_prints_the_prompt_with_the_needle_marked(capsys):
    assert main(["--task", "hq_state", "--length", "300", "--depth", "0.5", "--color", "never"]) == 0
    out = capsys.readouterr().out
    marked = re.search(r"»(.*?)«", out, re.S).group(1)
    assert marked.strip().startswith("The Company's principal executive offices are located in the State of")
    assert "task=hq_state length=300" in out and "<|im_start|>assistant" in out


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["--length", "20"]) == 2
    assert "too short" in capsys.readouterr().err
