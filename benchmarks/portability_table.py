"""Portability on several benchmarks side by side (issue 17): per benchmark and
method, efficacy, portability (`tf` and `gen`, and `tf` per portability
group) and locality, with the 95 %
paired bootstrap interval of each method's portability difference from a
reference method (ROME unless told). Each benchmark is one or more `kedit
bench` results.json files of runs on the same records. Prints a Markdown
table; writes results.json, results.md and portability.png into --out.

    python benchmarks/portability_table.py \\
        --run mquake=docs/bench/portability/mquake/results.json \\
        --run knowedit-recent=docs/bench/portability/knowedit-recent/results.json \\
        --out docs/bench/portability
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from paired_difference import paired, runs
from slice_table import mean_score

SHOWN = [("efficacy", "tf"), ("portability", "tf"), ("portability", "gen"), ("locality", "tf")]
AGAINST = [("portability", "tf"), ("portability", "gen")]


def groups_of(found: dict) -> list[str]:
    """The benchmark's portability groups ("portability/Reasoning", ...), in first-seen order."""
    return list(dict.fromkeys(m for per_case in found.values() for s in per_case.values() for m in s
                              if m.startswith("portability/")))


def benchmark_rows(found: dict, reference: str, resamples: int, seed: int) -> dict:
    """method -> {"metric score": {"mean", "cases"}, "metric score − reference": interval or None},
    each portability group's `tf` among the metrics."""
    rows = {}
    for label, per_case in found.items():
        row = {}
        for metric, score in SHOWN + [(group, "tf") for group in groups_of(found)]:
            cases = sum(1 for s in per_case.values() if metric in s and s[metric][score] is not None)
            row[f"{metric} {score}"] = {"mean": mean_score(per_case, metric, score), "cases": cases}
        for metric, score in AGAINST:
            c = paired(per_case, found[reference], metric, score, resamples, seed) \
                if reference in found and label != reference else None
            row[f"{metric} {score} − {reference}"] = None if c is None else {
                "mean": c[0], "low": c[1], "high": c[2], "cases": c[3]}
        rows[label] = row
    return rows


def markdown(tables: dict, reference: str) -> str:
    lines = []
    for benchmark, rows in tables.items():
        header = [f"{m} {s}" for m, s in SHOWN] + [f"{m} {s} − {reference}" for m, s in AGAINST]
        lines += [f"### {benchmark}", "", "| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for label, row in rows.items():
            cells = []
            for key in header:
                c = row[key]
                if c is None or c["mean"] is None:
                    cells.append("–")
                elif "low" in c:
                    cells.append(f"{c['mean']:+.2f} ({c['low']:+.2f} to {c['high']:+.2f})")
                else:
                    cells.append(f"{c['mean']:.2f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        cases = sorted({c["cases"] for row in rows.values() for k, c in row.items()
                        if c and k.split()[0] == "portability"})
        lines += ["", f"Cases with a portability probe: {'/'.join(map(str, cases)) or 'none'}.", ""]
        groups = [key for key in next(iter(rows.values()), {}) if key.startswith("portability/")]
        if groups:
            lines += ["| method | " + " | ".join(f"{g.split('/', 1)[1]} (cases)" for g in groups) + " |",
                      "|---" * (len(groups) + 1) + "|"]
            for label, row in rows.items():
                lines.append(f"| {label} | " + " | ".join(
                    "–" if row[g]["mean"] is None else f"{row[g]['mean']:.2f} ({row[g]['cases']})" for g in groups)
                    + " |")
            lines += ["", "Portability `tf` by group.", ""]
    return "\n".join(lines)


def plot(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(label for rows in tables.values() for label in rows))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tables), 3.6))
    for j, label in enumerate(methods):
        xs, ys = [], []
        for i, rows in enumerate(tables.values()):
            mean = rows.get(label, {}).get("portability tf", {}).get("mean")
            if mean is not None:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(mean)
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(tables)), list(tables), fontsize=8)
    ax.set_ylabel("portability tf")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="BENCHMARK=RESULTS.JSON",
                        help="a benchmark's name and one of its results.json files (repeat for more)")
    parser.add_argument("--reference", default="rome")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    files: dict[str, list[Path]] = {}
    for run in args.run:
        name, sep, path = run.partition("=")
        if not sep or not name or not path:
            parser.error(f"--run {run!r}: give BENCHMARK=RESULTS.JSON")
        files.setdefault(name, []).append(Path(path))
    tables = {name: benchmark_rows(runs(paths), args.reference, args.resamples, args.seed)
              for name, paths in files.items()}
    text = markdown(tables, args.reference) + (
        f"Mean paired difference from {args.reference} and its 95 % bootstrap interval "
        f"({args.resamples} resamples, seed {args.seed}); `–`: no {args.reference} run or no probe.\n")
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"reference": args.reference, "files": {k: [str(p) for p in v] for k, v in files.items()},
         "resamples": args.resamples, "seed": args.seed, "benchmarks": tables}, indent=2) + "\n")
    plot(tables, args.out / "portability.png")


if __name__ == "__main__":
    main()
