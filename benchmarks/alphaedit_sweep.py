"""AlphaEdit's null-space share and ridge against MEMIT, all in batch mode (one
pack for all --cases edits) on the same CounterFact cases: efficacy, generality
and locality (tf and cmp). Every variant shares MEMIT's v* (the same value
optimisation at the last edited layer, computed once here), so the variants
differ only in how each layer is solved; edit times are therefore not reported.
Prints a Markdown table; writes results.json and results.md into --out.

    python benchmarks/alphaedit_sweep.py --data ../shared/data/counterfact.json --start 100 --cases 100 \\
        --shares 0.05,0.2,0.4 --ridges 0.01,0.1,1 --out docs/bench/alphaedit-sweep
"""
from __future__ import annotations

from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.harness import EvalConfig, evaluate, locality_references
from hf_kedit.methods.locate import core

from bench_setup import arguments, prepared, write_results

SCORES = [("efficacy", "tf"), ("efficacy", "cmp"), ("generality", "tf"), ("generality", "cmp"), ("locality", "tf"),
          ("locality", "cmp")]


def shared_values():
    """Replace the value optimisation of MEMIT's layer loop by a memo of it (same module, edits and
    settings: same v*)."""
    optimise, memo = core.optimise_values, {}

    def remembered(model, tokenizer, module, edits, templates, config, *args, **kwargs):
        key = (id(module), tuple(e.id for e in edits), config.steps, config.lr, config.kl_factor,
               config.weight_decay, config.clamp_norm_factor, config.stop_nll, tuple(templates))
        if key not in memo:
            memo[key] = optimise(model, tokenizer, module, edits, templates, config, *args, **kwargs)
        return memo[key]
    core.optimise_values = remembered


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--format", default="counterfact")
    p.add_argument("--start", type=int, default=100)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--shares", default="0.05,0.2,0.4")
    p.add_argument("--ridges", default="0.01,0.1,1")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    cases = read_cases(args.format, args.data, limit=args.start + args.cases)[args.start:]
    config = EvalConfig(metrics=("efficacy", "generality", "locality"))
    references = locality_references(model, tokenizer, cases, config)
    shared_values()
    variants = {"unedited": ("unedited", None), "memit": ("memit", {})}
    for share in map(float, args.shares.split(",")):
        for ridge in map(float, args.ridges.split(",")):
            variants[f"alphaedit share {share:g} ridge {ridge:g}"] = (
                "alphaedit", {"nullspace_share": share, "ridge": ridge})
    results, rows = {}, []
    for name, (method, settings) in variants.items():
        result = evaluate(model, tokenizer, cases, method, "batch" if settings is not None else "single", settings,
                          config, references)
        results[name] = {f"{m} {k}": result["metrics"][m][k] for m, k in SCORES}
        rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in results[name].values()) + " |")
    header = "| method | " + " | ".join(f"{m} {k}" for m, k in SCORES) + " |"
    table = "\n".join([header, "|---" * (len(SCORES) + 1) + "|", *rows])
    table += (f"\n\nCases {args.start}-{args.start + args.cases - 1} of {args.data}, all edits in one pack per "
              "method; the v* of every variant are MEMIT's.\n")
    write_results(out, table, {"data": args.data, "start": args.start, "cases": args.cases, "results": results})


if __name__ == "__main__":
    main()
