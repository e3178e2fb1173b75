"""Edit, score, remove: one method on a list of cases in one edit mode.

Modes: `single` (each case edited alone, scored, removed: the pack stack makes
this exact), `batch` (all cases in one pack), `sequential` (packs of
`EvalConfig.pack_cases` cases accumulate, each made on the model as the earlier
ones left it; scored at each of `EvalConfig.checkpoints` and at the end, on the
cases edited so far or a fixed sample of them, with the general ability beside
the scores). Baselines that make no pack: `unedited`, and `icl`, which states
the case's edits before every prompt (EasyEdit's IKE/PROMPT format).
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..attach import load_edits, remove_edits, stack_of
from ..methods import METHODS, make_pack, new_history
from ..methods.in_context import fact_context
from ..pack import EditPack
from .cases import Case
from .general_ability import perplexity_ratio, speed_ratio
from .metrics import DOUBT_TEMPLATES, fluency, in_context, reference_answers, score_cases, with_robustness
from .scoring import Scorer
from .sequence_state import SequenceFolder, SequenceProgress

BASELINES = ("unedited", "icl")
MODES = ("single", "batch", "sequential")


METRICS = ("efficacy", "generality", "locality", "portability", "fluency", "robustness")


@dataclass
class EvalConfig:
    """What is scored and how: the metrics (default all), fluency generations per
    case and their length, the robustness doubt prompts, and the batch size; for
    the sequential mode, the cases per pack, the checkpoints (numbers of edits
    made, besides the end) and how many of the cases edited so far a checkpoint
    scores (None: all; else a fixed random sample)."""

    metrics: tuple = METRICS
    fluency_prompts: int = 1
    fluency_tokens: int = 32
    doubt_templates: tuple = DOUBT_TEMPLATES
    batch_size: int = 16
    pack_cases: int = 1
    checkpoints: tuple = ()
    checkpoint_sample: int | None = None

    def __post_init__(self):
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric {sorted(unknown)}: choose from {list(METRICS)}")
        if type(self.pack_cases) is not int or self.pack_cases < 1:
            raise ValueError(f"pack_cases={self.pack_cases!r}: give a positive int, the cases per pack")
        if not all(type(c) is int and c > 0 for c in self.checkpoints):
            raise ValueError(f"checkpoints={self.checkpoints!r}: give positive ints, numbers of edits made")
        sample = self.checkpoint_sample
        if sample is not None and (type(sample) is not int or sample < 1):
            raise ValueError(f"checkpoint_sample={sample!r}: give a positive int, or None for every case")

    def select(self, case: Case) -> Case:
        """The case with only the probes of the chosen metrics (and its robustness probes if chosen)."""
        if "robustness" in self.metrics:
            case = with_robustness(case, self.doubt_templates)
        probes = {m: g for m, g in case.probes.items() if m.split("/")[0] in self.metrics}
        return Case(case.id, case.edits, probes, case.generation_prompts)


def known_methods() -> list[str]:
    return list(BASELINES) + sorted(METHODS)


def icl_context(case: Case) -> str:
    return fact_context(case.edits)


def pack_bytes(pack: EditPack, folder: Path | None = None) -> int:
    """Bytes of the pack's files on disk (tensors, manifest and model card), saved
    into `folder` (replacing a pack there), or into a temporary one if None."""
    if folder is not None:
        return sum(p.stat().st_size for p in pack.save_pretrained(folder, overwrite=True).iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        return pack_bytes(pack, Path(tmp))


def locality_references(model, tokenizer, cases: list[Case], config: EvalConfig | None = None,
                        progress: bool = True) -> dict:
    """The unedited model's locality answers per case: compute once, reuse for every method."""
    config = config or EvalConfig()
    if "locality" not in config.metrics:
        return {c.id: {} for c in cases}
    return reference_answers(Scorer(model, tokenizer, batch_size=config.batch_size), cases, progress)


