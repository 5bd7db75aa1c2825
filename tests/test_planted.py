"""The planted positive control (rh.planted, #33): a Llama whose retrieval heads are set by hand.

Each test checks the construction against an independent computation: attention read off the
model's own eager forward, retrieval scored on rh's real prompts, the deterministic build compared
weight by weight."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from rh.ablation import Ablation
from rh.heads import Head
from rh.models import REGISTRY, load_model, planted_model
from rh.niah import Sweep, build_samples
from rh.planted import CIRCUIT_HEADS, PLANTED_HEADS, PLANTED_SHAPE, PREVIOUS_TOKEN_HEADS, control_heads, recovery
from rh.runner import run_one

pytestmark = pytest.mark.unit

TASKS = ("passkey", "employee_count", "hq_state", "inc_state", "inc_year")


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def planted():
    return load_model("planted")


@pytest.fixture(scope="module")
def twin():
    return load_model("planted-twin")


@pytest.fixture(scope="module")
def prompts(planted):
    """Two prompts of every task at 256 tokens, needles at three depths (a seed of their own)."""
    sweep = Sweep((256,), (0.0, 0.5, 1.0), 2, TASKS, 4242)
    return build_samples(planted.tokenizer, sweep, chat=True, max_positions=planted.max_positions)


def _accuracy(model, samples, heads=()) -> float:
    cond = Ablation.baseline() if not heads else Ablation("set", tuple(heads), selection="top")
    return float(run_one(model, samples, cond, batch_size=8)["correct"].mean())


def test_the_build_is_deterministic_and_the_registry_shape(planted):
    """Bug caught: a build that draws from the global RNG (two builds differ) or a registry shape
    that disagrees with the weights (claims parametrized at collection from the wrong grid)."""
    again = planted_model()
    assert _digest(again) == _digest(planted)
    assert _digest(planted_model(seed=1)) != _digest(planted)
    assert planted.shape == PLANTED_SHAPE == REGISTRY["planted"].shape == REGISTRY["planted-twin"].shape
    assert planted.provenance["planted_heads"] == [str(h) for h in PLANTED_HEADS]


def test_each_previous_token_head_attends_to_its_offset(planted):
    """The rotary construction: read the attention weights off the model's own eager forward on
    random tokens and check that previous-token head d puts its mass on position i - d at every
    position i >= d. Bug caught: a rotary phase of the wrong sign or pair layout (HF's rotate_half
    pairs dim f with f + head_dim/2), which would make the head attend elsewhere."""
    eager = planted_model(attn_implementation="eager")
    ids = torch.randint(100, 40_000, (1, 600), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        att = eager.model(input_ids=ids, output_attentions=True).attentions[0][0]  # [heads, q, k]
    for d, heads in PREVIOUS_TOKEN_HEADS.items():
        for head in heads:
            probs = att[head.head].float().numpy()
            rows = np.arange(d, probs.shape[0])
            assert (probs[rows].argmax(axis=1) == rows - d).all()
            assert probs[rows, rows - d].min() > 0.99


def test_the_planted_heads_retrieve_and_only_they(planted, prompts):
    """On rh's real prompts of every task: the model retrieves; the four planted heads ablated
    together, it does not; any three of them ablated, it still does (each copies in full: redundancy
    by construction); a control set of 10 heads outside the circuit ablated, it still does; one
    offset-1 previous-token head ablated, it still does, both, it does not (the circuit needs them,
    though they are no retrieval heads). Bug caught: a planted head wired to the wrong subspace, a circuit that does
    not depend on the heads it names, or a control set that touches the circuit."""
    assert _accuracy(planted, prompts) >= 0.9
    assert _accuracy(planted, prompts, PLANTED_HEADS) <= 0.1
    assert _accuracy(planted, prompts, PLANTED_HEADS[1:]) >= 0.9
    assert _accuracy(planted, prompts, control_heads(10)) >= 0.9
    assert _accuracy(planted, prompts, PREVIOUS_TOKEN_HEADS[1][:1]) >= 0.9
    assert _accuracy(planted, prompts, PREVIOUS_TOKEN_HEADS[1]) <= 0.2


def test_the_unplanted_twin_retrieves_nothing(twin, prompts):
    """The twin (every head drawn like the non-circuit heads) answers no prompt. Bug caught: a twin
    that keeps part of the circuit and so is no negative control."""
    assert twin.shape == PLANTED_SHAPE
    assert _accuracy(twin, prompts) == 0.0
    assert twin.provenance["planted_heads"] == []


def test_sum_attention_recovers_the_planted_heads(planted, prompts):
    """The positive control's purpose, on a few prompts: sum attention's top 4 are the planted
    heads. Bug caught: planted heads that do not attend to the needle (a circuit that would make
    every identification method look wrong)."""
    from rh.scoring import identify

    ranking = identify(planted, [s for s in prompts if s.task == "passkey"], "sum_attention", progress=False)
    assert set(ranking.top(len(PLANTED_HEADS))) == set(PLANTED_HEADS)


def test_recovery_counts_against_a_hand_computation():
    """Recall and precision by hand: a ranking with two planted heads in its top 4 and one at 6."""
    ranked = [Head(2, 5), Head(0, 0), Head(4, 2), Head(1, 1), Head(1, 2), Head(3, 14), Head(5, 9)]
    got = recovery(ranked, k=4)
    assert got["recall"] == 0.5 and got["precision"] == 0.5 and got["k"] == 4
    assert got["ranks"] == {"L2H5": 1, "L3H14": 6, "L4H2": 3, "L5H9": 7}
    assert recovery(ranked[:4] + ranked[4:], k=7)["recall"] == 1.0
    assert recovery(["L2H5", "L3H14", "L4H2", "L5H9"])["precision"] == 1.0
    with pytest.raises(ValueError, match="the ranking has 2 heads"):
        recovery(ranked[:2], k=4)


def test_control_heads_avoid_the_circuit_and_are_seeded():
    a, b = control_heads(10), control_heads(10)
    assert a == b and len(set(a)) == 10 and not set(a) & set(CIRCUIT_HEADS)
    assert control_heads(10, seed=1) != a
    with pytest.raises(ValueError, match="outside the circuit"):
        control_heads(PLANTED_SHAPE.n_total)


def test_ranked_by_scores_weights_the_inputs_as_the_identification_does():
    """Hand computation on a 1 x 3 grid: input 0 favours head 2, input 1 head 0; with input 1
    weighted out (Wu24's filter), head 2 comes first; ties go to the lower index."""
    from rh.heads import HeadShape
    from rh.planted import ranked_by_scores

    shape = HeadShape(1, 3, 1, 4)
    scores = np.array([[[0.1, 0.0, 0.9]], [[1.0, 0.0, 0.0]]])
    assert ranked_by_scores(scores, shape) == [Head(0, 0), Head(0, 2), Head(0, 1)]
    assert ranked_by_scores(scores, shape, np.array([1.0, 0.0])) == [Head(0, 2), Head(0, 0), Head(0, 1)]
    assert ranked_by_scores(np.zeros((2, 1, 3)), shape) == [Head(0, 0), Head(0, 1), Head(0, 2)]
    with pytest.raises(ValueError, match="no input counts"):
        ranked_by_scores(scores, shape, np.zeros(2))


def test_planted_heads_come_from_the_provenance(planted, twin):
    from rh.planted import planted_heads

    assert planted_heads(planted) == PLANTED_HEADS
    assert planted_heads(twin) == ()
    assert planted_heads(object()) == ()
    # the registry says the same without building (what --plan reads): the built model's spec and provenance agree
    assert tuple(Head.parse(h) for h in planted.spec.planted_heads) == planted_heads(planted)
    assert twin.spec.planted_heads == ()


def test_the_recovery_figure_draws_from_id7_rows_and_only_there():
    """The report's figure reads ID-7 rows' planted_recovery; rows without it draw nothing (every
    model but the planted one)."""
    from rh.catalogue.identification import planted_recovery_figure

    rec = recovery([*PLANTED_HEADS, Head(0, 0)])
    rows = [{"claim": "ID-7", "params": {"method": "echo", "k": 10}, "status": "refuted",
             "details": {"planted_recovery": {"sum_attention": rec, "echo": recovery([Head(0, 0), *PLANTED_HEADS])}}}]
    png = planted_recovery_figure(rows)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert planted_recovery_figure([{**rows[0], "details": {}}]) is None


def test_the_plan_reads_the_planted_config_without_building(planted):
    """``--plan`` reads the dimensions without weights: the config it reads is the built model's.
    Bug caught: the planner taking the planted model for a tiny-<family> model (it refused with
    "unknown model family 'planted'", and timed nothing)."""
    from rh.plan import model_config

    cfg, built = model_config("planted"), planted.model.config
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rope_parameters"):
        assert getattr(cfg, name) == getattr(built, name), name
