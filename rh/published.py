"""Published head files, loaded strictly: a *ranking* (every head, scored, in order) or a *head set*
(some heads, no order). They are different values: a claim that needs the top K of an order cannot
take a head set, and says so (:class:`HeadSetHasNoOrder`) instead of inventing one.

Formats (detected from the content, or named with ``fmt=``):

``qrhead``
    QRHead's detection output (princeton-pli/QRHead, ``exp_scripts/detection``): a JSON list
    ``[["L-H", score], ...]`` of every head, best first -> :class:`~rh.rankings.Ranking`.
``qrhead-set``
    QRHead's head-set string ``"14-22,13-16,..."`` (its configs' ``attn_head_set``): a JSON string,
    a text file holding the string, or a QRHead YAML config -> :class:`HeadSet`. The string lists
    the heads best first, but carries no scores; rh treats it as a set.
``duo``
    DuoAttention's ``full_attention_heads.tsv`` (mit-han-lab/duo-attention, ``attn_patterns/``):
    ``n_layers`` tab-separated rows of ``n_kv_heads`` gates in [0, 1]. Each query head takes its KV
    group's gate (query head ``h`` belongs to KV head ``h // (n_heads / n_kv_heads)``, as
    ``repeat_interleave`` in DuoAttention's code) -> :class:`~rh.rankings.Ranking`. Every query
    head of a group ties; ties are broken by layer, then query head, ascending (DuoAttention breaks
    them with random noise, so no order is "its" order): :func:`ties_at_cut` says when a top-K cut
    splits a tie.
``per-layer``
    RazorAttention- and CompressKV-style ``{"layer": [head indices]}`` JSON (query-head indices):
    a set, or a per-layer order without scores. A file listing some heads per layer is a
    :class:`HeadSet`; one listing every head of every layer (CompressKV's per-layer order) is no
    set at all, so ``per_layer=M`` takes the first M heads of each layer.
``heads``
    A plain head set: a JSON or YAML list (``["L16H1", "14-31", [3, 4]]``), or ``--heads
    L16H1,L14H31`` on the command line (:func:`parse_head_set`).

rh's own rankings, seed 003's and Wu24's files go through :func:`rh.rankings.load_ranking`.
Every error names the file; duplicate heads and duplicate keys are refused in every format.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rh.heads import Head, HeadShape, layer_matched_heads, random_heads, validate_heads
from rh.io import no_duplicate_keys
from rh.rankings import Ranking, load_ranking

FORMATS = ("qrhead", "qrhead-set", "duo", "per-layer", "heads")


class HeadSetHasNoOrder(ValueError):
    """A claim asked a head set for an order it does not have (the top K of a set, its bottom)."""


@dataclass(frozen=True)
class HeadSet:
    """Heads with no order: ``members`` in (layer, head) order, validated against ``shape``.

    It answers what CA-1 asks of a ranking at one K, the set's own size: ``top(len(set))`` is the set,
    random K-sets are drawn from outside it. Any other K raises :class:`HeadSetHasNoOrder`.
    """

    members: tuple[Head, ...]
    shape: HeadShape
    method: str = "head set"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        heads = validate_heads(self.members, self.shape)  # range and duplicates
        if not heads:
            raise ValueError("a head set needs at least one head")
        object.__setattr__(self, "members", tuple(sorted(heads)))

    def __len__(self) -> int:
        return len(self.members)

    def _no_order(self, what: str) -> HeadSetHasNoOrder:
        src = self.provenance.get("source_file") or "this head set"
        return HeadSetHasNoOrder(
            f"{what} needs an order, but {src} is a head set of {len(self)} heads with no scores: the only top-K "
            f"it defines is K={len(self)} (the set itself). Give a scored ranking (QRHead's head scores, a "
            "DuoAttention TSV, rh's or Wu24's file) to test other K")

    def top(self, k: int) -> list[Head]:
        if k != len(self):
            raise self._no_order(f"the top {k} heads")
        return list(self.members)

    def bottom(self, k: int) -> list[Head]:
        raise self._no_order(f"the bottom {k} heads")

    def random_outside_top(self, k: int, *, seed: int) -> list[Head]:
        return random_heads(self.shape, k, exclude=self.top(k), seed=seed)

    def random_layer_matched(self, k: int, *, seed: int) -> list[Head]:
        return layer_matched_heads(self.shape, self.top(k), seed=seed)

    def check_shape(self, shape: HeadShape) -> None:
        if (self.shape.n_layers, self.shape.n_heads) != (shape.n_layers, shape.n_heads):
            raise ValueError(
                f"{self.provenance.get('source_file', 'this head set')} was loaded for a {self.shape.n_layers} x "
                f"{self.shape.n_heads} model, but the model has {shape.n_layers} x {shape.n_heads}")

    def to_json(self) -> dict[str, Any]:
        return {"format": "rh.headset/1", "method": self.method, "shape": self.shape.as_dict(),
                "heads": [str(h) for h in self.members], "provenance": self.provenance}


def heads_under_test(ranking: Ranking | HeadSet, k: int) -> list[Head]:
    """The heads a claim about "the top K" tests: the ranking's top ``k``, or a head set's members
    (its only K is its size: ``--heads L2H5,L3H14`` asks the claim about those heads)."""
    return list(ranking.members) if isinstance(ranking, HeadSet) else ranking.top(k)


def ties_at_cut(ranking: Ranking, k: int) -> int:
    """How many heads share the K-th head's score on both sides of the cut (0 when the cut is clean):
    the top K then depends on the tie-breaking rule, not on the scores."""
    heads = ranking.heads
    if not 0 < k < len(heads):
        return 0
    s = ranking.scores[heads[k - 1]]
    if ranking.scores[heads[k]] != s:
        return 0
    return sum(1 for h in heads if ranking.scores[h] == s)


# --------------------------------------------------------------------------- loading


def load_heads(path: str | Path, *, shape: HeadShape, fmt: str = "auto",
               per_layer: int | None = None) -> Ranking | HeadSet:
    """Load a published ranking or head set for a model of ``shape`` (refused if it does not fit).

    ``fmt``: ``auto`` (detect), one of :data:`FORMATS`, or one of :data:`rh.rankings.FORMATS`.
    ``per_layer``: with a per-layer file, keep the first M heads of each layer listed.
    """
    from rh import rankings

    path = Path(path)
    where = f"head file {str(path)!r}"
    known = ("auto", *FORMATS, *rankings.FORMATS)
    if fmt not in known:
        raise ValueError(f"{where}: unknown format {fmt!r}; use one of {', '.join(known)}")
    if per_layer is not None and (isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer < 1):
        raise ValueError(f"per_layer={per_layer!r}: give the number of heads to keep in each layer, >= 1")
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    if fmt in rankings.FORMATS:
        return load_ranking(path, shape=shape, fmt=fmt)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not a text file ({exc.reason} at byte {exc.start}): give the JSON, "
                         "TSV, YAML or CSV file itself") from None
    if fmt == "duo" or (fmt == "auto" and path.suffix.lower() == ".tsv"):
        duo = _from_duo(text, where, shape, path)
        _note_model(duo.provenance, named_model(path))
        return duo
    if fmt == "auto" and (path.suffix.lower() == ".csv" or text.startswith("# ")):
        return load_ranking(path, shape=shape)  # rh's ranking CSV (rh identify --out r.csv): no JSON to parse
    data = _parse(text, where, path, fmt)
    if fmt == "auto":
        fmt = _detect(data, where, path)
    if fmt == "ranking":
        return load_ranking(path, shape=shape)
    prov = {"source_file": str(path), "source_format": fmt}
    _note_model(prov, named_model(path, data))
    if fmt == "qrhead":
        return _from_qrhead(data, where, shape, prov)
    if fmt == "qrhead-set":
        if isinstance(data, dict):
            data = data.get("attn_head_set")
        if not isinstance(data, str):
            raise ValueError(f"{where} is not a QRHead head-set string: expected \"14-22,13-16,...\" "
                             "(or a config with attn_head_set)")
        return HeadSet(tuple(_heads_in(parse_items(data), where, shape)), shape, "qrhead", prov)
    if fmt == "per-layer":
        return _from_per_layer(data, where, shape, prov, per_layer)
    if not isinstance(data, list):
        raise ValueError(f"{where} is not a list of heads: write [\"L16H1\", \"L14H31\", ...]")
    return HeadSet(tuple(_heads_in(data, where, shape)), shape, "head set", prov)


_MODEL_NAME = re.compile(r"(?i)((?:meta-)?(?:llama|mistral|mixtral|qwen|gemma|phi|olmo|smollm)[a-z0-9.\-]*\d[a-z0-9.\-]*)")


def named_model(path: str | Path, data: Any = None) -> str | None:
    """The model a published head file says it was found on, or None. Read where the publishers
    write it: a QRHead config's ``model_name_or_path`` (or ``model_base_class``), else the config
    file's own name (QRHead names each after its model); the folder a DuoAttention
    ``full_attention_heads.tsv`` sits in (``attn_patterns/<model>/<config>/``). Never guessed from
    other names: rh's own ranking files, or any folder of the user's, name no model here.
    ``data``: the file's parsed content where the caller has it (:func:`load_heads` does)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        if data is None:
            try:
                import yaml

                data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_strict_yaml_loader())
            except Exception:  # an unreadable file is load_heads's to refuse, with its own message
                data = None
        if isinstance(data, dict):
            for key in ("model_name_or_path", "model_base_class"):
                if isinstance(data.get(key), str) and data[key].strip():
                    return data[key].strip()
        parts: tuple[str, ...] = (path.stem,)
    elif suffix == ".tsv":
        parts = tuple(reversed(path.parent.parts))
    else:
        return None
    for part in parts:
        m = _MODEL_NAME.search(part)
        if m:
            return m.group(1).rstrip(".-")
    return None