def evaluate(model, tokenizer, cases: list[Case], method: str = "unedited", mode: str = "single",
             settings: dict | None = None, config: EvalConfig | None = None, references: dict | None = None,
             model_name: str = "", progress: bool = True, state_dir: str | Path | None = None,
             resume: bool = False) -> dict:
    """Edit with `method` in `mode`, score every case, remove the edits; returns the
    result as JSON-able dict (metrics averaged over cases, per-case scores, timing).
    In the sequential mode `state_dir` keeps the progress after every pack, and
    with `resume` a run cut short goes on from what it kept there.

    Example:
        >>> cases = read_cases("counterfact", "counterfact.json", limit=10)
        >>> result = evaluate(model, tokenizer, cases, method="lora", mode="single")
        >>> result["metrics"]["efficacy"]["gen"]
    """
    if method not in known_methods():
        raise ValueError(f"unknown method {method!r}: choose from {known_methods()}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose from {MODES}")
    config = config or EvalConfig()
    if references is None:
        references = locality_references(model, tokenizer, cases, config, progress)
    scorer = Scorer(model, tokenizer, batch_size=config.batch_size)
    cases = [config.select(c) for c in cases]

    def score(group: list[Case], desc: str) -> dict:
        """Scores of cases that share the model's current state (fluency is batched across them)."""
        views = [in_context(c, icl_context(c)) if method == "icl" else c for c in group]
        out = score_cases(scorer, views, references, desc if progress else None)
        if "fluency" in config.metrics:
            for c, entropy in zip(group, fluency(scorer, views, config.fluency_prompts, config.fluency_tokens,
                                                 f"{desc} (fluency)" if progress and desc else None)):
                out[c.id]["fluency"] = {"entropy": entropy}
        return out

    made, sizes, per_case, sequence = [], [], {}, None  # per pack made: (seconds, edits), (bytes, parameters)
    start = time.perf_counter()
    if method in BASELINES:
        per_case = score(cases, f"{method}: scoring")
    elif mode == "single":
        for case in tqdm(cases, desc=f"{method} single", disable=not progress):
            pack = _timed_pack(method, model, tokenizer, case.edits, settings, made, sizes)
            load_edits(model, pack, name=f"eval-{case.id}", tokenizer=tokenizer)
            try:
                per_case.update(score([case], ""))
            finally:
                remove_edits(model, f"eval-{case.id}")
    elif mode == "batch":
        edits = [e for c in cases for e in c.edits]
        pack = _timed_pack(method, model, tokenizer, edits, settings, made, sizes)
        load_edits(model, pack, name="eval-batch", tokenizer=tokenizer)
        try:
            per_case = score(cases, f"{method} batch: scoring")
        finally:
            remove_edits(model, "eval-batch")
    else:
        identity = {"model": model_name, "method": method, "settings": settings or {},
                    "config": config_record(config), "case_ids": [c.id for c in cases]}
        sequence = _sequential(model, tokenizer, cases, method, settings, config, score,
                               SequenceFolder(state_dir, identity), resume, scorer, progress)
        per_case = sequence.per_case
        made = [(p["seconds"], p["edits"]) for p in sequence.packs]
        sizes = [(p["bytes"], p["parameters"]) for p in sequence.kept]
    # scoring only: in the sequential mode summed over the runs a resumed sequence took
    eval_seconds = (sequence.scoring_seconds if sequence is not None
                    else time.perf_counter() - start - sum(s for s, _ in made))
    n_edits = sum(len(c.edits) for c in cases)
    per_edit = [s / n for s, n in made]  # a pack of several edits (a batch, a case of four) counts per edit
    result = {
        "model": model_name, "method": method, "mode": mode, "settings": settings or {},
        "config": config_record(config),
        "n_cases": len(cases), "case_ids": [c.id for c in cases],
        "metrics": aggregate(per_case), "per_case": per_case,
        "timing": {
            "edit_seconds_median": statistics.median(per_edit) if per_edit else None,
            "edit_seconds_per_pack": [s for s, _ in made],  # in the order made; in single mode the order of case_ids
            "edits_per_pack": [n for _, n in made],
            "eval_seconds": eval_seconds,
            "pack_bytes_per_edit": sum(b for b, _ in sizes) / n_edits if sizes else None,
            "pack_params_per_edit": sum(n for _, n in sizes) / n_edits if sizes else None,
        },
    }
    if sequence is not None:
        result["checkpoints"] = sequence.checkpoints
    return result


