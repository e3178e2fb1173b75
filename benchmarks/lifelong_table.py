"""One lifelong table and plot from several `kedit bench --modes sequential`
runs (one folder per method, each run alone on the machine), with the
unedited model's scores from a `kedit bench --methods unedited` run beside
them. Writes lifelong.md, lifelong.png and results.json into --out.

    python benchmarks/lifelong_table.py --runs docs/bench/lifelong-1000/{ultraedit,alphaedit,memit} \\
        --unedited docs/bench/lifelong-1000/unedited --out docs/bench/lifelong-1000
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_kedit.evaluate.report import LIFELONG_SCORES, lifelong_table, plot_lifelong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="bench output folders of sequential runs")
    p.add_argument("--unedited", default=None, help="a bench output folder with the unedited model's row")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = [r for run in args.runs for r in json.loads((Path(run) / "results.json").read_text())
               if r.get("checkpoints")]
    table = lifelong_table(results)
    if args.unedited:
        unedited = json.loads((Path(args.unedited) / "results.json").read_text())[0]
        scores = " | ".join(f"{unedited['metrics'].get(m, {}).get(k, float('nan')):.2f}" for m, k in LIFELONG_SCORES)
        table += (f"\n| unedited (its first {unedited['n_cases']} cases) | 0 | {unedited['n_cases']} | {scores} | "
                  "1.000 | 1.00 | – | – |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lifelong.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_lifelong(results, out / "lifelong.png")
    print(table)


if __name__ == "__main__":
    main()