def _model_key(name: str) -> str:
    name = name.strip().rstrip("/").split("/")[-1].lower().removeprefix("meta-")
    return re.sub(r"[^a-z0-9.]", "", name)


def model_mismatch(named: str | None, model: str | None) -> str | None:
    """A warning when a head file names another model than the one under test (a mismatch of
    version at the same shape, since a wrong shape is refused): the heads were found there."""
    if not named or not model or _model_key(named) == _model_key(model):
        return None
    return (f"the head file names {named!r} and the model under test is {model!r}: the heads were found on "
            "another model of this shape (another version or fine-tune?); the verdicts test them on this one")


def _note_model(prov: dict, name: str | None) -> None:
    if name:
        prov["named_model"] = name  # the model the file says its heads were found on


def parse_items(spec: str) -> list[str]:
    """``"L16H1, 14-31,,"`` -> ``["L16H1", "14-31"]`` (empty items, as in QRHead's configs, dropped)."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def parse_head_set(spec: str, shape: HeadShape, *, source: str = "--heads") -> HeadSet:
    """``--heads L16H1,L14H31`` (or ``16-1,14-31``) as a :class:`HeadSet`, checked against ``shape``."""
    items = parse_items(spec)
    if not items:
        raise ValueError(f"{source} {spec!r} names no head: write --heads L16H1,L14H31")
    return HeadSet(tuple(_heads_in(items, source, shape)), shape, "head set", {"source": f"{source} {spec}"})


def _parse(text: str, where: str, path: Path, fmt: str) -> Any:
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{where} is empty")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.load(stripped, Loader=_strict_yaml_loader())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)  # the parser's message spans lines: one line here
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ValueError(f"{where} is not valid YAML ({what}{at})") from None
    try:
        return json.loads(stripped, object_pairs_hook=no_duplicate_keys(where, ": a head or layer may be listed once"))
    except json.JSONDecodeError as exc:
        if stripped[0] in "[{\"":
            raise ValueError(f"{where} is not valid JSON (truncated?): {exc}") from None
        if fmt in ("auto", "qrhead-set") and re.fullmatch(r"[\sLlHh\d,:_-]+", stripped):
            return stripped  # a bare head-set string in a text file
        raise ValueError(f"{where} is neither JSON nor a head-set string: {exc}") from None


def _strict_yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            keys.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def _detect(data: Any, where: str, path: Path) -> str:
    if isinstance(data, str):
        return "qrhead-set"
    if isinstance(data, dict):
        if isinstance(data.get("attn_head_set"), str):
            return "qrhead-set"
        if data and all(re.fullmatch(r"\d+", str(k)) for k in data):
            return "per-layer"
        if "model_type" in data and ("num_hidden_layers" in data or "architectures" in data):
            raise ValueError(f"{where} is a model's config.json, not a head file: give the heads (DuoAttention "
                             "writes them to full_attention_heads.tsv, QRHead to a config's attn_head_set)")
        if any(k in data for k in ("model_name_or_path", "model_base_class")) or path.suffix.lower() in (".yaml", ".yml"):
            raise ValueError(f"{where} is a config without attn_head_set: a QRHead config names its heads as "
                             "attn_head_set: \"14-22,13-16,...\" (add it, or give the head-set file)")
        return "ranking"  # rh's JSON, seed 003's or Wu24's: load_ranking detects and says what is wrong
    if isinstance(data, list) and data:
        first = data[0]
        if isinstance(first, (list, tuple)) and len(first) == 2 and isinstance(first[0], str) and _is_number(first[1]):
            return "qrhead"
        return "heads"
    raise ValueError(
        f"{where} is in no known format: expected QRHead's [[\"L-H\", score], ...] or head-set string, a "
        "{\"layer\": [heads]} JSON, a list of heads, or a ranking rh reads (rh, seed 003, Wu24)")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _heads_in(items: list[Any], where: str, shape: HeadShape) -> list[Head]:
    """Parse and validate heads, naming the file and the item in any error."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Head.parse(item))
        except ValueError:
            raise ValueError(f"{where}: item {i + 1} ({item!r}) is not a head: write 'L16H1' or '16-1' (0-based "
                             "layer and query head)") from None
    try:
        return validate_heads(out, shape)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _from_qrhead(data: list, where: str, shape: HeadShape, prov: dict) -> Ranking:
    scores: dict[Head, float] = {}
    for i, row in enumerate(data):
        if not (isinstance(row, (list, tuple)) and len(row) == 2 and _is_number(row[1])):
            raise ValueError(f"{where}: row {i + 1} ({row!r}) is not [\"layer-head\", score]")
        try:
            head = Head.parse(row[0])
        except ValueError:
            raise ValueError(f"{where}: row {i + 1} ({row[0]!r}) is not a head: write 'L16H1' or '16-1'") from None
        if head in scores:
            raise ValueError(f"{where}: head {head} is listed twice")
        if not math.isfinite(float(row[1])):
            raise ValueError(f"{where}: head {head} has the score {row[1]!r}; every score must be finite")
        scores[head] = float(row[1])
    if len(scores) != shape.n_total:  # before the range check: "for another model" is the likelier story
        raise ValueError(
            f"{where} scores {len(scores)} heads, but the model has {shape.n_total} ({shape.n_layers} x "
            f"{shape.n_heads}): a ranking must score every head. Truncated, or for another model? A list of "
            "some heads is a head set: give it as [\"L16H1\", ...] or a head-set string")
    _heads_in(list(scores), where, shape)  # every head inside the model
    return Ranking("qrhead", shape, scores, prov)


