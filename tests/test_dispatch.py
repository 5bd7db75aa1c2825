"""Unit tests of the big-model loading path: a local ``save_pretrained`` directory loaded in bf16,
the same model dispatched by accelerate with an explicit device map (layers on ``cpu`` and
offloaded to ``disk``), and capture, ablation, identification and teacher-forced evaluation giving
exactly what the plain model gives; ``max_memory`` parsing. Tests that need CUDA (4-bit, two GPUs)
are marked ``gpu`` and skip without it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from rh.ablation import ablate
from rh.attention import capture_attention, keep_rows
from rh.batching import make_batches
from rh.evaluate import teacher_forced
from rh.heads import Head
from rh.models import load_model, parse_max_memory
from rh.scoring import score_samples


# embeddings, layers 0 and 2, the norm and the head in memory; layers 1 and 3 read from disk per forward
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
              "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
# heads in a layer held in memory and in both offloaded layers
HEADS = [Head(0, 1), Head(1, 0), Head(1, 5), Head(3, 2), Head(3, 7)]


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return load_model(str(tiny_dir), device="cpu", dtype="bfloat16")  # bf16, as on a GPU or an AMX CPU


@pytest.fixture(scope="module")
def dispatched(tiny_dir, tmp_path_factory):
    return load_model(str(tiny_dir), device_map=DEVICE_MAP, offload_folder=tmp_path_factory.mktemp("offload"),
                      dtype="bfloat16")


@pytest.fixture(scope="module")
def mixed(plain):
    """Passkey prompts of two lengths, so batches are left-padded (attention mask, position ids)."""
    from rh.niah import build_passkey_samples

    return build_passkey_samples(plain.tokenizer, lengths=[96, 128], depths=[0.25, 0.75], n_per_setting=1,
                                 seed=3, max_positions=plain.max_positions)


@pytest.fixture(scope="module")
def base(plain, mixed):
    """Teacher-forced outcomes of the plain model, no intervention (one padded batch)."""
    return teacher_forced(plain, mixed, batch_size=4, progress=False)


def test_local_directory_loads_in_bf16(tiny, plain, mixed):
    assert {p.dtype for p in plain.model.parameters()} == {torch.bfloat16}
    assert plain.provenance["dtype"] == "bfloat16" and plain.spec.kind == "local"
    assert plain.shape == tiny.shape
    # independent reference: the in-memory fp32 model's weights, rounded to bf16
    ref = dict(tiny.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, ref[name].to(torch.bfloat16)), name
    ids = torch.tensor([mixed[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(plain.model(input_ids=ids, logits_to_keep=8).logits.float(),
                              tiny.model(input_ids=ids, logits_to_keep=8).logits, atol=0.05)


def test_dispatch_puts_layers_on_cpu_and_disk(dispatched):
    hf = dispatched.model
    assert set(hf.hf_device_map.values()) == {"cpu", "disk"}
    assert hf.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # not in memory
    assert hf.model.layers[0].self_attn.o_proj.weight.device.type == "cpu"
    assert dispatched.device == torch.device("cpu")
    assert dispatched.provenance["device_map"] == {"cpu": 6, "disk": 2}


def test_plain_forward_is_identical(plain, dispatched, mixed):
    batch = next(iter(make_batches(mixed, 4, plain.tokenizer.pad_token_id)))
    assert batch.padded
    a = plain.model(**batch.model_inputs("cpu"), logits_to_keep=8).logits
    b = dispatched.model(**batch.model_inputs("cpu"), logits_to_keep=8).logits
    assert torch.equal(a, b)


def test_capture_is_identical(plain, dispatched, mixed):
    batch = next(iter(make_batches(mixed, 4, plain.tokenizer.pad_token_id)))
    rows = []
    for m in (plain, dispatched):
        with torch.no_grad(), capture_attention(m.model, keep_rows) as cap:
            m.model(**batch.model_inputs("cpu"), logits_to_keep=1, use_cache=False)
        rows.append(cap.step(0))
    for layer, (a, b) in enumerate(zip(*rows)):
        assert a.shape == (len(mixed), 8, batch.input_ids.shape[1]), layer
        assert torch.equal(a, b), layer
    sa = score_samples(plain, mixed, "sum_attention", batch_size=4, progress=False)
    sb = score_samples(dispatched, mixed, "sum_attention", batch_size=4, progress=False)
    assert (sa.scores == sb.scores).all() and sa.scores.max() > 0


def test_teacher_forced_is_identical(dispatched, mixed, base):
    pd.testing.assert_frame_equal(teacher_forced(dispatched, mixed, batch_size=4, progress=False), base,
                                  check_exact=True)


def test_ablation_is_identical(plain, dispatched, mixed, base):
    for method in ("zero", "query", "logits"):
        with ablate(plain, HEADS, method):
            a = teacher_forced(plain, mixed, condition=method, batch_size=4, progress=False)
        with ablate(dispatched, HEADS, method):
            b = teacher_forced(dispatched, mixed, condition=method, batch_size=4, progress=False)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=method)
        assert (a["logprob"] != base["logprob"]).any(), method  # the ablation did something
    # every hook is gone: the dispatched model is back to the plain baseline
    pd.testing.assert_frame_equal(teacher_forced(dispatched, mixed, batch_size=4, progress=False), base,
                                  check_exact=True)


def test_capture_under_ablation_is_identical(plain, dispatched, mixed):
    batch = next(iter(make_batches(mixed, 4, plain.tokenizer.pad_token_id)))
    rows = []
    for m in (plain, dispatched):
        with torch.no_grad(), ablate(m, HEADS, "logits"), capture_attention(m.model, keep_rows) as cap:
            m.model(**batch.model_inputs("cpu"), logits_to_keep=1, use_cache=False)
        rows.append(cap.step(0))
    for a, b in zip(*rows):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- max_memory


def test_parse_max_memory():
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    assert parse_max_memory({0: "70GiB", "1": "70GiB", "cpu": "100GiB"}) == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    assert parse_max_memory("70GiB", n_gpus=2) == {0: "70GiB", 1: "70GiB"}
    assert parse_max_memory("70GiB,cpu=100GiB", n_gpus=2) == {0: "70GiB", 1: "70GiB", "cpu": "100GiB"}
    assert parse_max_memory("0=70GiB, cuda:1=60GB, CPU=100GiB") == {0: "70GiB", 1: "60GB", "cpu": "100GiB"}
    assert parse_max_memory({0: 10**9}) == {0: 10**9}


@pytest.mark.parametrize("bad, match", [("lots", "not a size"), ("gpu0=70GiB", "unknown device"),
                                        ({0: "70 parsecs"}, "not a size"), (70, "give a dict")])
def test_parse_max_memory_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_max_memory(bad, n_gpus=1)


def test_max_memory_for_every_gpu_needs_a_gpu():
    with pytest.raises(ValueError, match="none is visible"):
        parse_max_memory("70GiB", n_gpus=0)


def test_max_memory_without_a_device_map_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="max_memory caps"):
        load_model(str(tiny_dir), device="cpu", max_memory={"cpu": "1GiB"})


def test_device_map_for_the_random_model_is_refused():
    with pytest.raises(ValueError, match="save_pretrained"):
        load_model("tiny-llama", device_map={"": "cpu"})


# --------------------------------------------------------------------------- CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@cuda
def test_4bit_local_directory(tiny_dir, mixed):
    pytest.importorskip("bitsandbytes")
    q = load_model(str(tiny_dir), quant="4bit")
    assert q.provenance["quant"] == "4bit"
    assert any("4bit" in type(m).__name__ for m in q.model.modules())
    df = teacher_forced(q, mixed, batch_size=2, progress=False)
    assert len(df) == len(mixed) and df["logprob"].notna().all()
    with ablate(q, HEADS, "zero"):  # the o_proj pre-hook works on a quantized linear layer too
        teacher_forced(q, mixed, batch_size=2, progress=False)


@pytest.mark.gpu
@cuda
def test_auto_device_map_on_cuda_matches_cuda_model(tiny_dir, mixed):
    one = load_model(str(tiny_dir), device="cuda:0")
    auto = load_model(str(tiny_dir), max_memory={0: "10GiB", "cpu": "10GiB"})  # device_map="auto"
    pd.testing.assert_frame_equal(teacher_forced(one, mixed, batch_size=4, progress=False),
                                  teacher_forced(auto, mixed, batch_size=4, progress=False), check_exact=True)


@pytest.mark.gpu
@two_gpus
def test_two_gpus_exact(tiny_dir, mixed):
    one = load_model(str(tiny_dir), device="cuda:0")
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
             "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    two = load_model(str(tiny_dir), device_map=split)
    assert set(two.model.hf_device_map.values()) == {0, 1}
    for method in ("zero", "query", "logits"):
        with ablate(one, HEADS, method):
            a = teacher_forced(one, mixed, condition=method, batch_size=4, progress=False)
        with ablate(two, HEADS, method):
            b = teacher_forced(two, mixed, condition=method, batch_size=4, progress=False)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    sa = score_samples(one, mixed, "sum_attention", batch_size=4, progress=False)
    sb = score_samples(two, mixed, "sum_attention", batch_size=4, progress=False)
    assert (sa.scores == sb.scores).all()
