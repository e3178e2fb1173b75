"""Each method's scores on disjoint slices of a benchmark (a slice's runs are the
results.json files in folders of its name), with the 95 % paired bootstrap
interval of its difference from a reference method (the unedited model unless
told), the same over all slices pooled, and the spread of each score between
slices. Checks the goals of
held-out defaults (issue 25) on every slice. Prints a Markdown table; writes
results.json, results.md and slices.png into --out.

    python benchmarks/slice_table.py docs/bench/slices/counterfact-*/results.json --out docs/bench/slices
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from paired_difference import paired, runs

SCORES = [("efficacy", "cmp"), ("efficacy", "tf"), ("generality", "cmp"), ("generality", "tf"),
          ("locality", "cmp"), ("locality", "tf"), ("robustness", "gen")]
# (methods, score, test, threshold): "mean" compares the score itself; "low" the lower
# end of the interval of the difference from the reference.
GOALS = [(("rome", "steam"), ("locality", "cmp"), "low", -0.03),
         (("rome", "steam"), ("locality", "tf"), "mean", 0.95),
         (("rome", "steam"), ("efficacy", "cmp"), "mean", 0.95),
         (("rome", "steam"), ("generality", "cmp"), "mean", 0.90),
         (("sake",), ("robustness", "gen"), "mean", 0.85)]


# A score of k/n cases lands on a goal such as −0.03 only up to float rounding (−0.03000000000000001).
ROUNDING = 1e-9


def mean_score(per_case: dict, metric: str, score: str) -> float | None:
    values = [s[metric][score] for s in per_case.values() if metric in s and s[metric][score] is not None]
    return sum(values) / len(values) if values else None


def slice_rows(found: dict, reference: str, resamples: int, seed: int) -> dict:
    """method -> "metric score" -> {mean, difference from the reference with its interval}."""
    rows = {}
    for label, per_case in found.items():
        rows[label] = {}
        for metric, score in SCORES:
            mean = mean_score(per_case, metric, score)
            diff = None if label == reference else paired(per_case, found[reference], metric, score, resamples, seed)
            rows[label][f"{metric} {score}"] = {
                "mean": mean, "difference": None if diff is None else
                {"mean": diff[0], "low": diff[1], "high": diff[2], "cases": diff[3]}}
    return rows


def goal_checks(slices: dict) -> list[dict]:
    """Each goal on every slice, for its methods and their variants (`rome@…` for rome)."""
    checks = []
    for methods, (metric, score), test, threshold in GOALS:
        for name, rows in slices.items():
            for label, cells in rows.items():
                cell = cells.get(f"{metric} {score}")
                if (label.split("@")[0] not in methods or cell is None or cell["mean"] is None
                        or (test == "low" and cell["difference"] is None)):  # the reference itself
                    continue
                value = cell["mean"] if test == "mean" else cell["difference"]["low"]
                checks.append({"method": label, "score": f"{metric} {score}", "slice": name, "test": test,
                               "threshold": threshold, "value": value,
                               "met": value >= threshold - ROUNDING})
    return checks


def cell_text(cell: dict) -> str:
    if cell["mean"] is None:
        return "–"
    d = cell["difference"]
    return f"{cell['mean']:.2f}" + (f" ({d['mean']:+.2f}, {d['low']:+.2f} to {d['high']:+.2f})" if d else "")


def markdown(slices: dict, spread: dict, checks: list[dict], reference: str, resamples: int) -> str:
    header = [f"{m} {s}" for m, s in SCORES]
    lines = []
    for name, rows in slices.items():
        lines += [f"### {name}", "", "| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(cell_text(cells[h]) for h in header) + " |"
                  for label, cells in rows.items()]
        lines.append("")
    lines += ["### Spread between slices (the score's lowest and highest slice mean)", "",
              "| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for label, cells in spread.items():
        lines.append(f"| {label} | " + " | ".join(
            "–" if cells[h] is None else f"{cells[h][0]:.2f}–{cells[h][1]:.2f}" for h in header) + " |")
    lines += ["", "### Goals", "", "| method | score | goal | " + " | ".join(slices) + " |",
              "|---|---|---" + "|---" * len(slices) + "|"]
    for methods, (metric, score), test, threshold in GOALS:
        for method in dict.fromkeys(c["method"] for c in checks if c["score"] == f"{metric} {score}"):
            got = {c["slice"]: c for c in checks if c["method"] == method and c["score"] == f"{metric} {score}"}
            goal = (f"≥ {threshold:.2f}" if test == "mean" else f"interval's low end of − {reference} ≥ {threshold:+.2f}")
            lines.append(f"| {method} | {metric} {score} | {goal} | " + " | ".join(
                (f"{got[s]['value']:.3f} " + ("met" if got[s]["met"] else "**missed**")) if s in got else "–"
                for s in slices) + " |")
    lines += ["", f"Cells: mean (difference from {reference}, 95 % paired bootstrap interval over the slice's "
              f"cases, {resamples} resamples). \"all slices\": the cases of every slice pooled."]
    return "\n".join(lines) + "\n"


def plot(slices: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = [f"{m} {s}" for m, s in SCORES]
    methods = list(slices["all slices"])
    fig, axes = plt.subplots(1, len(header), figsize=(2.1 * len(header), 3.4), sharey=True)
    for ax, h in zip(axes, header):
        for i, method in enumerate(methods):
            for j, (name, rows) in enumerate(slices.items()):
                cell = rows.get(method, {}).get(h)
                if cell is None or cell["mean"] is None:
                    continue
                pooled = name == "all slices"
                ax.plot(i + (0.25 if pooled else -0.2 + 0.3 * j / max(len(slices) - 2, 1)), cell["mean"],
                        "D" if pooled else "o", color="black" if pooled else f"C{i}", markersize=4 if pooled else 3)
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=7)
        ax.set_title(h, fontsize=8)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("score (dots: slices, diamond: pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of kedit bench runs, one or more per "
                                                              "slice; a slice is named after its folder")
    parser.add_argument("--reference", default="unedited")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folders = {}
    for path in args.results:  # runs of one slice may come from several folders of the same name
        folders.setdefault(path.parent.name, []).append(path)
    per_slice = {name: runs(paths) for name, paths in folders.items()}
    pooled = {}
    for name, found in per_slice.items():
        for label, per_case in found.items():
            pooled.setdefault(label, {}).update({f"{name}/{case}": s for case, s in per_case.items()})
    for name, found in {**per_slice, "all slices": pooled}.items():
        if args.reference not in found:
            parser.error(f"{name}: no run of {args.reference!r}; it holds {sorted(found)}")
    slices = {name: slice_rows(found, args.reference, args.resamples, args.seed)
              for name, found in {**per_slice, "all slices": pooled}.items()}
    spread = {}
    for label in pooled:
        spread[label] = {}
        for metric, score in SCORES:
            means = [rows[label][f"{metric} {score}"]["mean"] for name, rows in slices.items()
                     if name != "all slices" and label in rows and rows[label][f"{metric} {score}"]["mean"] is not None]
            spread[label][f"{metric} {score}"] = (min(means), max(means)) if means else None
    checks = goal_checks(slices)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(slices, spread, checks, args.reference, args.resamples)
    print(text, end="")
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {"reference": args.reference, "files": [str(p) for p in args.results], "resamples": args.resamples,
         "seed": args.seed, "slices": slices, "spread": spread, "goals": checks}, indent=1) + "\n")
    plot(slices, args.out / "slices.png")


if __name__ == "__main__":
    main()
