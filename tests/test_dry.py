"""The dry run (rh.dry, ``--plan``): what each packet and each task declares it would run equals
what the token-layer counter counts when it runs, on the tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest

from rh.ablation import Ablation
from rh.heads import Head


def _counted(model, fn):
    """(fn's result, the token-layers a fresh counter counted while it ran)."""
    from rh.budget import TokenLayerCounter

    counter = TokenLayerCounter()
    handle = counter.attach(model.model)
    try:
        out = fn()
    finally:
        handle.remove()
    return out, counter.total


@pytest.fixture(scope="module")
def task_samples(tiny):
    """Prompts of two tasks and two lengths (mixed widths pad within a batch; answers of several tokens)."""
    from rh.niah import Sweep, build_samples

    return build_samples(tiny.tokenizer, Sweep((96, 128), (0.25, 0.75), 1, ("passkey", "inc_year"), seed=3))


def _same_structure(real, dry):
    """The made-up result has the real one's type, keys and array shapes (so the claim's code that
    reads it runs as on a real result)."""
    assert type(dry) is type(real) or (isinstance(real, tuple) and isinstance(dry, tuple)), (type(real), type(dry))
    if isinstance(real, dict):
        assert set(dry) == set(real)
        for k in real:
            _same_structure(real[k], dry[k])
    elif isinstance(real, tuple):
        assert len(dry) == len(real)
        for a, b in zip(real, dry):
            _same_structure(a, b)
    elif isinstance(real, np.ndarray):
        assert dry.shape == real.shape and dry.dtype.kind == real.dtype.kind
    elif isinstance(real, list):
        assert len(dry) == len(real)


def test_the_dry_executor_counts_each_packet_as_the_counter_counts_it(tiny, task_samples):
    """Rows of a clean and an ablated unit, side-by-side rows, and prompt-only reads through a
    layer: the dry executor's token-layers per packet are the counter's in a plain run here, and
    its rows are rows the runner accepts (clean ones correct)."""
    from rh.budget import plain_passes
    from rh.dry import DryExecutor
    from rh.runner import LocalExecutor, valid_row
    from rh.scoring import SumAttentionReading
    from rh.units import Unit, plan_packets, prompt_packets

    by_id = {s.id: s for s in task_samples}
    ids = tuple(by_id)
    units = [Unit(Ablation.baseline(), ids), Unit(Ablation("two", (Head(1, 2), Head(3, 0))), ids[1:]),
             Unit(Ablation("one", (Head(2, 5),)), ids[:3]), Unit(Ablation("other", (Head(0, 1),)), ids[2:])]
    dry = DryExecutor(tiny)
    with plain_passes():
        packets = plan_packets(units, by_id, 3)
        assert any(p.condition is None for p in packets)  # side-by-side rows are among them
        for p in packets:
            (real,), counted = _counted(tiny, lambda: list(LocalExecutor(tiny).execute([p], by_id, [])))
            (done,) = dry.execute([p], by_id, [])
            assert done.token_layers == counted > 0
            assert [valid_row(r) for r in done.scores] == list(done.scores)
            for (j, _), row in zip(p.rows, done.scores):
                if j == 0:
                    assert row[0] is True  # no intervention: correct, so no floor skips the rest
    reading = SumAttentionReading(tiny.shape.n_layers, tiny.shape.n_heads)
    for through in (None, 1):
        for p in prompt_packets(task_samples, 3, through=through):
            _, counted = _counted(tiny, lambda: list(LocalExecutor(tiny).execute([p], by_id, [], reading)))
            (done,) = dry.execute([p], by_id, [], reading)
            assert done.token_layers == counted > 0
            assert len(done.read) == len(p.rows) and all(len(r) == reading.width for r in done.read)
    assert dry.tallies[""].rows  # what ran, by condition


def _tasks(tiny, donor, samples):
    from rh.attribution import AttributionTask
    from rh.causal import HeadOutputsTask
    from rh.content_free import EchoInductionTask
    from rh.interventions import TransplantTask, take_donor_heads
    from rh.scoring import QRHeadOptions, ScoreBatchTask, Wu24Options

    ids = tuple(s.id for s in samples)
    heads = (Head(1, 3), Head(2, 0))
    return [
        TransplantTask(ids, heads, take_donor_heads(donor, heads), 3),
        HeadOutputsTask(ids[:3], heads, "query", 2),
        HeadOutputsTask(ids[:2], heads, None, 8),
        EchoInductionTask(5, 12, 3, 7, True, 1, 4),
        EchoInductionTask(3, 10, 2, 1, False, 0, 3),
        ScoreBatchTask(ids[:3], "wu24", Wu24Options()),
        ScoreBatchTask(ids[1:], "wu24", Wu24Options(extra_tokens=2)),
        ScoreBatchTask(ids[:3], "qrhead", QRHeadOptions()),
        ScoreBatchTask(ids[:3], "qrhead", QRHeadOptions(reuse_prefix=False)),
        ScoreBatchTask(ids[:3], "qrhead", QRHeadOptions(calibrate=False)),
        ScoreBatchTask(ids[:2], "sum_attention", None),
        AttributionTask(ids[0], heads, 4),
        AttributionTask(ids[1], (Head(0, 2),), 3, internal_batch_size=2),
        AttributionTask(ids[2], None, 2),
    ]


def test_each_task_declares_the_token_layers_its_run_counts(tiny, task_samples):
    """Every kind of task the catalogue hands the runner (IV-4's transplant, CA-5's heads' outputs,
    ID-7's echo and induction sequences, Wu24's generation, QRHead's passes with and without its
    calibration and prefix reuse, IV-6's integrated gradients with heads, in chunks, and of the
    full logit): ``dry`` gives the token-layers the counter counts when ``run`` runs it, and a
    result shaped as the real one. Wu24's bound is the generation to its last step: equal where no
    row stops early (the tiny random model never emits its end token here)."""
    from rh.models import tiny_llama

    donor = tiny_llama(seed=5)
    by_id = {s.id: s for s in task_samples}
    kinds = set()
    for task in _tasks(tiny, donor, task_samples):
        real, counted = _counted(tiny, lambda: task.run(tiny, by_id))
        made_up, declared = task.dry(tiny, by_id)
        assert declared == counted > 0, (task, declared, counted)
        if type(task).__name__ == "AttributionTask":
            assert made_up.token_attr.shape == real.token_attr.shape and made_up.completeness_error == 0.0
        else:
            _same_structure(real, made_up)
        kinds.add(type(task).__name__)
    assert len(kinds) == 5


def test_a_task_without_a_dry_run_is_not_planned_rather_than_free(tiny, task_samples):
    from rh.dry import DryExecutor, NotPlanned

    class Opaque:
        sample_ids = ()

        def run(self, model, by_id):
            return 0

    with pytest.raises(NotPlanned, match="Opaque declares no dry run"):
        list(DryExecutor(tiny).call([Opaque()], {}))
