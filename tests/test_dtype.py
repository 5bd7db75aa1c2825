"""Unit tests of the dtype choice (issue: the default run on any CPU): bf16 where the hardware
multiplies it natively, fp32 where torch would emulate it, and the choice in the provenance. The
CPU's flags, architecture and matmul probe are injected, so both kinds of CPU are covered here."""

from __future__ import annotations

import pytest
import torch

from rh.models import choose_dtype, cpu_flags, load_model, resolve_dtype
from rh.pipeline import identification_dtype, identification_model


AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}  # the AMD EPYC CI machine's kind
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def _no_probe():
    raise AssertionError("x86 flags were readable: the probe must not run")


@pytest.mark.parametrize("flags, want", [
    (SAPPHIRE_RAPIDS, torch.bfloat16),
    (AVX2_ONLY | {"avx512_bf16"}, torch.bfloat16),  # AVX-512 BF16 without AMX (Zen 4, Cooper Lake)
    (AVX2_ONLY | {"amx_bf16"}, torch.bfloat16),
    (AVX2_ONLY, torch.float32),
    (AVX2_ONLY | {"avx512f", "avx512bw"}, torch.float32),  # AVX-512 without its BF16 extension
])
def test_x86_flags_decide(flags, want):
    choice = choose_dtype("cpu", flags=flags, machine="x86_64", probe=_no_probe)
    assert choice.dtype == want
    if want == torch.float32:
        assert "emulated" in choice.reason
    else:
        assert "native bf16" in choice.reason and any(f in choice.reason for f in ("amx_bf16", "avx512_bf16"))


@pytest.mark.parametrize("ratio, want", [(0.4, torch.bfloat16), (1.0, torch.bfloat16), (4.3, torch.float32)])
def test_unreadable_flags_fall_back_to_the_matmul_probe(ratio, want):
    choice = choose_dtype("cpu", flags=None, read_flags=False, machine="x86_64", probe=lambda: ratio)
    assert choice.dtype == want and f"{ratio:.2f}x" in choice.reason and "unreadable" in choice.reason


def test_non_x86_cpus_are_probed_whatever_their_flags_say():
    calls = []
    choice = choose_dtype("cpu", flags={"fp", "asimd", "bf16"}, machine="aarch64",
                          probe=lambda: calls.append(1) or 3.0)
    assert calls == [1] and choice.dtype == torch.float32 and "aarch64" in choice.reason


def test_cuda_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_dtype("cuda", probe=_no_probe).dtype == torch.bfloat16
    assert choose_dtype("cuda:1", probe=_no_probe).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert choose_dtype("cuda", probe=_no_probe).dtype == torch.float16


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu avx2 fma\n")
    assert cpu_flags(info) == {"fpu", "avx2", "fma"}
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(tmp_path / "arm") == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "absent") is None


def test_this_machines_choice_agrees_with_its_flags():
    """The default path on whatever CPU runs the tests: the flags it reports give the dtype."""
    import platform

    flags = cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("not an x86 Linux machine: the probe decides here")
    native = bool({"amx_bf16", "avx512_bf16"} & flags)
    assert choose_dtype("cpu").dtype == (torch.bfloat16 if native else torch.float32)


def test_explicit_dtype_wins_and_says_so():
    c = resolve_dtype("bfloat16", "cpu")
    assert c.dtype == torch.bfloat16 and "asked for" in c.reason
    assert resolve_dtype("fp32", "cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("int4", "cpu")


def test_float16_on_a_cpu_is_loaded_as_asked_with_the_warning_in_its_reason():
    """The reason goes to the terminal line and the report's provenance: a CPU run in float16 says
    why it is slow and where it can overflow, and what to pass instead."""
    c = resolve_dtype("float16", "cpu")
    assert c.dtype == torch.float16 and "asked for" in c.reason
    assert "no native float16" in c.reason and "--dtype auto" in c.reason
    assert "CPU" not in resolve_dtype("float16", "cuda").reason


def test_local_model_loads_in_the_chosen_dtype_with_the_reason(tiny_dir, monkeypatch):
    import rh.models as models

    for flags, want in ((AVX2_ONLY, "float32"), (SAPPHIRE_RAPIDS, "bfloat16")):
        monkeypatch.setattr(models, "cpu_flags", lambda f=flags: f)
        monkeypatch.setattr(models.platform, "machine", lambda: "x86_64")
        m = load_model(str(tiny_dir), device="cpu")
        assert m.provenance["dtype"] == want
        assert {p.dtype for p in m.model.parameters()} == {getattr(torch, want)}
        assert m.provenance["dtype_reason"] == choose_dtype("cpu", flags=flags, machine="x86_64").reason


def test_rankings_are_identified_in_float32_on_the_cpu_whatever_the_session_dtype(tiny_dir):
    """A bf16 CPU session computes rankings with the weights loaded again in fp32, so the ranking
    (and its cache key) is the one an fp32 machine computes."""
    bf = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    fp = load_model(str(tiny_dir), device="cpu", dtype="float32")
    assert identification_dtype(bf) == identification_dtype(fp) == "float32"
    assert identification_model(fp, "float32") is fp
    twin = identification_model(bf, "float32")
    assert twin is not bf and identification_model(bf, "float32") is twin  # loaded once
    for (n, a), (_, b) in zip(twin.model.named_parameters(), fp.model.named_parameters()):
        assert torch.equal(a, b), n


def test_the_float32_twin_identification_runs_on_is_billed_to_the_sessions_counter(tiny_dir):
    """The passes of the twin (a bf16 CPU session's identification) are the session's: a counter
    attached to the model counts them, under the label running, as it counts the model's own."""
    from rh.budget import TokenLayerCounter

    bf = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    counter = TokenLayerCounter()
    handle = counter.attach(bf.model)
    twin = identification_model(bf, "float32")
    ids = torch.ones(2, 7, dtype=torch.long)
    with counter.charged_to("fixture:ranking"), torch.no_grad():
        twin.model(ids)
    assert counter.counts == {"fixture:ranking": 2 * 7 * twin.shape.n_layers}
    handle.remove()  # off the model: its own passes are no longer counted
    assert identification_model(bf, "float32") is twin
    with torch.no_grad():
        bf.model(ids)
    assert counter.total == 2 * 7 * twin.shape.n_layers


def test_the_report_says_which_dtype_and_why():
    from rh.report import provenance, render_html

    meta = {"model": "smollm2-135m", "dtype": "bfloat16", "dtype_reason": "CPU reports amx_bf16: native bf16 matmul",
            "ranking": {"provenance": {"dtype": "float32"}},
            "cost": {"total": 1234567, "seconds_per_token_layer": 8.1e-5}}
    prov = provenance(meta)
    assert prov["dtype"] == "bfloat16" and prov["dtype chosen because"] == meta["dtype_reason"]
    assert prov["rankings identified in"] == "float32"
    assert prov["forward passes"].startswith("1,234,567 token-layers") and "81.00 us" in prov["forward passes"]
    html = render_html([], meta)
    assert "native bf16 matmul" in html and "1,234,567 token-layers" in html
    same = provenance({**meta, "dtype": "float32"})
    assert "rankings identified in" not in same  # said only when it differs from the session's dtype
