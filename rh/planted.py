"""A planted positive control: a Llama whose retrieval heads are known by construction (#33).

Every identification method in rh is otherwise judged only against another method or itself.
This model answers "which one is right?" the way InterpBench does for circuits: its weights are set
by hand (no training, deterministic from a seed, built in memory in about a second, nothing
downloaded), so the heads that retrieve the needle are known, and rh's methods and claims can be
scored against them.

The circuit (an induction circuit on trigrams, what retrieval heads are found to implement):

- the residual stream holds, per position, the token's random code ``E`` (64 dims; the bundled
  SmolLM2 tokenizer, so every rh prompt runs unchanged), subspaces ``P1``, ``P2``, ``P3``, the
  copy subspace ``O``, a constant bias dimension, and a junk subspace the other heads write into;
- **previous-token heads** (layer 0, :data:`PREVIOUS_TOKEN_HEADS`, two per offset, each writing half):
  a head of offset δ attends from position i to i-δ by its rotary phases alone (weights of the rotary frequencies chosen by a linear program
  for the largest worst-case margin over every other offset) and writes that token's code into
  ``Pδ``;
- **retrieval heads** (:data:`PLANTED_HEADS`, layers 2-5): the query holds the codes of the last
  three tokens (``E``, ``P1``, ``P2``), the key at position j the codes of the three tokens before
  j (``P1``, ``P2``, ``P3``), both on the rotary pairs of negligible frequency, so the head attends
  to the token that followed the prompt's last three tokens earlier in the context, and copies its
  code into ``O``. At the answer prefix ("... the vault is ") that is the needle's answer token;
  at each answer step, the next one. Each of the four copies writes the code in full: the
  retrieval survives any three of them ablated (redundancy, as retrieval heads show in real models);
- the unembedding reads ``O``; every other head and every MLP has seeded random weights that read
  the stream but write only into the junk subspace (they attend, so identification has noise to
  rank, and do nothing for retrieval).

:func:`build_planted` builds it (``rh.models.planted_model`` / ``--model planted`` load it); ``twin=True`` builds its **unplanted twin**: the same weights but
the previous-token and retrieval heads drawn like every other head, a model of the same shape and
weight scales that retrieves nothing. :func:`control_heads` is a seeded set of heads outside the
circuit. :func:`recovery` scores a method's top K against the planted heads (recall, precision).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rh.heads import Head, HeadShape

__all__ = ["CIRCUIT_HEADS", "PLANTED_HEADS", "PLANTED_SHAPE", "PREVIOUS_TOKEN_HEADS", "control_heads",
           "build_planted", "planted_config", "planted_heads", "ranked_by_scores", "recovery", "recovery_by_method"]

#: 6 layers x 20 heads in 4 KV groups, head_dim 128: 120 heads, the profiles of SmolLM2's size class
PLANTED_SHAPE = HeadShape(6, 20, 4, 128)
#: offset -> the layer-0 head that copies the token that many positions back
PREVIOUS_TOKEN_HEADS: dict[int, tuple[Head, ...]] = {1: (Head(0, 7), Head(0, 10)), 2: (Head(0, 8), Head(0, 11)),
                                                    3: (Head(0, 9), Head(0, 12))}  # KV groups 1 and 2 of layer 0
#: the retrieval heads, known by construction
PLANTED_HEADS: tuple[Head, ...] = (Head(2, 5), Head(3, 14), Head(4, 2), Head(5, 9))
#: every head the retrieval needs: the planted heads and the previous-token heads they read
CIRCUIT_HEADS: tuple[Head, ...] = (*(h for hs in PREVIOUS_TOKEN_HEADS.values() for h in hs), *PLANTED_HEADS)

_CODE = 64  # dims of a token's code
_HIDDEN = 400  # a multiple of the 20 heads (transformers checks it)
_E, _P = 0, (64, 128, 192)  # subspace starts: the token, then P1, P2, P3
_O = 256  # the copy subspace
_BIAS = 320  # the constant dimension
_JUNK = slice(321, 400)  # where every other head and the MLPs write
_ROPE_THETA = 1e16  # rotary pairs 16..63 turn by under 1e-4 rad per position: the content pairs
_POS_PAIRS = 16  # rotary pairs 0..15 carry the previous-token heads' offsets
_MATCH = 32  # content pairs per matched token (its code's first 32 dims, on dims f and f + 64)
_POS_SCALE = 70.0  # a previous-token head's peak score (its worst margin is 0.285 of it: 20 nats)
_MATCH_SCALE = 16.0  # a retrieval head's gain: a matching token adds about 8 (its code's first half holds half its norm)
_OUT_SCALE = 40.0  # the unembedding's gain on O
_CONTEXT = 4096


@functools.lru_cache(maxsize=4)
def _position_weights(n_pairs: int, theta: float, head_dim: int, span: int = _CONTEXT) -> np.ndarray:
    """Weights w_f >= 0 (sum 1) of the rotary pairs 0..n_pairs-1 maximising the worst margin
    min over offsets d != 0 in (-span, span) of sum_f w_f (1 - cos(theta_f d)): a score
    sum_f w_f cos(theta_f (i - j - delta)) then peaks at offset delta by that margin."""
    from scipy.optimize import linprog

    freq = 1.0 / theta ** (np.arange(0, head_dim, 2)[:n_pairs] / head_dim)
    d = np.arange(-span + 1, span)
    d = d[d != 0]
    gap = 1.0 - np.cos(np.outer(d, freq))  # (offsets, pairs)
    # maximise t subject to gap @ w >= t, sum w = 1, w >= 0
    res = linprog(c=np.r_[np.zeros(n_pairs), -1.0], A_ub=np.hstack([-gap, np.ones((len(d), 1))]),
                  b_ub=np.zeros(len(d)), A_eq=np.r_[np.ones(n_pairs), 0.0][None], b_eq=[1.0],
                  bounds=[(0, None)] * n_pairs + [(None, None)], method="highs")
    if res.status != 0:  # pragma: no cover - the program is feasible and bounded by construction
        raise RuntimeError(f"rotary weights: {res.message}")
    out = np.clip(res.x[:n_pairs], 0.0, None)
    out.flags.writeable = False  # cached: shared by every build
    return out


def _codes(vocab: int, gen: torch.Generator) -> torch.Tensor:
    c = torch.randn(vocab, _CODE, generator=gen, dtype=torch.float64)
    return c / c.norm(dim=1, keepdim=True)


def planted_config(vocab_size: int = 49152, **token_ids: Any) -> Any:
    """The planted model's ``LlamaConfig`` (no weights): what :func:`build_planted` builds, and what
    ``--plan`` reads for its dimensions. ``token_ids``: the tokenizer's bos/eos/pad ids."""
    from transformers import LlamaConfig

    s = PLANTED_SHAPE
    return LlamaConfig(vocab_size=vocab_size, hidden_size=_HIDDEN, intermediate_size=256, num_hidden_layers=s.n_layers,
                       num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
                       max_position_embeddings=_CONTEXT, rope_theta=_ROPE_THETA, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, **token_ids)


