"""Every model family rh is pointed at, on tiny random models built offline from transformers' own
config classes (``rh.models.tiny_model``: 4 layers, 8 query heads on 2 KV heads, each family's
special features switched on: sliding windows of 48 on ~200-token inputs, Gemma 2's attention-logit
soft-capping, QK-norm, qkv biases, fused qkv and partial rotary).

Each mechanism is held per family to a reference that does not use rh's code:

- the attention capture (last row, several rows, a capture through a layer, sum attention) against
  transformers' eager attention weights (``output_attentions=True``);
- the four ablations (both phases), the window restriction and the recorded sites against
  :func:`_reference_attention`, an attention function written here from the definitions (a mask
  built from positions: causal, padding, the layer's sliding window; soft-capping; the ablation or
  restriction applied by hand), run by a twin of the model with the same weights;
- prefix reuse against the plain pass;
- Wu24's retrieval score against the original's greedy loop written out on eager attention.

The largest absolute difference per family and mechanism is collected and written as a Markdown
table (to ``$RH_FAMILY_TABLE`` if set, else ``family_diffs.md`` in pytest's temporary folder) and
printed (``-s``); the README's "Model families" table is that file.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
import torch

from rh.ablation import METHODS, ablate
from rh.attention import capture_attention
from rh.compression import restrict_window
from rh.heads import Head
from rh.models import FAMILIES, final_norm, tiny_model
from rh.prefix import forward, hinting, reuse_prefixes
from rh.recording import attn_z, recording, resid_post, resid_pre
from reference import eager_needle_attention

FAMS = list(FAMILIES)
LENGTH = 200  # > the tiny models' sliding window (48): the window bites
PADS = (0, 9)  # row 1 is left-padded
VOCAB = 256  # a small vocabulary, no tokenizer (sum attention uses the bundled tokenizer's models)
ATOL = 1e-4  # logits of float32 models through 4 layers, as tests/test_compression.py

DIFFS: dict[str, dict[str, float]] = {}
MECHANISMS = ("capture", "sum attention", "reference", "zero", "mean", "query", "logits", "decode phase",
              "decode fan", "sites", "prefix reuse", "restrict_window", "transplant", "wu24 score")


def _note(family: str, mechanism: str, diff: float | torch.Tensor) -> None:
    d = DIFFS.setdefault(family, {})
    d[mechanism] = max(d.get(mechanism, 0.0), float(diff))


def family_table() -> str:
    """The collected differences as a Markdown table, families in rows."""
    cols = [m for m in MECHANISMS if any(m in d for d in DIFFS.values())]
    lines = ["| family | features | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for fam in FAMS:
        if fam not in DIFFS:
            continue
        cells = [f"{DIFFS[fam][c]:.1e}" if c in DIFFS[fam] else "" for c in cols]
        lines.append(f"| {fam} | {', '.join(FAMILIES[fam].features)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _write_table(tmp_path_factory):
    # one intra-op thread: on a shared 2-core machine, torch's two threads spin-wait on each other
    # and make these tiny forwards 10-40x slower (0.8 s instead of 0.02 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if not DIFFS:
        return
    path = os.environ.get("RH_FAMILY_TABLE") or str(tmp_path_factory.getbasetemp() / "family_diffs.md")
    text = family_table()
    with open(path, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as fh:
        json.dump(DIFFS, fh, indent=1, sort_keys=True)
    print(f"\nlargest absolute differences per family and mechanism ({path}):\n{text}")


# ---------------------------------------------------------------------------- models and inputs

_MODELS: dict[tuple[str, str], object] = {}


def _model(family: str, kind: str = "rh"):
    """``rh``: the family's tiny model as rh runs it (sdpa, eager for Gemma 2); ``eager``: the same
    weights under transformers' eager attention; ``ref``: the same weights under
    :func:`_reference_attention`. Vocabulary ``VOCAB``, no tokenizer; ``rh-tok`` and ``eager-tok``:
    the same with the bundled tokenizer and its vocabulary."""
    key = (family, kind)
    if key not in _MODELS:
        vocab = None if kind.endswith("-tok") else VOCAB
        if kind.startswith("rh"):
            m = tiny_model(family, seed=0, vocab_size=vocab)
        else:
            m = tiny_model(family, seed=0, vocab_size=vocab, attn_implementation="eager")
            if kind == "ref":
                _register_reference()
                m.model.set_attn_implementation("rh_test_family_ref")
        _MODELS[key] = m
    return _MODELS[key]


def _ids(n=2, length=LENGTH, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _padded(seed=0, pads=PADS, length=LENGTH):
    ids = _ids(len(pads), length, seed)
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads):
        mask[r, :p] = 0
    return ids, mask


def _real(t: torch.Tensor, pads=PADS) -> torch.Tensor:
    """The positions of real tokens of every row, concatenated."""
    return torch.cat([t[r, p:] for r, p in enumerate(pads)])


# ---------------------------------------------------------------------------- the reference attention

_REF: dict = {}  # what the reference does: ablate {layer: {head: (method, vector)}}, phase, restrict, pads


def _layer_window(module) -> int | None:
    """The layer's sliding window, from the config's definition (layer_types, sliding_window)."""
    cfg = module.config
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is not None and getattr(cfg, "use_sliding_window", True) is not False:
        return window if types[module.layer_idx] == "sliding_attention" else None
    if types is not None:
        return None
    return window


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """Attention from the definitions, ignoring the mask it is given: query i (key index
    kv - q + i) sees key j iff j <= i, j is not left padding of its row, and i - j < the layer's
    sliding window; scores are scaled, soft-capped (``softcap``), masked and softmaxed. ``_REF``
    adds by hand: per head, a zeroed query (``query``), zero scores (``logits``), a zero or a given
    output (``zero``, ``mean``) -- on every call (phase ``all``) or on one-token calls only
    (``decode``) -- and the sink + window restriction."""
    layer = int(module.layer_idx)
    b, n_heads, q_len, d = query.shape
    kv_len = key.shape[2]
    groups = n_heads // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    q = query.float().clone()
    on = _REF.get("phase", "all") == "all" or q_len == 1
    abl = _REF.get("ablate", {}).get(layer, {}) if on else {}
    for h, (method, _) in abl.items():
        if method == "query":
            q[:, h] = 0.0
    scores = (q @ k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    for h, (method, _) in abl.items():
        if method == "logits":
            scores[:, h] = 0.0
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(q_len)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len)[None, :]
    pads = _REF.get("pads", [0] * b)
    keep = torch.zeros(b, n_heads, q_len, kv_len, dtype=torch.bool)
    window = _layer_window(module)
    restricted = _REF.get("restrict", {}).get(layer, set())
    for r in range(b):
        base = (j <= i) & (j >= pads[r])
        if window is not None:
            base &= i - j < window
        keep[r] = base
        for h in restricted:
            keep[r, h] = base & ((j - pads[r] < _REF["sink"]) | (j > i - _REF["window"]))
    w = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    out = w @ v  # [b, heads, q, d]
    for h, (method, vec) in abl.items():
        if method == "zero":
            out[:, h] = 0.0
        elif method == "mean":
            out[:, h] = vec
    _REF.setdefault("z", {})[layer] = out.transpose(1, 2).reshape(b, q_len, -1).clone()
    return out.transpose(1, 2).to(query.dtype), w.to(query.dtype)


def _register_reference():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("rh_test_family_ref", _reference_attention)
    AttentionMaskInterface.register("rh_test_family_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextlib.contextmanager
def _reference(ablations=None, phase="all", restrict=(), sink=0, window=0, pads=PADS):
    """Set what the reference attention does inside the block."""
    table: dict = {}
    for h, method, vec in ablations or []:
        table.setdefault(h.layer, {})[h.head] = (method, vec)
    rest: dict = {}
    for h in restrict:
        rest.setdefault(h.layer, set()).add(h.head)
    _REF.clear()
    _REF.update(ablate=table, phase=phase, restrict=rest, sink=sink, window=window, pads=list(pads))
    try:
        yield _REF
    finally:
        _REF.clear()


def _logits(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model.model(input_ids=ids, attention_mask=mask, **kw).logits.float()


# ---------------------------------------------------------------------------- the models are what they say


@pytest.mark.parametrize("family", FAMS)
def test_the_tiny_model_has_its_familys_features(family):
    """The features the matrix claims to exercise are on: the config class, GQA, the window and its
    layers, soft-capping, QK-norm modules, biases, the fused projection, partial rotary."""
    m = _model(family)
    cfg = m.model.config
    assert type(cfg).__name__ == FAMILIES[family].config_class
    assert (m.shape.n_heads, m.shape.n_kv_heads) == (8, 2)
    attn = m.model.model.layers[0].self_attn
    if family in ("mistral", "gemma2", "gemma3"):
        assert cfg.sliding_window == 48
        windows = [_layer_window(layer.self_attn) for layer in m.model.model.layers]
        assert windows == ([48] * 4 if family == "mistral" else [48, None, 48, None])
    else:
        assert all(_layer_window(layer.self_attn) is None for layer in m.model.model.layers)
    if family == "gemma2":
        assert cfg.attn_logit_softcapping == 5.0 and m.provenance["attn_implementation"] == "eager"
    else:
        assert m.provenance["attn_implementation"] == "sdpa"
    if family in ("qwen3", "gemma3", "olmo2"):
        assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    if family == "qwen2":
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    if family == "phi3":
        assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
        assert cfg.rope_parameters["partial_rotary_factor"] == 0.5


# ---------------------------------------------------------------------------- capture vs eager


@pytest.mark.parametrize("family", FAMS)
def test_captured_rows_equal_eager_attention(family):
    """The last row, three rows and a capture through layer 1 equal transformers' eager weights,
    padded batch, window and soft-cap included; the window bites (keys beyond it get exactly 0)."""
    m, eager = _model(family), _model(family, "eager")
    ids, mask = _padded(seed=1)
    with torch.no_grad():
        att = eager.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with capture_attention(m) as last:
            m.model(input_ids=ids, attention_mask=mask)
        with capture_attention(m, rows=(-3, -2, -1)) as rows:
            m.model(input_ids=ids, attention_mask=mask)
        with capture_attention(m, through_layer=1) as short:
            m.model(input_ids=ids, attention_mask=mask)
    for layer in range(4):
        want = att[layer].float()
        diff = max((last.step(0)[layer] - want[:, :, -1]).abs().max(),
                   (rows.step(0)[layer] - want[:, :, -3:]).abs().max())
        if layer <= 1:
            diff = max(diff, (short.step(0)[layer] - want[:, :, -1]).abs().max())
        _note(family, "capture", diff)
        assert diff < 1e-5
        if _layer_window(m.model.model.layers[layer].self_attn):
            assert torch.count_nonzero(want[:, :, -1, : LENGTH - 48]) == 0
            assert torch.count_nonzero(last.step(0)[layer][:, :, : LENGTH - 48]) == 0
    assert len(short.steps[0]) == 2


@pytest.mark.parametrize("family", FAMS)
def test_reading_rows_equals_eager_attention_at_each_rows_own_position(family):
    """rh.attention.reading_rows (what ID-5 reads beside the task baselines' forwards) hands over,
    for each batch row, the attention of that row's own query position, equal to eager attention in
    every family (padding, sliding windows and soft-capping included), and leaves the output as it
    was. Catches a reader that takes one position for every row, drops the window or the soft-cap,
    or changes what the model computes."""
    from rh.attention import reading_rows

    m, eager = _model(family), _model(family, "eager")
    ids, mask = _padded(seed=3)
    b, q_len = ids.shape
    pos = [q_len - 1 - 7 * r for r in range(b)]  # a different query position in every row
    seen: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        att = eager.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        plain = m.model(input_ids=ids, attention_mask=mask).logits
        with reading_rows(m, [0, 2, 3], lambda n: pos, lambda layer, p: seen.update({layer: p})):
            read = m.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(read, plain) and sorted(seen) == [0, 2, 3]
    for layer, got in seen.items():
        want = att[layer].float()[torch.arange(b), :, pos]  # [b, heads, kv]
        diff = (got - want).abs().max()
        _note(family, "reading rows", diff)
        assert got.shape == want.shape and diff < 1e-5


@pytest.mark.parametrize("family", FAMS)
def test_sum_attention_equals_eager_output_attentions(family):
    from rh.niah import build_passkey_samples
    from rh.scoring import score_samples

    m, eager = _model(family, "rh-tok"), _model(family, "eager-tok")
    samples = build_passkey_samples(m.tokenizer, lengths=[160], depths=[0.2, 0.9], n_per_setting=1, seed=1,
                                    max_positions=m.max_positions)
    got = score_samples(m, samples, "sum_attention", batch_size=2, progress=False).scores
    for i, s in enumerate(samples):
        want = eager_needle_attention(eager, s)
        _note(family, "sum attention", np.abs(got[i] - want).max())
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- Wu24's retrieval score

EMITTED = (1000, 2000, 3000, 4000)  # the only tokens the Wu24 case's models can emit
WU24_ANSWER = 12  # answer tokens: the span a head is credited in, and the answer's length


def _emitting_only(m, seed=0):
    """``m`` with an LM head whose only non-zero rows are v, -v, u, -u for the four ``EMITTED``
    tokens: greedy decoding emits one of them at every step, whatever the attention does, so that
    heads whose top-1 lands in an answer span made of them can score (a random LM head emits tokens
    that are nowhere in the prompt, and every score would be 0). The attention is untouched."""
    lm = m.model.get_output_embeddings()
    v, u = torch.randn(2, lm.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    w = torch.zeros_like(lm.weight)
    for token, row in zip(EMITTED, (v, -v, u, -u)):
        w[token] = row
    lm.weight.data.copy_(w)
    return m


def _wu24_cases(tokenizer):
    """Two prompts of random tokens (no EMITTED token among them) whose answer span holds the
    EMITTED tokens in turn: one of 160 tokens with the span inside the last 48 positions (the
    sliding-window layers see it while decoding), one of 151 (left-padded by 9 in a batch of two)
    with the span at position 10 (only full-attention layers reach it)."""
    from rh.niah import Sample

    rng = np.random.default_rng(0)
    out = []
    for i, (n, at) in enumerate(((160, 140), (151, 10))):
        ids = [int(t) for t in rng.integers(5000, 40000, n)]
        answer = [EMITTED[j % 4] for j in range(WU24_ANSWER)]
        ids[at:at + WU24_ANSWER] = answer
        span = (at, at + WU24_ANSWER)
        out.append(Sample(f"wu{i}", "t", tuple(ids), span, tuple(answer), tokenizer.decode(answer), "", n, 0.0, 0.0,
                          0, answer_span=span))
    return out


def _wu24_by_hand(eager, sample, n_steps: int, eos: set[int]) -> tuple[np.ndarray, list[int]]:
    """The loop of nightdessert/Retrieval_Head's retrieval_head_detection.py on one prompt, with
    transformers' eager attention weights: prefill ``input_ids[:, :-1]``, then decode one token at a
    time from the last prompt token; at each step, for each head, the argmax of its attention row
    (top-1), when inside the answer span on a prompt token equal to the token this step emitted, adds
    1/|span| to the head's score. Stops after ``n_steps`` steps, or after emitting an ``eos`` token.
    A sliding-window layer's cache keeps only the last keys while decoding: its row covers the last
    ``len(row)`` of the positions seen, and its argmax is mapped to the prompt position it is."""
    ids = torch.tensor([sample.input_ids])
    a, b = sample.answer_span
    cfg = eager.model.config
    scores = np.zeros((cfg.num_hidden_layers, cfg.num_attention_heads))
    emitted: list[int] = []
    with torch.no_grad():
        out = eager.model(input_ids=ids[:, :-1], use_cache=True)
        cache, inp, seen = out.cache, ids[:, -1:], ids.shape[1] - 1
        for _ in range(n_steps):
            out = eager.model(input_ids=inp, cache=cache, use_cache=True, output_attentions=True)
            cache, seen = out.cache, seen + 1
            token = int(out.logits[0, -1].argmax())
            emitted.append(token)
            for layer, att in enumerate(out.attentions):
                row = att[0, :, -1]  # [heads, keys in the cache]
                first = seen - row.shape[-1]
                for head in range(row.shape[0]):
                    pos = first + int(row[head].argmax())
                    if a <= pos < b and sample.input_ids[pos] == token:
                        scores[layer, head] += 1 / (b - a)
            if token in eos:
                break
            inp = torch.tensor([[token]])
    return scores, emitted


@pytest.mark.parametrize("family", FAMS)
def test_wu24_score_equals_the_original_greedy_loop_step_by_step(family):
    """rh's Wu24 retrieval score (``score_samples(..., "wu24")``: one batched, left-padded
    ``generate`` under the capture, default options) equals the original's loop written out on eager
    attention (:func:`_wu24_by_hand`), prompt by prompt, and decodes the same tokens. What rh documents
    (``Wu24Options``) is replicated where it departs from the original: the span is the answer's
    own tokens in the needle (``span="exact"``; the original searches it with ``find_needle_idx``),
    and decoding runs the answer's length plus ``extra_tokens`` steps, stopping at EOS (the original:
    up to 50 steps, stopping at a newline). Catches a top-1 read in the cache's coordinates instead
    of the prompt's (a sliding window's cache holds only its last 48 keys while decoding: Mistral and
    the Gemmas credited heads for positions they never attended before this was fixed), the first
    answer token's step dropped, a step scored against another step's token, padding misplaced."""
    from rh.scoring import Wu24Options, score_samples

    m = _emitting_only(tiny_model(family, seed=0))
    eager = _emitting_only(tiny_model(family, seed=0, attn_implementation="eager"))
    samples = _wu24_cases(m.tokenizer)
    got = score_samples(m, samples, "wu24", batch_size=2, progress=False)
    eos = {m.tokenizer.eos_token_id}
    n_steps = WU24_ANSWER + Wu24Options().extra_tokens
    diff, wants = 0.0, []
    for i, s in enumerate(samples):
        want, emitted = _wu24_by_hand(eager, s, n_steps, eos)
        wants.append(want)
        assert got.info[i]["generated"] == m.tokenizer.decode(emitted, skip_special_tokens=True), s.id
        diff = max(diff, float(np.abs(got.scores[i] - want).max()))
    _note(family, "wu24 score", diff)
    assert diff < 1e-9
    assert sum(w.sum() for w in wants) > 0  # heads score in this case
    windowed = [layer for layer in range(4) if _layer_window(eager.model.model.layers[layer].self_attn)]
    if windowed:  # a sliding layer's head scores while decoding: the cache's coordinates are exercised
        assert wants[0][windowed].sum() > 0


# ---------------------------------------------------------------------------- ablations vs the reference


def test_the_reference_attention_is_the_models_own(request):
    """Without ablation, the reference twin gives the eager model's logits: what the comparisons
    below stand on (checked for every family)."""
    for family in FAMS:
        ids, mask = _padded(seed=2)
        with _reference():
            ref = _logits(_model(family, "ref"), ids, mask)
        eager = _logits(_model(family, "eager"), ids, mask)
        diff = (_real(ref) - _real(eager)).abs().max()
        _note(family, "reference", diff)
        assert diff < ATOL, family


HEADS = [Head(1, 1), Head(1, 6), Head(2, 3), Head(3, 0), Head(3, 7)]  # both KV groups, three layers


def _means(heads, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {h: torch.randn(8, generator=g) for h in heads}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMS)
def test_ablation_equals_the_hand_computation_in_a_full_pass(family, method):
    """phase='all' on a padded batch: the rh model's logits (sdpa; eager for Gemma 2) equal the
    reference twin ablating the same heads by hand, and the ablation matters."""
    m, ref = _model(family), _model(family, "ref")
    ids, mask = _padded(seed=4)
    means = _means(HEADS) if method == "mean" else None
    with torch.no_grad(), ablate(m, HEADS, method, reference=means):
        got = _logits(m, ids, mask)
    with _reference([(h, method, means[h] if means else None) for h in HEADS]):
        want = _logits(ref, ids, mask)
    clean = _logits(m, ids, mask)
    diff = (_real(got) - _real(want)).abs().max()
    _note(family, method, diff)
    assert diff < ATOL
    assert (_real(got) - _real(clean)).abs().max() > 100 * ATOL  # the heads matter at this size


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMS)
def test_decode_only_ablation_spares_the_prefill_and_equals_the_hand_computation(family, method):
    """phase='decode' with a KV cache (a sliding window's cache holds only the window): the prefill
    is untouched bit for bit, the decoding step equals the reference ablating one-token calls only."""
    m, ref = _model(family), _model(family, "ref")
    ids = _ids(1, LENGTH, seed=5)
    nxt = _ids(1, 1, seed=6)
    means = _means(HEADS) if method == "mean" else None

    def run(model):
        with torch.no_grad():
            out = model.model(input_ids=ids, use_cache=True)
            step = model.model(input_ids=nxt, cache=out.cache, use_cache=True)
        return out.logits.float(), step.logits[:, -1].float()

    clean_pre, clean_step = run(m)
    with ablate(m, HEADS, method, phase="decode", reference=means):
        pre, step = run(m)
    with _reference([(h, method, means[h] if means else None) for h in HEADS], phase="decode", pads=[0]):
        _, want = run(ref)
    assert torch.equal(pre, clean_pre)
    diff = (step - want).abs().max()
    _note(family, "decode phase", diff)
    assert diff < ATOL
    assert (step - clean_step).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", FAMS)
def test_decode_phase_units_from_the_clean_prompts_cache_equal_the_teacher_forced_pass(family):
    """Wu24's protocol as rh.units runs it (one clean prefill per prompt, a sliding window's cache
    holding only the window, then each condition's answer steps) gives the logits of the
    teacher-forced pass with the condition in the decode phase, on prompts of two lengths (the
    reference batch left-pads one)."""
    from rh.ablation import Ablation
    from rh.evaluate import teacher_forced
    from rh.niah import Sample
    from rh.units import Unit, forget_prefills, run_units

    m = _model(family, "rh-tok")
    rng = np.random.default_rng(11)
    samples = [Sample(f"p{i}", "t", tuple(int(t) for t in rng.integers(5, VOCAB, n)), (0, 1),
                      tuple(int(t) for t in rng.integers(5, VOCAB, 3)), "", "", n, 0.0, 0.0, 0)
               for i, n in enumerate((LENGTH, LENGTH - 9))]
    conds = [Ablation("z", HEADS, phase="decode"), Ablation("z2", HEADS[:1], phase="decode"),
             Ablation("l", HEADS, "logits", "decode")]
    forget_prefills(m)
    got = run_units(m, samples, [Unit(c, [s.id for s in samples]) for c in conds], batch_size=2)
    diff = 0.0
    for c, df in zip(conds, got):
        with c.open(m):
            want = teacher_forced(m, samples, condition=c.name, batch_size=2, progress=False)
        clean = teacher_forced(m, samples, batch_size=2, progress=False)
        assert df["first_argmax"].tolist() == want["first_argmax"].tolist(), c.name
        diff = max(diff, float((df["logprob"] - want["logprob"]).abs().max()))
        assert (df["logprob"] - clean["logprob"]).abs().max() > 100 * ATOL  # the ablation acts
    _note(family, "decode fan", diff)
    assert diff < ATOL


# ---------------------------------------------------------------------------- sites, prefix, window


@pytest.mark.parametrize("family", FAMS)
def test_recorded_sites_equal_the_plain_pass(family):
    """resid_pre/resid_post equal transformers' hidden states (the last through the final norm);
    attn_z equals the reference attention's output (the o_proj input) of the same pass."""
    m, ref = _model(family), _model(family, "ref")
    ids, mask = _padded(seed=7)
    sites = [s for layer in range(4) for s in (resid_pre(layer), resid_post(layer), attn_z(layer))]
    with torch.no_grad(), recording(m, sites) as cache:
        hs = m.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with _reference() as state, torch.no_grad():
        ref.model(input_ids=ids, attention_mask=mask)
        z = dict(state["z"])
    diff = 0.0
    with torch.no_grad():
        for layer in range(4):
            diff = max(diff, (_real(cache[resid_pre(layer)]) - _real(hs[layer])).abs().max())
            post = cache[resid_post(layer)]
            want = hs[layer + 1] if layer < 3 else hs[4]
            got = post if layer < 3 else final_norm(m)(post)
            diff = max(diff, (_real(got) - _real(want)).abs().max())
            diff = max(diff, (_real(cache[attn_z(layer)]) - _real(z[layer])).abs().max())
    _note(family, "sites", diff)
    assert diff < ATOL


@pytest.mark.parametrize("family", FAMS)
def test_prefix_reuse_equals_the_plain_pass(family):
    """A baseline stores the stream entering layers 1 and 3; passes ablating a head of layer 1
    (an odd layer: a full-attention layer after a sliding one in Gemma) and restricting a head of
    layer 3 start there and give the plain pass's logits."""
    m = _model(family)
    ids, mask = _padded(seed=8)
    inputs = {"input_ids": ids, "attention_mask": mask}
    conditions = [lambda: ablate(m, [Head(1, 2)], "zero"), lambda: ablate(m, [Head(1, 5)], "logits"),
                  lambda: restrict_window(m, [Head(3, 4)], sink=2, window=16)]
    plain = []
    for make in conditions:
        with make(), torch.no_grad():
            plain.append(m.model(**inputs).logits.float())
    with reuse_prefixes(m) as cache, torch.no_grad():
        with hinting(m, [1, 3]):
            forward(m, inputs)
        reused = []
        for make in conditions:
            with make():
                reused.append(forward(m, inputs).logits.float())
    assert cache.hits == len(conditions)
    diff = max((_real(a) - _real(b)).abs().max() for a, b in zip(reused, plain))
    _note(family, "prefix reuse", diff)
    assert diff < ATOL


@pytest.mark.parametrize("family", FAMS)
def test_restrict_window_equals_a_hand_built_per_head_mask(family):
    m, ref = _model(family), _model(family, "ref")
    heads = [Head(0, 1), Head(1, 0), Head(1, 5), Head(2, 2), Head(3, 6)]
    ids, mask = _padded(seed=9)
    with restrict_window(m, heads, sink=3, window=16):
        got = _logits(m, ids, mask)
    with _reference(restrict=heads, sink=3, window=16):
        want = _logits(ref, ids, mask)
    clean = _logits(m, ids, mask)
    diff = (_real(got) - _real(want)).abs().max()
    _note(family, "restrict_window", diff)
    assert diff < ATOL
    assert (_real(got) - _real(clean)).abs().max() > 100 * ATOL


# ---------------------------------------------------------------------------- refused before weights load


def _config_folder(tmp_path, name, cfg):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


_LLAMA_KEYS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 128}


