"""Every method on the same cases, side by side: results.json, results.md and
plots, and for the sequential mode lifelong.md and lifelong.png (each score
against the number of edits made)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .harness import BASELINES, EvalConfig, evaluate, locality_references
from .report import lifelong_table, markdown_table, plot_cost, plot_lifelong, plot_quality


def run_bench(model, tokenizer, cases, methods: list[str], modes=("single",), settings: dict | None = None,
              config: EvalConfig | None = None, out_dir: str | Path = "bench", model_name: str = "",
              progress: bool = True) -> list[dict]:
    """Evaluate each method (baselines once, pack methods once per mode) on `cases`,
    with the unedited model's locality answers computed once for all. A method
    written "name@variant" runs `name` with the settings given for "name@variant",
    so settings compare side by side in one run.

    Example:
        >>> run_bench(model, tokenizer, cases, ["unedited", "icl", "lora"], out_dir="bench")
        >>> run_bench(model, tokenizer, cases, ["sake", "sake@reg1"], settings={"sake@reg1": {"reg": 1.0}})
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    references = locality_references(model, tokenizer, cases, config, progress)
    pre_edit_seconds = time.perf_counter() - start
    results = []
    for spec in methods:
        method, _, variant = spec.partition("@")
        for mode in (("single",) if method in BASELINES else modes):
            results.append(evaluate(model, tokenizer, cases, method, mode, (settings or {}).get(spec), config,
                                    references, model_name, progress))
            results[-1]["timing"]["pre_edit_seconds"] = pre_edit_seconds  # shared by all methods
            if variant:
                results[-1]["variant"] = variant
    table = markdown_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(table + "\n")
    plot_quality(results, out / "quality.png")
    plot_cost(results, out / "cost.png")
    print(table)
    if any(r.get("checkpoints") for r in results):
        lifelong = lifelong_table(results)
        (out / "lifelong.md").write_text(lifelong + "\n")
        plot_lifelong(results, out / "lifelong.png")
        print(lifelong)
    return results
