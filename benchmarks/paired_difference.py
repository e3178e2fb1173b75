"""Each method's difference from a reference method, with a 95 % paired bootstrap
interval over the cases both were scored on, read from `kedit bench` results
(one or more results.json files of runs on the same records and model).
Prints a Markdown table; writes results.json and results.md into --out.

    python benchmarks/paired_difference.py --reference rome \\
        docs/bench/finetune-counterfact-100/results.json docs/bench/svf-counterfact-100/results.json \\
        --out docs/bench/svf-counterfact-100/against-rome
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SCORES = [("efficacy", "tf"), ("generality", "tf"), ("locality", "cmp"), ("locality", "tf"), ("portability", "tf")]


def runs(paths: list[Path]) -> dict[str, dict]:
    """Method label -> its per-case scores; a label seen twice keeps its first run."""
    found = {}
    for path in paths:
        for run in json.loads(path.read_text()):
            method = run["method"] + (f"@{run['variant']}" if run.get("variant") else "")
            label = method if run["mode"] == "single" else f"{method} ({run['mode']})"
            found.setdefault(label, run["per_case"])
    return found


def paired(a: dict, b: dict, metric: str, score: str, resamples: int, seed: int):
    """(mean of a − b, 2.5 and 97.5 percentiles of its bootstrap, cases) over the cases both score."""
    pairs = [(a[c][metric][score], b[c][metric][score]) for c in a if c in b and metric in a[c] and metric in b[c]
             and a[c][metric][score] is not None and b[c][metric][score] is not None]
    if not pairs:
        return None
    diffs = [x - y for x, y in pairs]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return sum(diffs) / len(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1], len(diffs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of kedit bench")
    parser.add_argument("--reference", required=True, help="the method every other is compared with")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    found = runs(args.results)
    if args.reference not in found:
        parser.error(f"no run of {args.reference!r} in the files: they hold {sorted(found)}")
    rows = {}
    for label, per_case in found.items():
        if label != args.reference:
            rows[label] = {f"{m} {s}": paired(per_case, found[args.reference], m, s, args.resamples, args.seed)
                           for m, s in SCORES}
    header = [f"{m} {s}" for m, s in SCORES]
    table = [f"| method − {args.reference} | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for label, cells in rows.items():
        shown = [f"{c[0]:+.2f} ({c[1]:+.2f} to {c[2]:+.2f})" if c else "–" for c in cells.values()]
        table.append(f"| {label} | " + " | ".join(shown) + " |")
    cases = {c[3] for cells in rows.values() for c in cells.values() if c}
    table += ["", f"Mean paired difference and 95 % bootstrap interval ({args.resamples} resamples of "
              f"{'/'.join(map(str, sorted(cases)))} cases, seed {args.seed})."]
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(table) + "\n"
    print(text, end="")
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"reference": args.reference, "files": [str(p) for p in args.results], "resamples": args.resamples,
         "seed": args.seed, "differences": {label: {k: None if c is None else
                                                     {"mean": c[0], "low": c[1], "high": c[2], "cases": c[3]}
                                                     for k, c in cells.items()} for label, cells in rows.items()}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