@pytest.mark.parametrize("name, cfg, what", [
    ("t5", {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
            "d_model": 64, "num_heads": 4, "num_layers": 2}, "T5ForConditionalGeneration.*encoder-decoder"),
    ("bart-like", {"model_type": "llama", "is_encoder_decoder": True, **_LLAMA_KEYS}, "encoder-decoder"),
    ("deepseek", {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 512,
                  "q_lora_rank": 1536, "num_attention_heads": 128, "num_hidden_layers": 61},
     "DeepseekV3ForCausalLM.*multi-latent attention"),
    ("mamba", {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": 64},
     "MambaForCausalLM.*state-space"),
    ("hybrid", {"model_type": "qwen3", **_LLAMA_KEYS, "layer_types": ["linear_attention", "full_attention"]},
     "non-attention layers \\(linear_attention\\)"),
    ("gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4, "n_layer": 2},
     "GPT2LMHeadModel.*GPT-2-style layout"),
    ("custom", {"model_type": "mything", "auto_map": {"AutoModelForCausalLM": "x.Y"}}, "trust_remote_code"),
    ("unknown", {"model_type": "mything", "architectures": ["MyThingForCausalLM"]},
     "MyThingForCausalLM.*model_type transformers .* does not know"),
])
def test_an_architecture_rh_cannot_run_is_refused_from_its_config_folder(tmp_path, name, cfg, what):
    """A folder holding only config.json is refused by resolve_spec (what the plugin calls first),
    naming the architecture and what rh supports: no weights are looked for, none load."""
    from rh.models import UnsupportedArchitecture, load_model, resolve_spec

    path = _config_folder(tmp_path, name, cfg)
    for fn in (resolve_spec, load_model):
        with pytest.raises(UnsupportedArchitecture, match=what) as info:
            fn(str(path))
        assert "rh supports decoder-only causal LMs" in str(info.value) and str(path) in str(info.value)


def test_a_config_without_attention_heads_and_a_bad_layout_are_refused_by_the_config_check(tmp_path):
    """Off the by-name lists: a config class with no num_attention_heads, and a layout found wrong
    by building the model on the meta device (OPT keeps its layers at .model.decoder.layers)."""
    from transformers import PretrainedConfig

    from rh.models import UnsupportedArchitecture, _NOT_SUPPORTED, check_layout, expected_shape

    cfg = PretrainedConfig(architectures=["NoHeadsForCausalLM"], hidden_size=64, num_hidden_layers=2)
    assert not hasattr(cfg, "num_attention_heads")
    with pytest.raises(UnsupportedArchitecture, match="NoHeadsForCausalLM.*no num_attention_heads"):
        check_layout(cfg)
    opt = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
           "num_hidden_layers": 2, "ffn_dim": 64, "vocab_size": 128, "word_embed_proj_dim": 32}
    saved = dict(_NOT_SUPPORTED)
    _NOT_SUPPORTED.pop("opt")  # as if the list did not name it: the meta-device build must find it
    try:
        path = _config_folder(tmp_path, "opt", opt)
        with pytest.raises(UnsupportedArchitecture, match=r"OPTForCausalLM.*no decoder layers at \.model\.layers"):
            expected_shape(str(path))
    finally:
        _NOT_SUPPORTED.clear()
        _NOT_SUPPORTED.update(saved)


