"""How many tokens the key statistics need: ROME on the same CounterFact cases
with C = E[kkᵀ] from N self-sampled tokens for each N of --tokens, and without
C (EasyEdit's no-covariance setting), side by side with the unedited model.
Times the statistics of each N from an empty cache (sampling and
accumulation). Prints a Markdown table; writes results.json, results.md and
stats_tokens.png into --out.

    python benchmarks/stats_tokens.py --tokens 1000,5000,20000 --skip 100 --limit 40 \\
        --out docs/bench/stats-tokens
"""
from __future__ import annotations

import os
import tempfile
import time

from hf_kedit.anatomy import anatomy_of
from hf_kedit.evaluate.bench import run_bench
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.harness import EvalConfig
from hf_kedit.methods.locate.rome import ROMEConfig
from hf_kedit.methods.requests import resolve_layer
from hf_kedit.methods.locate.stats import key_second_moments

from bench_setup import arguments, plot_against, prepared, write_results

METRICS = ("efficacy", "generality", "locality")
SCORES = [(m, k) for m in METRICS for k in ("cmp", "tf")]


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--tokens", default="1000,5000,20000", help="comma-separated statistics sizes")
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--limit", type=int, default=40)
    args = p.parse_args()
    sizes = [int(n) for n in args.tokens.split(",")]
    model, tokenizer, out = prepared(args)
    cases = read_cases("counterfact", args.data, limit=args.skip + args.limit)[args.skip:]
    layer = resolve_layer(ROMEConfig().layer, anatomy_of(model).num_layers)
    # An empty cache, so that each size is timed from scratch; the runs below then read it.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_KEDIT_CACHE"] = cache
        stats_seconds = {}
        for n in sizes:
            start = time.perf_counter()
            key_second_moments(model, tokenizer, [layer], n_tokens=n)
            stats_seconds[n] = time.perf_counter() - start
        variants = {"rome@none": {"covariance": False}} | {f"rome@{n}": {"stats_tokens": n} for n in sizes}
        results = run_bench(model, tokenizer, cases, ["unedited", *variants], settings=variants,
                            config=EvalConfig(metrics=METRICS), out_dir=out / "bench")

    rows = {r.get("variant", r["method"]): r["metrics"] for r in results}
    names = {"unedited": "unedited", "none": "rome, no C"} | {str(n): f"rome, C from {n} tokens" for n in sizes}
    seconds = {str(n): stats_seconds[n] for n in sizes}
    lines = ["| run | " + " | ".join(f"{m} {k}" for m, k in SCORES) + " | statistics s |",
             "|---" * (len(SCORES) + 2) + "|"]
    lines += [f"| {names[key]} | " + " | ".join(f"{rows[key][m][k]:.2f}" for m, k in SCORES)
              + (f" | {seconds[key]:.0f} |" if key in seconds else " | – |") for key in names]
    table = "\n".join(lines) + f"\n\nROME at layer {layer}, {len(cases)} CounterFact cases from record {args.skip}.\n"
    write_results(out, table, {"layer": layer, "skip": args.skip, "n": len(cases), "statistics_seconds": seconds,
                               "scores": rows})
    plot_against(out / "stats_tokens.png", sizes,
                 {f"{m} {k}": [rows[str(n)][m][k] for n in sizes] for m, k in SCORES},
                 {f"{m} {k}": rows["none"][m][k] for m, k in SCORES}, "statistics tokens (dotted: no C)")


if __name__ == "__main__":
    main()
