"""Every method on the same cases, side by side: results.json, results.md and
plots, and for the sequential mode lifelong.md and lifelong.png (each score
against the number of edits made)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from accelerate.utils import gather_object

from ..processes import process_state
from .harness import BASELINES, EvalConfig, aggregate, config_record, evaluate, locality_references
from .sequence_state import canonical, write_json
from .report import lifelong_table, markdown_table, plot_cost, plot_lifelong, plot_quality


def run_bench(model, tokenizer, cases, methods: list[str], modes=("single",), settings: dict | None = None,
              config: EvalConfig | None = None, out_dir: str | Path = "bench", model_name: str = "",
              progress: bool = True, resume: bool = False) -> list[dict]:
    """Evaluate each method (baselines once, pack methods once per mode) on `cases`,
    with the unedited model's locality answers computed once for all. A method
    written "name@variant" runs `name` with the settings given for "name@variant",
    so settings compare side by side in one run. Launched in several processes
    (`accelerate launch`, `kedit bench --processes N`), each scores its share of
    the cases and the first gathers one result, the one a single process gives;
    only the single mode splits so (batch and sequential edit the cases together).

    The results are written after each method, so a run that is cut short keeps
    the methods it finished; with `resume`, a method whose result `out_dir`
    already holds for the same model, cases, mode, settings and evaluation
    settings is taken from there instead of run again. A sequential run keeps its
    progress in `out_dir/state` after every pack (git ignores its packs), with the
    unedited model's answers, and with `resume` goes on from the last pack kept:
    a sequence of thousands of edits can be run in pieces.

    Example:
        >>> run_bench(model, tokenizer, cases, ["unedited", "icl", "lora"], out_dir="bench")
        >>> run_bench(model, tokenizer, cases, ["sake", "sake@reg1"], settings={"sake@reg1": {"reg": 1.0}})
    """
    state = process_state()
    together = [m for m in modes if m != "single"]
    if state.num_processes > 1 and together and any(s.partition("@")[0] not in BASELINES for s in methods):
        raise ValueError(f"modes {together} edit all cases together, so they do not split across "
                         f"{state.num_processes} processes: run them in one process, or only --modes single")
    if state.num_processes > max(len(cases), 1):
        # a process without a case would miss the collective steps (gathering, key statistics) of the others
        raise ValueError(f"{len(cases)} cases for {state.num_processes} processes: give at most one process a case")
    progress = progress and state.is_main_process
    out = Path(out_dir)
    config = config or EvalConfig()
    done = _written(out) if resume else []
    kept = out / "state" if "sequential" in modes else None  # where long sequences keep their progress
    references, pre_edit_seconds = None, None
    with state.split_between_processes(list(cases)) as mine:
        results = []
        for spec in methods:
            method, _, variant = spec.partition("@")
            for mode in (("single",) if method in BASELINES else modes):
                identity = _identity({"model": model_name, "method": method, "variant": variant or None,
                                      "mode": mode, "settings": (settings or {}).get(spec) or {},
                                      "config": config_record(config), "case_ids": [c.id for c in cases]})
                earlier = next((r for r in done if _identity(r) == identity), None)
                if earlier is not None:
                    results.append(earlier)
                    continue
                if references is None:  # once, and only when a method is run
                    start = time.perf_counter()
                    references = _references(model, tokenizer, mine, config, kept, model_name, resume, progress)
                    pre_edit_seconds = max(gather_object([time.perf_counter() - start]))
                result = evaluate(model, tokenizer, mine, method, mode, (settings or {}).get(spec), config,
                                  references, model_name, progress,
                                  state_dir=kept / f"{spec}-{mode}" if mode == "sequential" else None, resume=resume)
                results.append(gathered(gather_object([result]), cases) if state.num_processes > 1 else result)
                results[-1]["timing"]["pre_edit_seconds"] = pre_edit_seconds  # shared by the methods run
                if variant:
                    results[-1]["variant"] = variant
                if state.is_main_process:
                    _write(results, out, plots=False)  # a run cut short keeps what it finished
    if state.is_main_process:
        _write(results, out)
    state.wait_for_everyone()
    return results


def _references(model, tokenizer, cases, config: EvalConfig, folder: Path | None, model_name: str, resume: bool,
                progress: bool) -> dict:
    """The unedited model's locality answers (`locality_references`), kept in
    `folder` when given and read from there when resuming the same cases, since
    at thousands of cases they take minutes."""
    path = folder / "references.json" if folder is not None else None
    identity = {"model": model_name, "config": config_record(config), "case_ids": [c.id for c in cases]}
    if resume and path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if canonical(saved["identity"]) == canonical(identity):
                return saved["references"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            pass  # not what this run wrote: computed again below and replaced
    references = locality_references(model, tokenizer, cases, config, progress)
    if path is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".gitignore").write_text("references.json*\n")  # each sequence's folder says what it keeps
        write_json(path, {"identity": identity, "references": references})
    return references


def _identity(result: dict) -> str:
    """What makes two results the same run's: model, method, variant, mode, settings,
    evaluation settings and cases, as JSON (so tuples and lists compare equal)."""
    keys = ("model", "method", "variant", "mode", "settings", "config", "case_ids")
    return canonical({k: result.get(k) for k in keys})


def _written(out: Path) -> list[dict]:
    """The results an earlier run wrote into `out` (none if it wrote nothing)."""
    path = out / "results.json"
    if not path.is_file():
        return []
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot resume from {path}: it is not valid JSON ({e}); remove it, or run without "
                         "resuming") from None
    if not isinstance(found, list) or not all(isinstance(r, dict) for r in found):
        raise ValueError(f"cannot resume from {path}: it is not a list of results; remove it, or run without "
                         "resuming")
    return found


def gathered(parts: list[dict], cases) -> dict:
    """One method's results from the processes that scored a share of `cases` each,
    as one process would report them: per-case scores in case order, their means,
    the editing figures over all packs; the scoring time is the slowest process's."""
    per_case = {}
    for part in parts:
        per_case.update(part["per_case"])
    order = [c.id for c in cases]
    per_case = {i: per_case[i] for i in order}
    edits = {c.id: len(c.edits) for c in cases}
    n_edits = [sum(edits[i] for i in part["case_ids"]) for part in parts]
    timings = [part["timing"] for part in parts]
    packs = [s for t in timings for s in t["edit_seconds_per_pack"]]
    edits_per_pack = [n for t in timings for n in t["edits_per_pack"]]

    def per_edit(key):  # None for the baselines, which make no pack
        made = [(t[key], n) for t, n in zip(timings, n_edits) if t[key] is not None]
        return sum(v * n for v, n in made) / sum(n for _, n in made) if made else None

    seconds_per_edit = [s / n for s, n in zip(packs, edits_per_pack)]
    timing = {"edit_seconds_median": statistics.median(seconds_per_edit) if seconds_per_edit else None,
              "edit_seconds_per_pack": packs, "edits_per_pack": edits_per_pack, "eval_seconds": max(t["eval_seconds"] for t in timings),
              "pack_bytes_per_edit": per_edit("pack_bytes_per_edit"),
              "pack_params_per_edit": per_edit("pack_params_per_edit"), "processes": len(parts)}
    return {**parts[0], "n_cases": len(order), "case_ids": order, "metrics": aggregate(per_case),
            "per_case": per_case, "timing": timing}


def _write(results: list[dict], out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    write_json(out / "results.json", results, indent=1)
    (out / "results.md").write_text(table + "\n")
    if not plots:
        return
    plot_quality(results, out / "quality.png")
    plot_cost(results, out / "cost.png")
    print(table)
    if any(r.get("checkpoints") for r in results):
        lifelong = lifelong_table(results)
        (out / "lifelong.md").write_text(lifelong + "\n")
        plot_lifelong(results, out / "lifelong.png")
        print(lifelong)