@pytest.mark.parametrize("family", FAMS)
def test_every_tested_family_passes_the_config_check_and_a_folder_without_weights_is_refused(tmp_path, family):
    """The check lets the families through: a tiny model of each, saved, has its shape read from
    config.json; the same config.json alone has its shape read, and loading it is refused before
    transformers looks for weights, with a message that says so."""
    from rh.models import check_layout, expected_shape, load_model

    m = _model(family)
    path = tmp_path / family
    m.model.save_pretrained(path)
    check_layout(m.model.config)
    assert expected_shape(str(path)) == m.shape
    cfg_only = _config_folder(tmp_path, f"{family}-config-only", json.loads((path / "config.json").read_text()))
    with pytest.raises(FileNotFoundError, match="has a config.json .* but no weights"):
        load_model(str(cfg_only), device="cpu")
    assert expected_shape(str(cfg_only)) == m.shape  # the shape needs no weights


def test_load_model_falls_back_to_eager_where_a_family_has_no_sdpa(tmp_path):
    """Gemma 2 has no sdpa path (sdpa cannot soft-cap): a saved Gemma 2 loads with eager attention
    and the logits of the model that was saved."""
    from transformers import Gemma2Config, Qwen3Config

    from rh.models import load_model, supported_attention

    m = _model("gemma2", "rh-tok")
    m.model.save_pretrained(tmp_path / "g2")
    m.tokenizer.save_pretrained(tmp_path / "g2")
    loaded = load_model(str(tmp_path / "g2"), device="cpu", dtype="float32")
    assert loaded.provenance["attn_implementation"] == "eager"
    ids = _ids(1, 40, seed=11)
    assert torch.equal(_logits(loaded, ids), _logits(m, ids))

    assert supported_attention(Gemma2Config(), "sdpa") == "eager"
    assert supported_attention(Qwen3Config(), "sdpa") == "sdpa"
    assert supported_attention(Gemma2Config(), "flash_attention_2") == "flash_attention_2"


