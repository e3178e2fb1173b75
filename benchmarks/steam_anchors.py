"""How many edits STEAM finds semantic anchors for, from each source of facts: a
fact base file (--fact-base, repeatable) and the model itself (`fact_base`
unset: `model_facts`), on the first --limit cases of each --data benchmark, with
STEAM's default layers and recall filter. An edit is anchored when at least one
fact with its new target as object is recalled by the model. Prints a Markdown
table; writes results.json and results.md into --out.

    python benchmarks/steam_anchors.py --data counterfact:../shared/data/counterfact.json \\
        --data ripple:../shared/data/rippleedits_popular.json --limit 100 \\
        --fact-base ../shared/data/factbase_counterfact_true.json --out docs/bench/steam-anchors
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from hf_kedit.anatomy import anatomy_of
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.methods.locate.steam import STEAMConfig, model_facts, read_fact_base, semantic_anchors
from hf_kedit.methods.requests import edit_layers, resolve_layer

from bench_setup import arguments, prepared, write_results


def anchored(model, tokenizer, blocks, facts: list[dict], target: str, config: STEAMConfig) -> bool:
    return semantic_anchors(model, tokenizer, blocks, facts, target, config.anchor_facts,
                            config.recall_top_k) is not None


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", action="append", required=True, help="FORMAT:PATH of a benchmark (repeatable)")
    p.add_argument("--fact-base", action="append", default=[], help="a fact base JSON file (repeatable)")
    p.add_argument("--limit", type=int, default=100)
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    config = STEAMConfig()
    anatomy = anatomy_of(model)
    layer = resolve_layer(config.layer, anatomy.num_layers)
    mid = [l for l in edit_layers(config.mid_layers, anatomy.num_layers, "mid_layers") if l > layer]
    blocks = [model.get_submodule(anatomy.layer(l)) for l in mid]
    bases = {Path(path).name: read_fact_base(path) for path in args.fact_base}

    rows = []
    for spec in args.data:
        fmt, path = spec.split(":", 1)
        edits = [edit for case in read_cases(fmt, path, limit=args.limit) for edit in case.edits]
        counts = {name: 0 for name in [*bases, "model"]}
        facts_drawn = 0
        for edit in tqdm(edits, desc=f"anchors ({fmt})", unit="edit"):
            for name, facts in bases.items():
                counts[name] += anchored(model, tokenizer, blocks, facts, edit.target_new, config)
            own, _ = model_facts(model, tokenizer, [edit], config.model_fact_texts)
            facts_drawn += len(own)
            counts["model"] += anchored(model, tokenizer, blocks, own, edit.target_new, config)
        rows.append({"data": spec, "edits": len(edits), "anchored": counts,
                     "model_facts_per_edit": facts_drawn / max(len(edits), 1)})

    sources = [*bases, "model"]
    lines = ["| benchmark | edits | " + " | ".join(f"anchored, {s}" for s in sources) + " | model facts per edit |",
             "|---" * (len(sources) + 3) + "|"]
    lines += [f"| {r['data'].split(':')[0]} | {r['edits']} | "
              + " | ".join(f"{r['anchored'][s]} ({r['anchored'][s] / max(r['edits'], 1):.0%})" for s in sources)
              + f" | {r['model_facts_per_edit']:.1f} |" for r in rows]
    write_results(out, "\n".join(lines), {"layer": layer, "mid_layers": mid, "rows": rows})


if __name__ == "__main__":
    main()
