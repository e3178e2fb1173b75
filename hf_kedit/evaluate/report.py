"""What people look at: a Markdown table and plots of evaluation results."""
from __future__ import annotations

from pathlib import Path

MAIN_METRICS = ("efficacy", "generality", "locality", "portability", "robustness")
SCORES = ("cmp", "tf", "gen")


def label(result: dict) -> str:
    """"rome (single)", "sake@reg1 (single)", "unedited"."""
    name = result["method"] + (f"@{result['variant']}" if result.get("variant") else "")
    return name if result["method"] in ("unedited", "icl") else f"{name} ({result['mode']})"


def markdown_table(results: list[dict]) -> str:
    """Methods as rows; each main metric's cmp / tf / gen, fluency, and cost."""
    metrics = [m for m in MAIN_METRICS if any(m in r["metrics"] for r in results)]
    header = (["method"] + [f"{m} cmp / tf / gen" for m in metrics]
              + ["fluency", "s/edit", "eval s", "bytes/edit", "params/edit"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [label(r)]
        for m in metrics:
            scores = r["metrics"].get(m, {})
            cells.append(" / ".join(_num(scores.get(k)) for k in SCORES))
        timing = r["timing"]
        cells += [_num(r["metrics"].get("fluency", {}).get("entropy")), _num(timing["edit_seconds_median"]),
                  f"{timing['eval_seconds']:.0f}", _num(timing["pack_bytes_per_edit"], "{:.0f}"),
                  _num(timing.get("pack_params_per_edit"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LIFELONG_SCORES = (("efficacy", "tf"), ("generality", "tf"), ("locality", "tf"), ("efficacy", "cmp"),
                   ("generality", "cmp"), ("locality", "cmp"))


def lifelong_table(results: list[dict], unedited: dict | None = None) -> str:
    """One row per sequential method and checkpoint: the scores, general ability and cost so far;
    last, the `unedited` model's scores (a `--methods unedited` result) when given."""
    header = (["method", "edits", "scored"] + [f"{m} {k}" for m, k in LIFELONG_SCORES]
              + ["perplexity ×", "tokens/s ×", "edit s", "pack bytes/edit", "parameters/edit"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        for c in r.get("checkpoints", []):
            general, timing = c["general_ability"], c["timing"]
            cells = [label(r), str(c["n_edits"]), str(c["n_scored"])]
            cells += [_num(c["metrics"].get(m, {}).get(k)) for m, k in LIFELONG_SCORES]
            cells += [_num(general["perplexity_ratio"], "{:.3f}"), _num(general["tokens_per_second_ratio"]),
                      f"{timing['edit_seconds']:.0f}", f"{timing['pack_bytes'] / c['n_edits']:.0f}",
                      _num(timing.get("pack_parameters") and timing["pack_parameters"] / c["n_edits"], "{:.0f}")]
            lines.append("| " + " | ".join(cells) + " |")
    if unedited is not None:
        scores = [_num(unedited["metrics"].get(m, {}).get(k)) for m, k in LIFELONG_SCORES]
        lines.append("| " + " | ".join([f"unedited (its first {unedited['n_cases']} cases)", "0",
                                        str(unedited["n_cases"]), *scores, "1.000", "1.00", "–", "–", "–"]) + " |")
    return "\n".join(lines)


def plot_lifelong(results: list[dict], path: str | Path) -> None:
    """Each tf score against the number of edits made, one line per sequential method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, (metric, kind) in zip(axes, LIFELONG_SCORES[:3]):
        for r in results:
            points = [(c["n_edits"], c["metrics"].get(metric, {}).get(kind)) for c in r.get("checkpoints", [])]
            points = [(n, v) for n, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label(r))
        ax.set_xscale("log")
        ax.set_xlabel("edits made")
        ax.set_title(f"{metric} {kind}")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("score")
    drawn = [ax for ax in axes if ax.lines]
    if drawn:
        drawn[-1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(results: list[dict], path: str | Path) -> None:
    """One panel per score kind, the main metrics grouped, one bar per method."""
    plt = _pyplot()
    metrics = [m for m in MAIN_METRICS if any(m in r["metrics"] for r in results)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    width = 0.8 / max(len(results), 1)
    for ax, kind in zip(axes, SCORES):
        for j, r in enumerate(results):
            values = [r["metrics"].get(m, {}).get(kind) for m in metrics]
            xs = [i + j * width for i in range(len(metrics))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label(r))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))], metrics, rotation=20)
        ax.set_title({"cmp": "cmp: probability comparison", "tf": "tf: teacher-forced",
                      "gen": "gen: greedy generation"}[kind])
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("score")
    axes[-1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(results: list[dict], path: str | Path) -> None:
    """Seconds per edit and pack bytes per edit of the methods that make packs."""
    plt = _pyplot()
    editing = [r for r in results if r["timing"]["edit_seconds_median"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [label(r) for r in editing]
    left.barh(names, [r["timing"]["edit_seconds_median"] for r in editing], color="tab:orange")
    left.set_xlabel("seconds per edit (median)")
    right.barh(names, [r["timing"]["pack_bytes_per_edit"] for r in editing], color="tab:green")
    right.set_xlabel("pack bytes per edit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_threshold_curve(curve, path: str | Path) -> None:
    """A steering pack's scope trade-off (`hf_kedit.methods.steering.scope.calibrate_threshold`):
    in-scope prompts steered and out-of-scope prompts left alone, per threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(curve.thresholds, curve.in_scope, label="in scope: steered")
    ax.plot(curve.thresholds, curve.out_of_scope, label="out of scope: left alone")
    ax.axvline(curve.chosen, color="gray", linestyle="--", label=f"chosen {curve.chosen:.3g}")
    ax.set_xlabel("scope threshold (distance)")
    ax.set_ylabel("fraction of prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