# ---------------------------------------------------------------------------- registry


# The published config.json values (num_hidden_layers, num_attention_heads, num_key_value_heads,
# head_dim or hidden_size / num_attention_heads) of the models whose head files are published.
PUBLISHED = {
    "mistral7b-v0.2": ("mistralai/Mistral-7B-Instruct-v0.2", 32, 32, 8, 4096 // 32),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", 28, 28, 4, 3584 // 28),
    "qwen3-8b": ("Qwen/Qwen3-8B", 36, 32, 8, 128),
    "gemma3-4b": ("google/gemma-3-4b-it", 34, 8, 4, 256),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", 32, 32, 8, 4096 // 32),
}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_registry_keys_give_the_published_shapes_without_any_download(key, monkeypatch):
    from rh.heads import HeadShape
    from rh.models import REGISTRY, expected_shape, resolve_spec

    def no_download(*a, **k):
        raise AssertionError("a registry key's shape must not need the hub")

    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_download)
    repo, *shape = PUBLISHED[key]
    assert resolve_spec(key).source == repo and REGISTRY[key].kind == "hub"
    assert expected_shape(key) == HeadShape(*shape)


@pytest.mark.parametrize("family", [f for f in FAMS if f != "llama"])
def test_tiny_family_keys_load_through_load_model(family):
    from rh.models import REGISTRY, load_model

    m = load_model(f"tiny-{family}", device="cpu")
    assert m.shape == REGISTRY[f"tiny-{family}"].shape
    assert type(m.model.config).__name__ == FAMILIES[family].config_class
    assert m.tokenizer is not None and m.provenance["family"] == family
    assert m.provenance["attn_implementation"] == ("eager" if family == "gemma2" else "sdpa")


