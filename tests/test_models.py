"""Unit tests of rh.models: the registry, local model directories, dtype and device checks, the
Hugging Face token, and the errors for offline / gated / missing models. Nothing is downloaded:
the hub is put in offline mode and the network is cut off in every test that could reach it."""

from __future__ import annotations

import json
import socket

import huggingface_hub.constants
import pytest
import torch

import rh.models as models
from rh.heads import HeadShape
from rh.models import (
    REGISTRY,
    ModelAccessError,
    ModelSpec,
    _access_error,
    expected_shape,
    hf_token,
    load_model,
    resolve_spec,
    tiny_llama,
)


FAKE_TOKEN = "hf_" + "abcdefghijklmnopqrstuvwxyzABCD"  # 30 letters, never a real token


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Hub offline, an empty HF cache, no token, and DNS cut off (any lookup is recorded and fails).

    huggingface_hub reads HF_HUB_OFFLINE and HF_HOME once, at import; transformers asks
    ``huggingface_hub.constants`` at call time, so the constants are what must be patched.
    """
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env from the working directory
    lookups: list = []

    def refuse(*args, **kwargs):
        lookups.append(args[:1])
        raise OSError("network disabled in unit tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return lookups


def chain_text(exc: BaseException) -> str:
    parts, e = [], exc
    while e is not None and len(parts) < 20:
        parts.append(f"{type(e).__name__}: {e!s} {e!r}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


# ---------------------------------------------------------------- registry and specs


def test_resolve_registry_keys():
    for key, spec in REGISTRY.items():
        got = resolve_spec(key)
        assert got is spec and got.key == key and got.shape is not None
    assert resolve_spec("smollm2-135m").kind == "bundled-gguf"
    assert resolve_spec("tiny-llama").kind == "random"
    assert resolve_spec("llama70b").source == "meta-llama/Llama-3.3-70B-Instruct"
    assert resolve_spec("llama8b-base").instruct is False and resolve_spec("llama8b").instruct is True


@pytest.mark.parametrize("name", ["smollm3", "llama-70b", "a/b/c", "/x", "org/", "org name/model"])
def test_unknown_model_lists_the_registry(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as info:
        resolve_spec(name)
    msg = str(info.value)
    assert repr(name) in msg
    assert all(key in msg for key in REGISTRY)


@pytest.mark.parametrize(
    "name, instruct",
    [("Qwen/Qwen2.5-0.5B-Instruct", True), ("HuggingFaceTB/SmolLM2-135M", False), ("google/gemma-2-2b-it", True)],
)
def test_repo_id_is_a_hub_spec(name, instruct, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = resolve_spec(name)
    assert (spec.kind, spec.source, spec.key, spec.instruct, spec.shape) == ("hub", name, name, instruct, None)


def test_directory_without_config_is_refused(tmp_path):
    empty = tmp_path / "my-model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json") as info:
        resolve_spec(str(empty))
    assert str(empty) in str(info.value)


def test_local_directory_spec(tiny_dir):
    spec = resolve_spec(str(tiny_dir))
    assert (spec.kind, spec.source, spec.key) == ("local", str(tiny_dir.resolve()), "tiny-saved")


def test_expected_shape_of_registry_keys_needs_no_loading(monkeypatch):
    import transformers

    def no_config(*args, **kwargs):
        raise AssertionError("expected_shape fetched a config for a registry key")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_config)
    for key, spec in REGISTRY.items():
        assert expected_shape(key) == spec.shape


def test_registry_shape_of_tiny_llama_is_the_built_models_shape(tiny):
    cfg = tiny.model.config
    built = HeadShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert REGISTRY["tiny-llama"].shape == built == tiny.shape == HeadShape(4, 8, 2, 8)
    q = tiny.model.model.layers[0].self_attn.q_proj.weight
    k = tiny.model.model.layers[0].self_attn.k_proj.weight
    assert q.shape[0] == 8 * 8 and k.shape[0] == 2 * 8  # heads x head_dim rows


def test_registry_shape_of_smollm2_matches_its_gguf_metadata():
    gguf = pytest.importorskip("gguf")
    path = models.bundled_gguf_path(REGISTRY["smollm2-135m"])
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields[name]
        return int(f.parts[f.data[0]][0])

    n_heads = field("llama.attention.head_count")
    shape = HeadShape(field("llama.block_count"), n_heads, field("llama.attention.head_count_kv"),
                      field("llama.embedding_length") // n_heads)
    assert REGISTRY["smollm2-135m"].shape == shape


def test_expected_shape_of_a_local_directory_reads_its_config(tiny_dir, tmp_path):
    assert expected_shape(str(tiny_dir)) == HeadShape(4, 8, 2, 8)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    cfg.update(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=16, hidden_size=96)
    (other / "config.json").write_text(json.dumps(cfg))
    assert expected_shape(str(other)) == HeadShape(3, 6, 3, 16)


# ---------------------------------------------------------------- loading a local directory


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_load_local_directory(tiny, tiny_dir, dtype, torch_dtype):
    m = load_model(str(tiny_dir), device="cpu", dtype=dtype)
    assert m.shape == HeadShape(4, 8, 2, 8) and m.key == "tiny-saved" and m.spec.kind == "local"
    assert {p.dtype for p in m.model.parameters()} == {torch_dtype}
    assert m.provenance["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert m.provenance["revision"].startswith("dir:") and len(m.provenance["revision"]) > 8
    assert m.provenance["device"] == "cpu" and m.device == torch.device("cpu")
    assert not m.model.training and not any(p.requires_grad for p in m.model.parameters())
    text = "The secret passcode for the vault is 3732."
    assert m.tokenizer(text).input_ids == tiny.tokenizer(text).input_ids
    if dtype == "fp32":
        ids = torch.tensor([tiny.tokenizer(text).input_ids])
        with torch.no_grad():
            assert torch.allclose(m.model(ids).logits, tiny.model(ids).logits, atol=1e-6)


def test_local_fingerprint_changes_with_the_directory(tiny_dir, tmp_path):
    import shutil

    copy = tmp_path / "tiny-saved"
    shutil.copytree(tiny_dir, copy)
    a = load_model(str(copy), device="cpu", dtype="fp32").provenance["revision"]
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    (copy / "config.json").write_text(json.dumps(cfg))
    assert load_model(str(copy), device="cpu", dtype="fp32").provenance["revision"] != a


def test_tiny_llama_through_load_model_honours_dtype_and_seed(tiny):
    m = load_model("tiny-llama", device="cpu")
    assert {p.dtype for p in m.model.parameters()} == {torch.float32}
    w = dict(m.model.named_parameters())
    assert all(torch.equal(w[n], p) for n, p in tiny.model.named_parameters())  # seed 0 both times
    b = load_model("tiny-llama", device="cpu", dtype="bf16")
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16} and b.provenance["dtype"] == "bfloat16"
    other = load_model("tiny-llama", device="cpu", seed=1)
    assert not torch.equal(other.model.lm_head.weight, tiny.model.lm_head.weight)


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantization_needs_cuda(quant):
    with pytest.raises(ValueError, match="CUDA"):
        load_model("tiny-llama", device="cpu", quant=quant)


def test_unknown_quant():
    with pytest.raises(ValueError, match="3bit"):
        load_model("tiny-llama", device="cpu", quant="3bit")


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA"):
        load_model("tiny-llama", device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        load_model("tiny-llama", quant="4bit")  # the default device is then the CPU


def test_unknown_dtype(tiny_dir):
    with pytest.raises(ValueError, match="int8"):
        load_model(str(tiny_dir), device="cpu", dtype="int8")


# ---------------------------------------------------------------- the token


def test_hf_token_prefers_the_environment_then_dotenv(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hf_token() is None
    (tmp_path / ".env").write_text(f'OTHER=1\nHF_TOKEN="{FAKE_TOKEN}"\n')
    assert hf_token() == FAKE_TOKEN
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    assert hf_token() == "hf_from_the_environment"
    sub = tmp_path / "deeper" / "still"
    sub.mkdir(parents=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.chdir(sub)
    assert hf_token() == FAKE_TOKEN  # a .env in a parent folder of the working directory counts too


# ---------------------------------------------------------------- offline, gated, missing


def test_offline_load_says_what_to_do(no_network):
    with pytest.raises(ModelAccessError) as info:
        load_model("llama70b", device="cpu")
    msg = str(info.value)
    assert "meta-llama/Llama-3.3-70B-Instruct" in msg
    assert "cache" in msg and "network" in msg and "HF_HOME" in msg
    assert no_network == []  # offline mode was honoured: not even a DNS lookup


def test_offline_expected_shape_of_a_repo_id(no_network):
    with pytest.raises(ModelAccessError, match="someorg/somemodel.*cache"):
        expected_shape("someorg/somemodel")
    assert no_network == []


def test_token_never_appears_in_errors(no_network, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert hf_token() == FAKE_TOKEN
    for call in (lambda: load_model("llama70b", device="cpu"), lambda: expected_shape("someorg/somemodel")):
        with pytest.raises(ModelAccessError) as info:
            call()
        assert FAKE_TOKEN not in chain_text(info.value)
        assert FAKE_TOKEN not in str(info.getrepr())
    assert no_network == []


HUB = ModelSpec("llama70b", "hub", "meta-llama/Llama-3.3-70B-Instruct")


def hub_error(cls_name: str, message: str) -> OSError:
    """A huggingface_hub error as transformers raises it: wrapped in an OSError."""
    import huggingface_hub.errors as errors

    cls = getattr(errors, cls_name)
    inner = cls.__new__(cls)  # skip the HTTP response the real constructor wants
    OSError.__init__(inner, message)
    try:
        try:
            raise inner
        except Exception as e:
            raise OSError(f"You are trying to access {HUB.source}. {message}") from e
    except OSError as outer:
        return outer


def test_gated_without_token_says_accept_the_licence_and_set_hf_token():
    exc = hub_error("GatedRepoError", "403 Client Error. Access to the model is restricted.")
    err = _access_error(HUB, exc, has_token=False)
    assert isinstance(err, ModelAccessError)
    msg = str(err)
    assert HUB.source in msg and "gated" in msg and "licence" in msg and "HF_TOKEN" in msg
    assert f"https://huggingface.co/{HUB.source}" in msg


def test_gated_with_token_says_the_token_lacks_access():
    exc = hub_error("GatedRepoError", "403 Client Error. Access to the model is restricted.")
    msg = str(_access_error(HUB, exc, has_token=True))
    assert "not granted access" in msg and "licence" in msg and "HF_TOKEN" in msg


def test_missing_repo_is_not_reported_as_offline():
    exc = hub_error(
        "RepositoryNotFoundError",
        "404 Client Error. Repository Not Found for url: "
        "https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct/resolve/main/config.json.",
    )
    msg = str(_access_error(HUB, exc, has_token=True))
    assert "not found" in msg and "cannot be reached" not in msg
    assert all(key in msg for key in REGISTRY)
    msg = str(_access_error(HUB, exc, has_token=False))
    assert "not found" in msg and "HF_TOKEN" in msg  # it may be private: a token could help


def test_other_errors_pass_through_unchanged():
    exc = RuntimeError("CUDA out of memory")
    assert _access_error(HUB, exc, has_token=False) is exc
    local = ModelSpec("x", "local", "/models/x")
    offline_looking = OSError("We couldn't connect to 'https://huggingface.co'")
    assert _access_error(local, offline_looking, has_token=False) is offline_looking


def test_unchanged_errors_are_raised_as_they_were(monkeypatch):
    """An error that is not about access reaches the caller as itself, not chained to itself."""
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("config is broken")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="config is broken") as info:
        expected_shape("someorg/somemodel")
    assert info.value.__cause__ is not info.value


def test_an_unregistered_model_is_instruct_iff_its_tokenizer_has_a_chat_template(tmp_path):
    from rh.models import load_model, tiny_llama

    t = tiny_llama()
    t.model.save_pretrained(tmp_path / "tiny-saved")
    t.tokenizer.save_pretrained(tmp_path / "tiny-saved")
    assert load_model(str(tmp_path / "tiny-saved"), device="cpu").instruct  # SmolLM2's template is kept


def _spy_loads(monkeypatch, cls) -> list[str]:
    """The loads ``cls.from_pretrained`` makes from now on, in order: "gguf" (converting the GGUF)
    or "copy" (reading the converted copy)."""
    calls: list[str] = []
    real = cls.from_pretrained.__func__

    def spy(klass, *args, **kwargs):
        calls.append("gguf" if kwargs.get("gguf_file") else "copy")
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.slow  # three reads of the GGUF, about 20 s each
def test_the_bundled_models_dequantized_weights_are_kept_once_and_load_bit_for_bit(tmp_path, monkeypatch):
    """The GGUF's dequantized weights saved under RH_CACHE_DIR are what later loads read: every
    tensor equal bit for bit to the GGUF load's (so the same logits: the same numerics), the
    embedding still tied to the output head; a damaged copy is converted again, and an unwritable
    cache folder only costs the time. Catches a copy saved in another dtype or with the GGUF's
    tensors misnamed, and a cache that fails a load."""
    import torch
    from transformers import AutoModelForCausalLM

    from rh.models import REGISTRY, bundled_gguf_path

    path = bundled_gguf_path(REGISTRY["smollm2-135m"])
    calls = _spy_loads(monkeypatch, AutoModelForCausalLM)
    monkeypatch.setenv("RH_CACHE_DIR", str(tmp_path / "cache"))
    first = models._gguf_weights(path, torch.bfloat16, "sdpa")
    [saved] = (tmp_path / "cache" / "models").iterdir()
    assert calls == ["gguf"] and (saved / "model.safetensors").is_file()
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    again = models._gguf_weights(path, torch.bfloat16, "sdpa")
    assert calls == ["gguf", "copy"]
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, first.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, again(input_ids=ids).logits)

    (saved / "model.safetensors").write_bytes(b"not safetensors")  # damaged: converted again and replaced
    calls.clear()
    models._gguf_weights(path, torch.bfloat16, "sdpa")
    assert calls == ["copy", "gguf"] and (saved / "model.safetensors").stat().st_size > 10**8
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("RH_CACHE_DIR", str(blocked))  # a file where the folder should be
    calls.clear()
    assert models._gguf_weights(path, torch.bfloat16, "sdpa") is not None and calls == ["gguf"]


@pytest.mark.slow  # three conversions from the GGUF, about 5 s each
def test_the_bundled_tokenizer_is_converted_once_and_its_saved_copy_tokenizes_the_same(tmp_path, monkeypatch):
    """The GGUF tokenizer's converted copy under RH_CACHE_DIR is what later processes load: the
    same ids for a haystack page, the same special tokens and chat prompt; a damaged copy is
    converted again, and an unwritable cache folder only costs the time."""
    from transformers import AutoTokenizer

    from rh.models import REGISTRY, bundled_gguf_path
    from rh.niah import haystack_text

    path = str(bundled_gguf_path(REGISTRY["smollm2-135m"]))
    convert = models._gguf_tokenizer.__wrapped__  # past the per-process cache
    calls = _spy_loads(monkeypatch, AutoTokenizer)
    monkeypatch.setenv("RH_CACHE_DIR", str(tmp_path / "cache"))
    first = convert(path)
    [saved] = (tmp_path / "cache" / "tokenizers").iterdir()
    assert calls == ["gguf"] and (saved / "tokenizer.json").is_file()
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    again = convert(path)
    assert calls == ["gguf", "copy"]
    text = haystack_text()  # the essays rh builds every haystack from: about 154k tokens
    assert again(text)["input_ids"] == first(text)["input_ids"]
    chat = [{"role": "user", "content": "What is the special magic number?"}]
    assert again.apply_chat_template(chat, add_generation_prompt=True) == first.apply_chat_template(
        chat, add_generation_prompt=True)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id, len(again)) == (
        first.bos_token_id, first.eos_token_id, first.pad_token_id, len(first))

    (saved / "tokenizer.json").write_text("{not json")  # damaged: converted again and replaced
    calls.clear()
    assert convert(path)(text)["input_ids"] == first(text)["input_ids"] and calls == ["copy", "gguf"]
    assert convert(path) is not None and calls[-1] == "copy"

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("RH_CACHE_DIR", str(blocked))  # a file where the folder should be
    calls.clear()
    assert convert(path)(text)["input_ids"] == first(text)["input_ids"] and calls == ["gguf"]


def test_a_model_without_its_weights_is_keyed_as_the_loaded_one_and_runs_no_pass(tiny):
    """load_model(weights=False): the tokenizer, shape, config and provenance of a full load (so the
    store's rows and the ranking cache are keyed alike), the parameters on the meta device in the
    load's dtype, the device the replicas use; a forward pass fails loudly. Catches a skeleton keyed
    otherwise than its replicas (rows never shared) or one that computes on nothing."""
    from rh.evaluate import teacher_forced
    from rh.models import load_model
    from rh.niah import build_passkey_samples
    from rh.runner import Layout

    full = load_model("tiny-llama")
    bare = load_model("tiny-llama", weights=False)
    assert bare.provenance == full.provenance and bare.shape == full.shape
    assert Layout.of(bare).key() == Layout.of(full).key()
    assert bare.model.config.to_dict() == full.model.config.to_dict()
    assert {p.device.type for p in bare.model.parameters()} == {"meta"}
    assert {p.dtype for p in bare.model.parameters()} == {p.dtype for p in full.model.parameters()}
    assert not bare.holds_weights and full.holds_weights and bare.device == torch.device("cpu")
    on_gpu = load_model("tiny-llama", weights=False, device="cuda")  # a controller of GPU replicas needs no GPU
    assert on_gpu.device == torch.device("cuda") and on_gpu.provenance["device"] == "cuda"
    samples = build_passkey_samples(bare.tokenizer, lengths=[96], depths=[0.5], n_per_setting=1, seed=0,
                                    max_positions=bare.max_positions)
    with pytest.raises((RuntimeError, NotImplementedError)):
        teacher_forced(bare, samples, progress=False)


def test_the_bundled_model_without_its_weights_has_the_provenance_of_its_file():
    """The GGUF's skeleton: its revision is the file's sha256 (hashed here), its shape SmolLM2's
    (30 x 9, 3 KV heads), the dtype the CPU's choice; no weight is read into memory."""
    import hashlib

    from rh.models import bundled_gguf_path, choose_dtype, load_model, resolve_spec

    bare = load_model("smollm2-135m", weights=False)
    digest = hashlib.sha256(bundled_gguf_path(resolve_spec("smollm2-135m")).read_bytes()).hexdigest()
    assert bare.provenance["revision"] == f"sha256:{digest}" and bare.provenance["model_id"] == "smollm2-135m"
    assert (bare.shape.n_layers, bare.shape.n_heads, bare.shape.n_kv_heads) == (30, 9, 3)
    assert bare.provenance["dtype"] == choose_dtype("cpu").name and bare.provenance["attn_implementation"] == "sdpa"
    assert {p.device.type for p in bare.model.parameters()} == {"meta"}


@pytest.mark.slow  # two conversions of the GGUF's header, about 5 s each, and a weightless load
def test_the_bundled_config_is_read_from_the_gguf_once_and_its_copy_is_the_same(tmp_path, monkeypatch):
    """The config a load without weights (--plan, a --ray controller) builds the bundled model's
    architecture from: converted from the GGUF once, then read from its copy under RH_CACHE_DIR,
    equal in every field to the GGUF's; a damaged copy is converted again. The weightless model
    built from the copy has the full load's modules and shapes."""
    from transformers import AutoConfig

    from rh.models import REGISTRY, bundled_gguf_path, load_model

    path = bundled_gguf_path(REGISTRY["smollm2-135m"])
    calls = _spy_loads(monkeypatch, AutoConfig)
    monkeypatch.setenv("RH_CACHE_DIR", str(tmp_path / "cache"))
    first = models._cached_gguf_config(path)
    [saved] = (tmp_path / "cache" / "configs").iterdir()
    assert calls == ["gguf"] and (saved / "config.json").is_file()
    again = models._cached_gguf_config(path)
    assert calls == ["gguf", "copy"] and again.to_dict() == first.to_dict()
    (saved / "config.json").write_text("{not json")
    calls.clear()
    assert models._cached_gguf_config(path).to_dict() == first.to_dict() and calls == ["copy", "gguf"]
    bare = load_model("smollm2-135m", weights=False)
    built = {k: v for k, v in bare.model.config.to_dict().items() if k != "dtype"}  # set by the build
    assert not bare.holds_weights and built == {k: v for k, v in first.to_dict().items() if k != "dtype"}
    assert bare.shape == REGISTRY["smollm2-135m"].shape
