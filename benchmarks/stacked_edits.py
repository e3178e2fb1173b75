"""Many edits attached at once: N edits made by one method on the unedited model,
attached as N one-edit packs and then as one N-edit pack, scored on all N cases
(efficacy, generality, locality) next to the unedited model. Prints a Markdown
table; writes results.json, results.md and stacked.png into --out.

    python benchmarks/stacked_edits.py --method rome --limit 100 --out docs/bench/stacked-rome-100
"""
from __future__ import annotations

import json
import time

import matplotlib

from hf_kedit import load_edits, remove_edits
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.harness import EvalConfig, aggregate, locality_references
from hf_kedit.evaluate.metrics import score_cases
from hf_kedit.evaluate.scoring import Scorer
from hf_kedit.methods import make_pack

from bench_setup import arguments, prepared, write_results

METRICS = ("efficacy", "generality", "locality")


def scores(model, tokenizer, cases, references, config, desc) -> dict:
    scorer = Scorer(model, tokenizer, batch_size=config.batch_size)
    return aggregate(score_cases(scorer, [config.select(c) for c in cases], references, desc))


def setting(pair: str) -> tuple[str, object]:
    key, _, value = pair.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--method", default="rome")
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting (JSON value)")
    args = p.parse_args()
    settings = dict(setting(s) for s in args.set)
    model, tokenizer, out = prepared(args)
    cases = read_cases("counterfact", args.data, limit=args.limit)
    config = EvalConfig(metrics=METRICS)
    references = locality_references(model, tokenizer, cases, config)
    rows = {"unedited": scores(model, tokenizer, cases, references, config, "unedited")}

    start = time.perf_counter()
    pack = make_pack(args.method, model, tokenizer, [c.edits[0] for c in cases], settings)
    edit_seconds = (time.perf_counter() - start) / len(cases)

    for edit in pack.edits:
        load_edits(model, pack.select([edit.id]), name=edit.id)
    rows[f"{args.method}: {len(cases)} packs"] = scores(model, tokenizer, cases, references, config, "N packs")
    for edit in pack.edits:
        remove_edits(model, edit.id)
    load_edits(model, pack, name="all")
    rows[f"{args.method}: one pack"] = scores(model, tokenizer, cases, references, config, "one pack")
    remove_edits(model, "all")

    cells = [(m, k) for m in METRICS for k in ("cmp", "tf")]
    lines = ["| attached | " + " | ".join(f"{m} {k}" for m, k in cells) + " |", "|---" * (len(cells) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[m][k]:.2f}" for m, k in cells) + " |" for name, r in rows.items()]
    table = "\n".join(lines) + f"\n\n{args.method}: {edit_seconds:.2f} s per edit, {len(cases)} edits made in one call.\n"
    write_results(out, table, {"method": args.method, "settings": settings, "n": len(cases),
                               "edit_seconds_per_edit": edit_seconds, "scores": rows})
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(cells))], [r[m][k] for m, k in cells], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], [f"{m}\n{k}" for m, k in cells])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "stacked.png", dpi=120)


if __name__ == "__main__":
    main()