def _from_duo(text: str, where: str, shape: HeadShape, path: Path) -> Ranking:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != shape.n_layers:
        raise ValueError(
            f"{where} has {len(lines)} rows, but the model has {shape.n_layers} layers: a DuoAttention "
            "full_attention_heads.tsv has one row per layer (truncated, or for another model?)")
    scores: dict[Head, float] = {}
    group = shape.group_size
    for l, line in enumerate(lines):
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) != shape.n_kv_heads:
            raise ValueError(
                f"{where}: row {l + 1} has {len(cells)} columns, but the model has {shape.n_kv_heads} KV heads "
                f"per layer: DuoAttention's file has one gate per KV head (tab-separated)")
        for kv, cell in enumerate(cells):
            try:
                g = float(cell)
            except ValueError:
                raise ValueError(f"{where}: row {l + 1}, column {kv + 1} ({cell!r}) is not a number") from None
            if not (math.isfinite(g) and 0.0 <= g <= 1.0):
                raise ValueError(f"{where}: row {l + 1}, column {kv + 1} is {cell}; a gate must lie in [0, 1]")
            for h in range(kv * group, (kv + 1) * group):
                scores[Head(l, h)] = g
    prov = {"source_file": str(path), "source_format": "duo",
            "tie_rule": "each query head takes its KV group's gate; ties broken by layer, then query head, ascending"}
    return Ranking("duo_attention", shape, scores, prov)