def build_planted(tokenizer: Any, *, twin: bool = False, seed: int = 0, previous_copies: int = 2,
                  device: str = "cpu", dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa") -> tuple[Any, dict[str, Any]]:
    """The planted positive control's transformers model (``twin=True``: its unplanted twin) for
    ``tokenizer``'s vocabulary, and its provenance; deterministic in ``seed``.
    :func:`rh.models.planted_model` (and ``load_model("planted")``) wrap it with the bundled
    tokenizer as a ``LoadedModel``.

    ``previous_copies``: previous-token heads per offset (1 or 2; each writes its share, so the
    circuit survives one copy ablated). With 1, each is a single point of failure outside the
    planted heads: a random head set that holds the offset-1 or offset-2 head breaks retrieval as
    surely as the planted heads do (the catalogue run in benchmarks/README.md shows what that does
    to CA-1's head-set null); the circuit heads not built stay ordinary heads."""
    if previous_copies not in (1, 2):
        raise ValueError(f"previous_copies={previous_copies}: build 1 or 2 previous-token heads per offset")
    from transformers import LlamaForCausalLM

    shape = PLANTED_SHAPE
    hd, nh = shape.head_dim, shape.n_heads
    cfg = planted_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    codes = _codes(len(tokenizer), gen)
    w_pos = _position_weights(_POS_PAIRS, _ROPE_THETA, hd)
    freq = 1.0 / _ROPE_THETA ** (np.arange(0, hd, 2) / hd)
    root = float(np.sqrt(hd))  # sdpa divides scores by sqrt(head_dim)
    r_pos = np.sqrt(w_pos * _POS_SCALE * root)
    g_match = np.sqrt(_MATCH_SCALE * root)
    half = hd // 2
    prev = {h: d for d, hs in PREVIOUS_TOKEN_HEADS.items() for h in hs[:previous_copies]}
    circuit = {h: "prev" for h in prev} | {h: "retrieval" for h in PLANTED_HEADS}
    if twin:
        circuit = {}
    junk = _JUNK.stop - _JUNK.start

    emb = torch.zeros(len(tokenizer), _HIDDEN, dtype=torch.float64)
    emb[:, _E:_E + _CODE] = codes
    emb[:, _BIAS] = 1.0
    model.model.embed_tokens.weight.data.copy_(emb)

    def norm_weight(sq_norm: float) -> torch.Tensor:
        # RMSNorm gives x * sqrt(hidden) / |x| * w: w = |x| / sqrt(hidden) returns x at its expected norm
        return torch.full((_HIDDEN,), float(np.sqrt(sq_norm / _HIDDEN)), dtype=torch.float64)

    copies = 0  # retrieval heads below the layer: each added a code to O
    group = nh // shape.n_kv_heads
    match = [(b, q_from, k_from) for b, (q_from, k_from) in enumerate(((_E, _P[0]), (_P[0], _P[1]), (_P[1], _P[2])))]

    def match_dims(b: int) -> list[int]:  # block b of the slow rotary pairs (dims f and f + half)
        first = _POS_PAIRS + _MATCH * b
        return [first + i for i in range(_MATCH)] + [half + first + i for i in range(_MATCH)]

    for li, layer in enumerate(model.model.layers):
        att = layer.self_attn
        q = torch.zeros(nh * hd, _HIDDEN, dtype=torch.float64)
        o = torch.zeros(_HIDDEN, nh * hd, dtype=torch.float64)
        k = torch.zeros(shape.n_kv_heads * hd, _HIDDEN, dtype=torch.float64)
        v = torch.zeros_like(k)
        for g in range(shape.n_kv_heads):  # a group's keys and values: its circuit head's, else random
            kinds = {circuit[Head(li, h)] for h in range(g * group, (g + 1) * group) if Head(li, h) in circuit}
            if len(kinds) > 1:  # pragma: no cover - a layout error in the constants above
                raise AssertionError(f"layer {li}, KV group {g}: heads of kinds {kinds} cannot share keys")
            rows = slice(g * hd, (g + 1) * hd)
            if kinds == {"prev"}:  # key r on the fast pairs, from the bias: the offset is in the query
                for f in range(_POS_PAIRS):
                    k[g * hd + f, _BIAS] = r_pos[f]
            elif kinds == {"retrieval"}:  # key: the codes of the three tokens before (P1, P2, P3)
                for b, _, k_from in match:
                    for c, dim in enumerate(match_dims(b)):
                        k[g * hd + dim, k_from + c] = g_match
            else:
                k[rows, _E:_E + _CODE] = torch.randn(hd, _CODE, generator=gen, dtype=torch.float64) * 0.5
            if kinds:  # the value: the token's own code
                for c in range(_CODE):
                    v[g * hd + c, _E + c] = 1.0
            else:
                v[rows, _E:_E + _CODE] = torch.randn(hd, _CODE, generator=gen, dtype=torch.float64) / np.sqrt(_CODE)
        for h in range(nh):
            head, rows = Head(li, h), slice(h * hd, (h + 1) * hd)
            kind = circuit.get(head)
            if kind == "prev":  # query r e^{-i theta_f d} on the fast pairs: score r^2 cos(theta_f (i - j - d))
                d = prev[head]
                for f in range(_POS_PAIRS):
                    q[h * hd + f, _BIAS] = r_pos[f] * np.cos(freq[f] * d)
                    q[h * hd + half + f, _BIAS] = -r_pos[f] * np.sin(freq[f] * d)
                for c in range(_CODE):
                    o[_P[d - 1] + c, h * hd + c] = 1.0 / previous_copies
            elif kind == "retrieval":  # query: the codes of the last three tokens (E, P1, P2)
                for b, q_from, _ in match:
                    for c, dim in enumerate(match_dims(b)):
                        q[h * hd + dim, q_from + c] = g_match
                for c in range(_CODE):
                    o[_O + c, h * hd + c] = 1.0
            else:  # reads the token codes, attends by content, writes junk
                q[rows, _E:_E + _CODE] = torch.randn(hd, _CODE, generator=gen, dtype=torch.float64) * 0.5
                o[_JUNK, rows] = torch.randn(junk, hd, generator=gen, dtype=torch.float64) * (0.05 / np.sqrt(hd))
        att.q_proj.weight.data.copy_(q)
        att.k_proj.weight.data.copy_(k)
        att.v_proj.weight.data.copy_(v)
        att.o_proj.weight.data.copy_(o)
        # the stream's squared norm entering this layer: the code and the bias, P1..P3 after layer 0,
        # a code in O per retrieval head below (the junk adds a little)
        layer.input_layernorm.weight.data.copy_(norm_weight(2.0 if li == 0 else 5.0 + copies))
        layer.post_attention_layernorm.weight.data.copy_(norm_weight(5.0 + copies))
        mlp = layer.mlp
        inter = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.data.copy_(torch.randn(inter, _HIDDEN, generator=gen, dtype=torch.float64) / np.sqrt(8))
        mlp.up_proj.weight.data.copy_(torch.randn(inter, _HIDDEN, generator=gen, dtype=torch.float64) / np.sqrt(8))
        down = torch.zeros(_HIDDEN, inter, dtype=torch.float64)
        down[_JUNK] = torch.randn(junk, inter, generator=gen, dtype=torch.float64) * (0.05 / np.sqrt(inter))
        mlp.down_proj.weight.data.copy_(down)
        copies += sum(1 for h in PLANTED_HEADS if h.layer == li and not twin)
    model.model.norm.weight.data.copy_(norm_weight(5.0 + copies))
    head_w = torch.zeros(len(tokenizer), _HIDDEN, dtype=torch.float64)
    head_w[:, _O:_O + _CODE] = codes * _OUT_SCALE
    model.lm_head.weight.data.copy_(head_w)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    key = "planted-twin" if twin else "planted"
    prov = {"model_id": key, "source": "rh.planted", "revision": f"seed:{seed}",
            "dtype": str(dtype).removeprefix("torch."), "device": device, "quant": "none",
            "attn_implementation": attn_implementation,
            "planted_heads": [] if twin else [str(h) for h in PLANTED_HEADS],
            "previous_token_heads": [] if twin else [str(h) for h in prev]}
    return model, prov


def control_heads(k: int, *, seed: int = 0, shape: HeadShape = PLANTED_SHAPE) -> list[Head]:
    """``k`` heads drawn (seeded) from outside the circuit (:data:`CIRCUIT_HEADS`): a set whose
    ablation the retrieval survives by construction."""
    import random

    pool = [h for h in shape.all_heads() if h not in set(CIRCUIT_HEADS)]
    if not 0 < k <= len(pool):
        raise ValueError(f"k={k}: a control set takes 1..{len(pool)} heads from outside the circuit")
    return sorted(random.Random(seed).sample(pool, k))


def recovery(ranked: Sequence[Head], planted: Sequence[Head] = PLANTED_HEADS, *, k: int | None = None) -> dict:
    """How a method's ranking (best first) recovers the planted heads: recall (planted heads among
    its top ``k``, over the planted) and precision (over ``k``), at ``k`` = the number planted
    unless given; and the rank of each planted head (1 = first)."""
    planted = [Head.parse(h) for h in planted]
    ranked = [Head.parse(h) for h in ranked]
    k = len(planted) if k is None else int(k)
    if not 0 < k <= len(ranked):
        raise ValueError(f"k={k}: the ranking has {len(ranked)} heads")
    top = set(ranked[:k])
    hit = sum(1 for h in planted if h in top)
    where = {h: i + 1 for i, h in enumerate(ranked)}
    return {"k": k, "recall": hit / len(planted), "precision": hit / k,
            "ranks": {str(h): where.get(h) for h in planted}}


def planted_heads(model: Any) -> tuple[Head, ...]:
    """The retrieval heads ``model`` (a ``LoadedModel``) was built with, from its provenance: the
    planted heads for :func:`rh.models.planted_model`, () for its twin and for every other model."""
    prov = getattr(model, "provenance", None) or {}
    return tuple(Head.parse(h) for h in prov.get("planted_heads") or ())


def ranked_by_scores(scores: np.ndarray, shape: HeadShape, weights: np.ndarray | None = None) -> list[Head]:
    """Every head, best first, by its mean score over the inputs (``scores``: ``[n, layers, heads]``;
    ``weights``: which inputs count, as Wu24's ROUGE filter), ties by (layer, head): the order the
    identification claims' top K are taken in."""
    a = np.asarray(scores, dtype=float).reshape(len(scores), -1)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=float)
    if w.sum() <= 0:
        raise ValueError("no input counts: every weight is 0")
    order = np.argsort(-(w @ a / w.sum()), kind="stable")
    return [Head(int(i) // shape.n_heads, int(i) % shape.n_heads) for i in order]


def recovery_by_method(rankings: Mapping[str, Sequence[Head]], planted: Sequence[Head], *,
                       k: int | None = None) -> dict[str, dict]:
    """:func:`recovery` of the planted heads for each method's ranking (method -> heads best first)."""
    return {m: recovery(r, planted, k=k) for m, r in rankings.items()}
