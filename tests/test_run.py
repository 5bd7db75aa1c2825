"""rh.run.Run, the pytest-free run the plugin, rh audit and rh identify hold: the model loaded once
with its counter, the runner and prefix cache while it is open, verdicts and the report, and
nothing left on the model once it is closed."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = pytest.mark.unit


def test_the_run_loads_once_counts_runs_units_and_leaves_nothing_on_the_model(tmp_path):
    """Catches a second load, a counter that misses the runner's passes (or counts another model's),
    a runner or prefix cache left active after close, and hooks left on the model."""
    import rh.catalogue  # noqa: F401 - CA-1's figure
    from rh.ablation import Ablation
    from rh.evaluate import teacher_forced
    from rh.heads import Head
    from rh.niah import Sweep, build_samples
    from rh.prefix import active_cache
    from rh.run import Run
    from rh.report import summarize
    from rh.runner import runner_for
    from rh.units import Unit

    with Run("tiny-llama", model_kwargs={"dtype": "float32"}, command="a test") as run:
        assert run.model is None and "pytest" not in vars(sys.modules["rh.run"])  # no pytest in a Run
        model = run.load()
        assert run.load() is model and run.loaded_at is not None
        assert runner_for(model) is run.runner and active_cache(model) is run.prefix is not None
        samples = build_samples(model.tokenizer, Sweep((128,), (0.5,), 3, ("passkey",), 0), chat=model.instruct,
                                max_positions=model.max_positions)
        n_layers = model.shape.n_layers
        before = run.counter.total
        frames = run.runner.run({s.id: s for s in samples},
                                [Unit(Ablation.baseline(), tuple(s.id for s in samples)),
                                 Unit(Ablation("top1", (Head(1, 0),)), tuple(s.id for s in samples))])
        assert [len(f) for f in frames] == [3, 3]
        direct = teacher_forced(model, samples, condition="baseline")
        assert frames[0]["correct"].tolist() == direct["correct"].tolist()
        assert run.counter.total - before >= 2 * 3 * 128 * n_layers  # two conditions x 3 prompts, counted
        assert run.cost()["total"] == run.counter.total
        other = run.load_other("tiny-llama")
        assert other is not model and run.load_other("tiny-llama") is other
        counted = run.counter.total
        teacher_forced(other, samples[:1], condition="other model")
        assert run.counter.total == counted  # the second model's passes are not the run's
        row = run.record({"claim": "CA-1", "params": {"k": 1}, "status": "supported", "details": {
            "top_accuracy": 0.2, "random_accuracy": 0.8, "baseline_accuracy": 0.9}})
        assert run.verdicts == [row] and summarize(run.verdicts)["supported"] == 1
        html, js = sorted(run.write_report(tmp_path, "r", meta={"model": "tiny-llama"}), key=lambda p: p.suffix)
        data = json.loads(js.read_text())
        assert data["meta"]["command"] == "a test" and data["meta"]["hardware"]["cpu_count"] >= 1
        assert data["meta"]["layout"]["executor"] == "local" and data["meta"]["architecture"]["model_type"] == "llama"
        assert "accuracy vs heads ablated" in html.read_text()  # the registered family's figure
    assert runner_for(model) is not run.runner and active_cache(model) is None
    from rh.models import decoder_layers

    assert sum(len(layer._forward_pre_hooks) for layer in decoder_layers(model.model)) == 0
    closed = Run("tiny-llama")
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.load()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2"])
def test_the_architecture_the_report_states_is_read_from_the_config(family):
    """Each tested family's tiny config is stated with the attention features rh.models.FAMILIES
    declares for it (read independently, from the config alone), and the report's provenance names
    the family. Catches a feature the capture must respect (a sliding window, soft-capping, QK-norm,
    qkv biases, partial rotary) going unstated, and a family rh tests shown as untested."""
    from rh.models import FAMILIES, attention_features, tiny_config
    from rh.report import provenance

    arch = attention_features(tiny_config(family))
    assert arch["tested_family"] == family
    stated = " ".join(arch["features"])
    for declared in FAMILIES[family].features:
        key = next((k for k in ("sliding window", "logit soft-capping", "QK-norm", "qkv biases", "partial rotary",
                                "GQA") if k in declared), None)
        if key is not None:
            assert key in stated, (family, declared, stated)
    line = provenance({"architecture": arch})["architecture"]
    assert line.startswith(arch["model_type"]) and f"the {family} family rh tests" in line
    assert "mixture of experts" not in stated


def test_a_model_of_an_untested_family_says_so():
    import transformers

    from rh.models import attention_features
    from rh.report import provenance

    moe = attention_features(transformers.MixtralConfig(num_local_experts=8, num_key_value_heads=8))
    assert moe["tested_family"] is None and "mixture of experts (8 experts)" in moe["features"]
    assert "a family rh has no tiny-model tests for" in provenance({"architecture": moe})["architecture"]


def test_each_run_reports_only_the_savings_noted_while_it_was_open():
    """Two runs one after the other, one nested in another (a pytester session inside a unit-test
    session), and runs closed out of order: each reports exactly the savings noted (by hand, here)
    while it was the run opened last, and none after it closed; the process's total has them all,
    a note with no run of this test open included. Catches a ledger shared by the process (a run
    reporting another's savings, or those noted after it closed), and a nested run's savings
    charged to the run around it."""
    from rh.budget import note_saved, saved_token_layers
    from rh.run import Run

    process = saved_token_layers()
    with Run("tiny-llama") as first:
        note_saved("prefix reuse", 100)
        with Run("tiny-llama") as inner:
            note_saved("prefix reuse", 7)
            note_saved("curtailment", 3)
        note_saved("early stopping", 5)
        note_saved("early stopping", 0)
    with Run("tiny-llama") as second:
        note_saved("prefix reuse", 20)
    a, b = Run("tiny-llama"), Run("tiny-llama")
    a.close()  # closed before b: b stays the run open
    note_saved("curtailment", 11)
    b.close()
    note_saved("curtailment", 1000)  # after every run of this test closed
    assert first.saved() == {"prefix reuse": 100, "early stopping": 5}
    assert inner.saved() == {"prefix reuse": 7, "curtailment": 3}
    assert second.saved() == {"prefix reuse": 20}
    assert a.saved() == {} and b.saved() == {"curtailment": 11}
    now = saved_token_layers()
    grew = {k: now[k] - process.get(k, 0) for k in now if now[k] != process.get(k, 0)}
    assert grew == {"prefix reuse": 127, "curtailment": 1014, "early stopping": 5}


def test_a_run_whose_passes_run_elsewhere_is_keyed_by_their_numerics():
    """An executor that runs the passes in other processes names each one's arithmetic; the run's
    numerics (what an expected file keys verdicts by) are theirs, not this process's: one name where
    they agree, each name with its replicas where they do not. Catches the controller's own CPU
    standing for GPU replicas or for replicas on other kinds of node."""
    from rh.models import joined_numerics
    from rh.run import Run
    from rh.runner import LocalExecutor, Runner, use_runner

    class Elsewhere(LocalExecutor):
        name = "elsewhere"

        def __init__(self, model, names):
            super().__init__(model)
            self.names = names

        def numerics(self):
            return list(self.names)

    def factory(names):
        return lambda model: use_runner(model, Runner(model, executor=Elsewhere(model, names)))

    with Run("tiny-llama", model_kwargs={"dtype": "float32"}) as here:
        here.load()
        own = here.meta["numerics"]
    assert own.startswith("float32 on CPU")
    with Run("tiny-llama", model_kwargs={"dtype": "float32"}, runner=factory(["float32 on GPU A"] * 2)) as run:
        run.load()
        assert run.meta["numerics"] == "float32 on GPU A"
    mixed = ["float32 on GPU A", "float32 on GPU B", "float32 on GPU A"]
    with Run("tiny-llama", model_kwargs={"dtype": "float32"}, runner=factory(mixed)) as run:
        run.load()
        assert run.meta["numerics"] == "mixed: float32 on GPU A (replicas 0, 2); float32 on GPU B (replica 1)"
    assert joined_numerics([own]) == own
    with pytest.raises(ValueError, match="no replica"):
        joined_numerics([])