def _from_per_layer(data: dict, where: str, shape: HeadShape, prov: dict, per_layer: int | None) -> HeadSet:
    items: list[tuple[int, int]] = []
    complete = True
    for key, heads in data.items():
        layer = int(key)
        if str(layer) != str(key).strip():  # "07" and "7" would be the same layer
            raise ValueError(f"{where}: layer key {key!r} is not written plainly; write \"{layer}\"")
        if not 0 <= layer < shape.n_layers:
            raise ValueError(f"{where}: layer {layer} is outside the model (layers 0..{shape.n_layers - 1})")
        if not isinstance(heads, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
            raise ValueError(f"{where}: layer {key} must list query-head indices, e.g. \"{key}\": [3, 0, 7]")
        if len(set(heads)) != len(heads):
            raise ValueError(f"{where}: layer {key} lists a head twice")
        complete = complete and len(heads) == shape.n_heads
        items += [(layer, h) for h in (heads[:per_layer] if per_layer is not None else heads)]
    complete = complete and len(data) == shape.n_layers
    if complete and per_layer is None:
        raise ValueError(
            f"{where} lists every head of every layer (a per-layer order, as CompressKV writes): that is no head "
            "set. Choose how many of each layer's first heads to test: per_layer=M (--per-layer M)")
    prov = {**prov, **({"per_layer": per_layer} if per_layer is not None else {})}
    return HeadSet(tuple(_heads_in(items, where, shape)), shape, "per-layer set", prov)
