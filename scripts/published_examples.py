"""Write an rh ranking out in each published format rh reads (for ``python -m rh audit``'s end-to-end
check, and to see what each format keeps of a ranking):

    python scripts/published_examples.py fixtures/rankings/<file>.json OUT_DIR [--top 10]

- ``qrhead_scores.json``: QRHead's detection output, every head with its score, best first;
- ``qrhead_heads.txt``: a QRHead head-set string of the top heads ("L-H,L-H,...");
- ``full_attention_heads.tsv``: DuoAttention's gates, one per KV head: the group's best score,
  scaled to [0, 1] (so every query head of a group ties, as in DuoAttention);
- ``razor_heads.json``: ``{layer: [heads]}`` of the top heads (a set, RazorAttention-style);
- ``heads.yaml``: the top heads as a plain YAML list.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rh.rankings import load_ranking


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ranking")
    ap.add_argument("out")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    r = load_ranking(args.ranking)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    top = r.top(args.top)
    (out / "qrhead_scores.json").write_text(json.dumps([[f"{h.layer}-{h.head}", r.scores[h]] for h in r.heads]))
    (out / "qrhead_heads.txt").write_text(",".join(f"{h.layer}-{h.head}" for h in top) + "\n")
    shape = r.shape
    kv = shape.n_kv_heads  # rh's ranking files record the model's KV heads
    group = shape.n_heads // kv
    lo, hi = min(r.scores.values()), max(r.scores.values())
    rows = []
    for l in range(shape.n_layers):
        gates = [max(r.scores[h] for h in r.shape.all_heads() if h.layer == l and h.head // group == g) for g in range(kv)]
        rows.append("\t".join(f"{(x - lo) / (hi - lo):.18e}" for x in gates))
    (out / "full_attention_heads.tsv").write_text("\n".join(rows) + "\n")
    per_layer: dict[str, list[int]] = {}
    for h in top:
        per_layer.setdefault(str(h.layer), []).append(h.head)
    (out / "razor_heads.json").write_text(json.dumps(per_layer))
    (out / "heads.yaml").write_text("".join(f"- {h}\n" for h in top))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


if __name__ == "__main__":
    main()