def test_the_vision_language_gemma3_checkpoint_is_refused_from_its_config(tmp_path):
    """gemma-3-4b-it's config.json is a Gemma3ForConditionalGeneration (text decoder under
    .model.language_model): refused before weights load, naming the class; its registry key still
    gives the text decoder's shape for head files."""
    from transformers import Gemma3Config, Gemma3TextConfig

    from rh.models import UnsupportedArchitecture, expected_shape

    cfg = Gemma3Config(text_config=Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                                    vocab_size=300),
                       vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "intermediate_size": 64, "image_size": 28, "patch_size": 14})
    cfg.save_pretrained(tmp_path / "g3")
    with pytest.raises(UnsupportedArchitecture, match=r"Gemma3ForConditionalGeneration.*no decoder layers"):
        expected_shape(str(tmp_path / "g3"))


# ---------------------------------------------------------------------------- transplant


def _hand_transplant(recipient, donor, layer, head):
    """A copy of ``recipient`` whose weights were edited by hand: the donor's rows of q_proj (and
    bias) for ``head``, its columns of o_proj, and its KV head's rows of k_proj / v_proj."""
    import copy

    m = copy.deepcopy(recipient.model)
    d, g = recipient.shape.head_dim, recipient.shape.group_size
    r, s = m.model.layers[layer].self_attn, donor.model.model.layers[layer].self_attn
    q, kv = slice(head * d, (head + 1) * d), slice((head // g) * d, (head // g + 1) * d)
    with torch.no_grad():
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            getattr(r, name).weight[rows] = getattr(s, name).weight[rows]
            if getattr(r, name).bias is not None:
                getattr(r, name).bias[rows] = getattr(s, name).bias[rows]
        r.o_proj.weight[:, q] = s.o_proj.weight[:, q]
    return m


@pytest.mark.parametrize("family", [f for f in FAMS if f not in ("phi3", "olmo2")])
def test_transplant_equals_weight_surgery_by_hand(family):
    """kv='group' gives the logits of a copy whose weights were edited by hand; kv='own' gives the
    transplanted head's output of that copy and leaves every other head of the layer as it was;
    the recipient is restored after the block."""
    from rh.interventions import transplant_heads

    m = _model(family)
    donor = tiny_model(family, seed=7, vocab_size=VOCAB)
    layer, head = 1, 2
    ids, mask = _padded(seed=12)
    hand = _hand_transplant(m, donor, layer, head)
    clean = _logits(m, ids, mask)
    with torch.no_grad():
        want = hand(input_ids=ids, attention_mask=mask).logits.float()
        with recording(hand, [attn_z(layer)]) as hz:
            hand(input_ids=ids, attention_mask=mask)
        with recording(m, [attn_z(layer)]) as cz:
            m.model(input_ids=ids, attention_mask=mask)
    with transplant_heads(m, donor, [Head(layer, head)], kv="group"):
        got = _logits(m, ids, mask)
    with transplant_heads(m, donor, [Head(layer, head)], kv="own"), torch.no_grad(), \
            recording(m, [attn_z(layer)]) as oz:
        m.model(input_ids=ids, attention_mask=mask)
    d = m.shape.head_dim
    mine = slice(head * d, (head + 1) * d)
    others = torch.cat([torch.arange(h * d, (h + 1) * d) for h in range(8) if h != head])
    diff = max((_real(got) - _real(want)).abs().max(),
               (_real(oz[attn_z(layer)][..., mine]) - _real(hz[attn_z(layer)][..., mine])).abs().max(),
               (_real(oz[attn_z(layer)][..., others]) - _real(cz[attn_z(layer)][..., others])).abs().max())
    _note(family, "transplant", diff)
    assert diff < ATOL
    assert (_real(got) - _real(clean)).abs().max() > 100 * ATOL
    assert torch.equal(_logits(m, ids, mask), clean)


@pytest.mark.parametrize("family, match", [("phi3", "fused qkv_proj"), ("olmo2", "normalise all heads together")])
def test_transplant_refuses_what_it_cannot_move_and_leaves_the_model_as_it_was(family, match):
    from rh.interventions import transplant_heads

    m = _model(family)
    donor = tiny_model(family, seed=7, vocab_size=VOCAB)
    ids, mask = _padded(seed=13)
    clean = _logits(m, ids, mask)
    with pytest.raises(ValueError, match=match):
        with transplant_heads(m, donor, ["L1H2"]):
            pass
    assert torch.equal(_logits(m, ids, mask), clean)


@pytest.mark.parametrize("family", FAMS)
def test_attention_overrides_find_each_rows_start_under_padding_and_sliding_windows(family):
    """IV-3's overrides (hub, uniform, sequential) on a left-padded batch give each prompt's outcome
    alone. They read a row's first real token from the mask: under a sliding window the last query
    no longer sees it (tiny Mistral's hub override indexed past the keys before this was fixed)."""
    from rh.evaluate import teacher_forced
    from rh.interventions import override_attention
    from rh.niah import build_passkey_samples

    m = _model(family, "rh-tok")
    samples = build_passkey_samples(m.tokenizer, lengths=[120, 160], depths=[0.5], n_per_setting=1, seed=2,
                                    max_positions=m.max_positions)
    heads = [Head(1, 0), Head(2, 5)]
    for pattern, kw in (("hub", {"hub": 100}), ("uniform", {}), ("sequential", {})):
        with override_attention(m, heads, pattern, **kw):
            both = teacher_forced(m, samples, batch_size=2, progress=False).set_index("id")["logprob"]
            alone = [teacher_forced(m, [s], batch_size=1, progress=False)["logprob"].iloc[0] for s in samples]
        np.testing.assert_allclose(both.loc[[s.id for s in samples]].to_numpy(), alone, atol=1e-4, rtol=1e-4,
                                   err_msg=f"{family} {pattern}")


def test_wu24_rankings_of_sliding_window_models_are_keyed_apart_from_those_cached_before_the_fix():
    """A Wu24 ranking's cache key changes for a model with sliding windows (its earlier scores read
    the wrong positions) and for no other model (SmolLM2's committed rankings keep their keys)."""
    from rh.niah import Sweep
    from rh.pipeline import ranking_provenance

    sweep = Sweep((128,), (0.5,), 1, ("passkey",), 0)
    with_window = ranking_provenance(_model("mistral", "rh-tok"), sweep, "wu24", [], identify_frac=0.8, split_seed=0)
    without = ranking_provenance(_model("llama", "rh-tok"), sweep, "wu24", [], identify_frac=0.8, split_seed=0)
    summed = ranking_provenance(_model("mistral", "rh-tok"), sweep, "sum_attention", [], identify_frac=0.8,
                                split_seed=0)
    assert with_window.get("wu24_sliding_positions") == 2
    assert "wu24_sliding_positions" not in without and "wu24_sliding_positions" not in summed
