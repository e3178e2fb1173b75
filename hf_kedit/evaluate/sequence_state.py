"""A sequential run's progress, kept on disk after every pack so that a run of
thousands of edits cut short (a session's end, a killed process) goes on
where it stopped: the packs made so far, the method's history, the
checkpoints scored and the seconds spent. Git ignores the packs and the history
(hundreds of MB) but not `progress.json`: committed, the checkpoints scored
outlive the machine the packs were on."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..attach import load_edits
from ..pack import EditPack

PROGRESS = "progress.json"
HISTORY = "history.safetensors"
# Packs of thousands of edits run to hundreds of MB; the progress is a few hundred kB.
IGNORED = "*\n!.gitignore\n!" + PROGRESS + "\n"


@dataclass
class SequenceProgress:
    """How far a sequence has come: per pack made, its `name`, `seconds`,
    `edits`, `bytes`, `parameters` and whether a later pack `replaced` it (one
    that holds every edit so far); the packs `attached`, in order; the
    `checkpoints` scored; the last checkpoint's `per_case` scores; the seconds
    spent making and attaching packs (`wall_seconds`) and scoring."""

    packs: list[dict] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    per_case: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    scoring_seconds: float = 0.0

    @property
    def n_edits(self) -> int:
        return sum(p["edits"] for p in self.packs)

    @property
    def kept(self) -> list[dict]:
        """The packs no later pack replaced: what the model holds, by size."""
        return [p for p in self.packs if not p["replaced"]]


class SequenceFolder:
    """Where a sequence keeps its progress: `progress.json` (the run's identity
    and its `SequenceProgress`), a folder per pack attached (`packs/NAME`) and
    the method's history. `folder=None` keeps the progress in memory only.

    Example:
        >>> saved = SequenceFolder("bench/state/memit-sequential", identity)
        >>> progress = saved.start(resume=True)   # where the last run stopped, or a new start
    """

    def __init__(self, folder: str | Path | None, identity: dict):
        self.folder, self.identity = (Path(folder) if folder is not None else None), identity

    def start(self, resume: bool) -> SequenceProgress:
        """The saved progress if `resume` and there is one (`ValueError` if it is
        another run's: other model, method, settings, cases or evaluation
        settings, or not a progress file); else a new one, the folder emptied
        (`ValueError` if it holds files and is no sequence's folder)."""
        if self.folder is None:
            return SequenceProgress()
        path = self.folder / PROGRESS
        if resume and path.is_file():
            try:
                saved = json.loads(path.read_text())
                identity, progress = saved["identity"], SequenceProgress(**saved["progress"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"cannot resume from {path}: it is not a sequence's progress ({e}); remove "
                                 f"{self.folder}, or run without resuming") from None
            if canonical(identity) != canonical(self.identity):
                raise ValueError(f"cannot resume from {self.folder}: it holds another run (other model, method, "
                                 "settings, cases or evaluation settings); remove it, or give another --out")
            missing = [name for name in progress.attached if not (self.folder / "packs" / name).is_dir()]
            if missing:
                shown = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
                raise ValueError(f"cannot resume from {self.folder}: its progress names {len(missing)} packs that "
                                 f"are not there ({shown}; a fresh clone keeps the progress, not the packs); run "
                                 "without resuming to start again")
            return progress
        if self.folder.exists():
            if not path.is_file() and any(p.name != ".gitignore" for p in self.folder.iterdir()):
                raise ValueError(f"{self.folder} holds files but no {PROGRESS}: it is not a sequence's folder, and "
                                 "starting one there would delete them; give an empty or new folder")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        (self.folder / ".gitignore").write_text(IGNORED)
        progress = SequenceProgress()
        self.save(progress, None)  # from here on the folder is known as a sequence's
        return progress

    def history(self, empty, progress: SequenceProgress):
        """The method's history as the saved progress left it (`empty`, from
        `new_history`, when nothing was saved; None for methods that keep none)."""
        if empty is None or self.folder is None or not (self.folder / HISTORY).is_file() or not progress.packs:
            return empty
        return type(empty).load(self.folder / HISTORY)

    def restore(self, model, tokenizer, progress: SequenceProgress) -> None:
        """Attach the saved packs in the order they were attached, so the model is
        as the saved run left it (a pack whose every edit a later one superseded
        goes again, as it went then)."""
        for name in progress.attached:
            load_edits(model, EditPack.from_pretrained(self.pack_folder(name)), name=name,
                       on_conflict="last", tokenizer=tokenizer)

    def pack_folder(self, name: str) -> Path | None:
        """Where the pack attached as `name` is saved (None: progress in memory only)."""
        return self.folder / "packs" / name if self.folder is not None else None

    def save(self, progress: SequenceProgress, history) -> None:
        """Write the progress and the history, each replaced whole (a run killed
        while writing keeps the last), then drop the folders of packs replaced."""
        if self.folder is None:
            return
        if history is not None:
            partial = self.folder / (HISTORY + ".partial")
            history.save(partial)
            os.replace(partial, self.folder / HISTORY)
        write_json(self.folder / PROGRESS, {"identity": self.identity, "progress": asdict(progress)})
        for p in progress.packs:
            if p["replaced"]:
                shutil.rmtree(self.folder / "packs" / p["name"], ignore_errors=True)


def write_json(path: Path, value, indent: int | None = None) -> None:
    """Write `value` as JSON, replacing the file whole: a run killed while writing
    leaves the last one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=indent, default=str) + "\n")
    os.replace(partial, path)


def canonical(identity: dict) -> str:
    """A run's identity as JSON that compares equal for tuples and lists alike."""
    return json.dumps(identity, sort_keys=True, default=str)
