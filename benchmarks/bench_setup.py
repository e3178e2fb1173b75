"""What every benchmark script starts with: the common part of its arguments
(--model, --out), the model it measures, and how its results are written."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_kedit.models import load_model


def arguments(doc: str, out: str | None) -> argparse.ArgumentParser:
    """A parser described by the script's docstring, with --model (a name for
    `load_model`: the embedded default model unless told) and --out (the
    folder its results go to; required where `out` is None)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="default", help='"default", a local folder or a Hub id')
    parser.add_argument("--out", default=out, required=out is None, help="the folder to write results into")
    return parser


def prepared(args) -> tuple:
    """(model, tokenizer, out folder): the model --model names, and --out created."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    return model, tokenizer, out


def plot_against(path: Path, xs: list, series: dict[str, list[float]], baselines: dict[str, float],
                 xlabel: str) -> None:
    """A PNG of each score in `series` against `xs` (log scale), with its entry of
    `baselines` as a dotted line of the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, ys in series.items():
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        ax.axhline(baselines[label], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, table: str, results: dict) -> None:
    """Print the Markdown `table` and write it to results.md, and `results` to results.json."""
    table = table.rstrip("\n") + "\n"
    print(table, end="")
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
