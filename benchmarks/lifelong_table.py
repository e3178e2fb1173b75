"""One lifelong table and plot from several `kedit bench --modes sequential`
runs (one folder per method, each run alone on the machine; a sequence not
finished yet contributes the checkpoints it has kept so far), with the
unedited model's scores from a `kedit bench --methods unedited` run beside
them. Writes lifelong.md, lifelong.png and results.json into --out.

    python benchmarks/lifelong_table.py --runs docs/bench/lifelong-1000/{ultraedit,alphaedit,memit} \\
        --unedited docs/bench/lifelong-1000/unedited --out docs/bench/lifelong-1000
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_kedit.evaluate.report import lifelong_table, plot_lifelong


def sequences(run: Path) -> list[dict]:
    """The sequential results a bench folder holds, and for each sequence not
    finished (cut short, or still running) a result of the checkpoints its
    progress in state/ kept so far (mode "sequential, so far")."""
    path = run / "results.json"
    results = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if r.get("checkpoints")]
    finished = {(r["method"], r.get("variant")) for r in results}
    for progress in sorted(run.glob("state/*-sequential/progress.json")):
        method, _, variant = progress.parent.name.removesuffix("-sequential").partition("@")
        saved = json.loads(progress.read_text())
        if (method, variant or None) not in finished and saved["progress"]["checkpoints"]:
            results.append({"method": method, "variant": variant or None, "mode": "sequential, so far",
                            "settings": saved["identity"]["settings"],
                            "checkpoints": saved["progress"]["checkpoints"]})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="bench output folders of sequential runs")
    p.add_argument("--unedited", default=None, help="a bench output folder with the unedited model's row")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = [r for run in args.runs for r in sequences(Path(run))]
    unedited = json.loads((Path(args.unedited) / "results.json").read_text())[0] if args.unedited else None
    table = lifelong_table(results, unedited)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lifelong.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_lifelong(results, out / "lifelong.png")
    print(table)


if __name__ == "__main__":
    main()