def config_record(config: EvalConfig) -> dict:
    """The evaluation settings as results.json records them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _sequential(model, tokenizer, cases, method, settings, config: EvalConfig, score, saved: SequenceFolder,
                resume: bool, scorer: Scorer, progress) -> SequenceProgress:
    """Packs of `config.pack_cases` cases, each made with the earlier ones attached
    (and the method's history of them, if it keeps one), scored at each checkpoint
    on the cases edited so far (or a fixed sample of `config.checkpoint_sample`),
    then all removed. The progress is saved after every pack (`saved`), and with
    `resume` a run cut short goes on from there. Returns the progress at the end."""
    n_edits = sum(len(c.edits) for c in cases)
    done = saved.start(resume)
    history = saved.history(new_history(method), done)
    marks = [m for m in sorted({c for c in config.checkpoints if c < n_edits}) + [n_edits] if m > done.n_edits]
    bar = tqdm(total=n_edits, initial=done.n_edits, desc=f"{method} sequential: editing", unit="edit",
               disable=not progress)
    try:
        saved.restore(model, tokenizer, done)
        for first in range(len(done.packs) * config.pack_cases, len(cases), config.pack_cases):
            began = time.perf_counter()
            group = cases[first:first + config.pack_cases]
            edits = [e for c in group for e in c.edits]
            pack = make_pack(method, model, tokenizer, edits, settings, progress=False, history=history)
            made = {"name": f"eval-{len(done.packs)}", "seconds": time.perf_counter() - began, "edits": len(edits),
                    "parameters": sum(t.numel() for t in pack.tensors.values()), "replaced": False}
            if history is not None and history.replaces_packs and done.attached:
                # the pack holds every edit so far (one shared intervention): it takes the last one's place
                remove_edits(model, done.attached.pop())
                done.packs[-1]["replaced"] = True
            # A later edit of the same subject and prompt supersedes an earlier one, as in a model kept up to date.
            load_edits(model, pack, name=made["name"], on_conflict="last", tokenizer=tokenizer)
            done.wall_seconds += time.perf_counter() - began
            done.attached.append(made["name"])
            done.packs.append({**made, "bytes": pack_bytes(pack, saved.pack_folder(made["name"]))})
            bar.update(len(edits))
            if done.n_edits >= marks[0]:
                while marks and marks[0] <= done.n_edits:
                    marks.pop(0)
                scored_from = time.perf_counter()
                _checkpoint(done, cases[:first + len(group)], config, score, scorer, method)
                done.scoring_seconds += time.perf_counter() - scored_from
            saved.save(done, history)
    finally:
        bar.close()
        attached = {p.name for p in stack_of(model).list()}
        for name in done.attached:
            if name in attached:  # a pack whose every edit a later one superseded is gone already
                remove_edits(model, name)
    return done


def _checkpoint(done: SequenceProgress, edited: list[Case], config: EvalConfig, score, scorer: Scorer,
                method: str) -> None:
    """Score the cases edited so far (or the fixed sample of them) with the model as
    it is now, and the general ability beside them, into `done`."""
    sample = config.checkpoint_sample
    if sample is not None and sample < len(edited):
        edited = [edited[i] for i in sorted(random.Random(0).sample(range(len(edited)), sample))]
    done.per_case = score(edited, f"{method} sequential: scoring {len(edited)} cases at {done.n_edits} edits")
    done.checkpoints.append({
        "n_edits": done.n_edits, "n_scored": len(edited), "metrics": aggregate(done.per_case),
        "general_ability": {"perplexity_ratio": perplexity_ratio(scorer), "tokens_per_second_ratio": speed_ratio(scorer)},
        "timing": {"edit_seconds": sum(p["seconds"] for p in done.packs),
                   "wall_seconds": done.wall_seconds,  # making and attaching packs, not scoring
                   "pack_bytes": sum(p["bytes"] for p in done.kept),
                   "pack_parameters": sum(p["parameters"] for p in done.kept)}})


def aggregate(per_case: dict) -> dict:
    """Mean of each score over the cases where it is defined."""
    metrics = {}
    for scores in per_case.values():
        for metric, values in scores.items():
            for kind, v in values.items():
                metrics.setdefault(metric, {}).setdefault(kind, [])
                if v is not None:
                    metrics[metric][kind].append(v)
    return {m: {k: (statistics.fmean(v) if v else None) for k, v in kinds.items()}
            for m, kinds in sorted(metrics.items())}


def _timed_pack(method, model, tokenizer, edits, settings, made, sizes) -> EditPack:
    start = time.perf_counter()
    pack = make_pack(method, model, tokenizer, edits, settings, progress=False)
    made.append((time.perf_counter() - start, len(edits)))
    sizes.append((pack_bytes(pack), sum(t.numel() for t in pack.tensors.values())))
    return pack
