"""What the playground does, without its page: one model, the packs made or
loaded on it (each switched on or off), and the answers of the base model and of
the model with its packs, side by side. The page (`app.py`) wires these methods
to widgets and nothing else, so everything here is tested without a browser.

Every pack is made on the base model, as `kedit edit` makes it, whatever is
attached at the time: packs stay independent, so any of them can be switched off
and the others still mean what they meant.

Example:
    >>> session = Playground(model, tokenizer)
    >>> name = session.make("rome", "Danielle Darrieux", "The mother tongue of {} is", "English")
    >>> answer = session.answers(["The mother tongue of Danielle Darrieux is"], "English")[0]
    >>> answer.base_p, answer.edited_p   # p(English) without and with the pack
    >>> session.switch(name, False)
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from ..attach import stack_of
from ..errors import EditRequestError, KeditError
from ..evaluate.scoring import Scorer
from ..methods import METHODS, make_pack
from ..pack import Edit, EditPack
from ..pack.card import model_card
from ..trace import TRACED, trace

ANSWER_TOKENS = 8
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


@dataclass
class Answer:
    """One prompt read by the base model and by the model with its packs:
    the greedy continuations and the probability of `target` after the prompt."""

    prompt: str
    base: str
    edited: str
    base_p: float
    edited_p: float


def default_settings(method: str) -> dict:
    """Every setting of `method` with its default value, as JSON would write it."""
    if method not in METHODS:
        raise EditRequestError(f"unknown method {method!r}: the methods that make packs are {sorted(METHODS)}")
    return json.loads(json.dumps(asdict(METHODS[method][1]())))


def parse_settings_json(text: str) -> dict:
    """The settings box's text as a dict (empty text: no settings)."""
    if not text.strip():
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise EditRequestError(f"the settings are not JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                               'write an object such as {"steps": 20}') from None
    if not isinstance(settings, dict):
        raise EditRequestError(f"the settings must be a JSON object of setting: value, not a {type(settings).__name__}")
    return settings


class Playground:
    """A model and the packs held for it. Each method raises a typed error that
    says what is wrong and leaves the model and the held packs as they were.
    One operation runs at a time (the page's events arrive on several threads)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stack = stack_of(model)
        self.packs: dict[str, EditPack] = {}  # every held pack, attached or not, in the order it came
        self.all_disabled = False
        self.lock = threading.RLock()
        self._scorer = Scorer(model, tokenizer)
        self._base_answers: dict[tuple[str, str], tuple[str, float]] = {}  # the base model never changes
        self._count = 0

    def attached(self) -> list[str]:
        return [p.name for p in self.stack.list()]

    def make(self, method: str, subject: str, prompt: str, target_new: str, target_true: str | None = None,
             settings: dict | None = None, newest_wins: bool = False, progress: bool = True) -> str:
        """Edit one fact with `method` on the base model and attach the pack; returns its name."""
        with self.lock:
            self._count += 1
            edit = Edit(f"e{self._count}", subject.strip(), prompt.strip(), target_new.strip(),
                        (target_true or "").strip() or None)
            with self.stack.disable():
                pack = make_pack(method, self.model, self.tokenizer, [edit], settings, progress=progress)
            name = f"{method}-{self._count}"
            self._attach(name, pack, newest_wins)
            return name

    def load(self, source: str, revision: str | None = None, newest_wins: bool = False) -> str:
        """Read a pack from a folder or a Hub repo id (at `revision`) and attach it; returns its name."""
        with self.lock:
            source = source.strip()
            if not source:
                raise KeditError("give a pack folder or a Hub repo id to load")
            revision = (revision or "").strip() or None
            name = source + (f"@{revision}" if revision else "")
            if name in self.packs:
                raise KeditError(f"{name!r} is held already; forget it first to load it again")
            self._attach(name, EditPack.from_pretrained(source, revision=revision), newest_wins)
            return name

    def switch(self, name: str, on: bool, newest_wins: bool = False) -> None:
        """Attach (`on`) or detach the held pack `name`."""
        with self.lock:
            pack = self._held(name)
            if on and name not in self.stack.packs:
                self._attach(name, pack, newest_wins)
            elif not on and name in self.stack.packs:
                self.stack.remove(name)

    def remove_edit(self, name: str, edit_id: str) -> None:
        """Take one edit out of pack `name`; a pack left without edits is forgotten."""
        with self.lock:
            pack = self._held(name)
            if edit_id not in {e.id for e in pack.edits}:
                raise KeyError(f"pack {name!r} has no edit {edit_id!r}; its edits are {[e.id for e in pack.edits]}")
            keep = [e.id for e in pack.edits if e.id != edit_id]
            if name in self.stack.packs:
                self.stack.remove(name, edit_ids=[edit_id])
            if keep:
                self.packs[name] = self.stack.packs[name].pack if name in self.stack.packs else pack.select(keep)
            else:
                del self.packs[name]

    def forget(self, name: str) -> None:
        """Detach pack `name` if it is attached and let it go."""
        with self.lock:
            self._held(name)
            if name in self.stack.packs:
                self.stack.remove(name)
            del self.packs[name]

    def save(self, name: str, folder: str, overwrite: bool = False) -> Path:
        folder = folder.strip()
        if not folder:
            raise KeditError("give a folder to save the pack into")
        return self._held(name).save_pretrained(folder, overwrite=overwrite)

    def push(self, name: str, repo_id: str, branch: str | None = None, private: bool = False) -> str:
        """Upload pack `name` to the Hub repo `repo_id`; returns the commit sha."""
        repo_id = repo_id.strip()
        if not repo_id:
            raise KeditError("give a Hub repo id (user/name) to push the pack to")
        return self._held(name).push_to_hub(repo_id, branch=(branch or "").strip() or None, private=private)

    def card(self, name: str) -> str:
        """Pack `name`'s model card, without the Hub's front matter."""
        return _FRONT_MATTER.sub("", model_card(self._held(name)), count=1).strip()

    def answers(self, prompts: list[str], target: str) -> list[Answer]:
        """Each prompt read by the base model and by the model as it is now (the base
        model too while `all_disabled`): greedy answers and p(`target`)."""
        prompts = [p.strip() for p in prompts if p.strip()]
        if not target.strip():
            raise EditRequestError("give the new target: its probability is read after each prompt")
        with self.lock:
            missing = [p for p in prompts if (p, target) not in self._base_answers]
            if missing:
                with self.stack.disable():
                    self._base_answers.update(zip([(p, target) for p in missing], self._read(missing, target)))
            # Disabled, the model is the base model: its answers are the cached ones.
            edited = ([self._base_answers[(p, target)] for p in prompts] if self.all_disabled
                      else self._read(prompts, target))
            return [Answer(p, base, now, base_p, now_p) for p, (now, now_p) in zip(prompts, edited)
                    for base, base_p in [self._base_answers[(p, target)]]]

    def trace(self, prompt: str, subject: str, kind: str = "hidden", samples: int = 5) -> Path:
        """Causal tracing of the fact on the base model: the heatmap as a PNG file."""
        if kind not in TRACED:
            raise KeditError(f"kind={kind!r}: trace one of {TRACED}")
        with self.lock, self.stack.disable():
            result = trace(self.model, self.tokenizer, prompt.replace("{}", subject), subject, kind=kind,
                           samples=samples, progress=False)
        path = Path(tempfile.mkdtemp(prefix="kedit-trace-")) / "trace.png"
        result.plot(path)
        return path

    def _read(self, prompts: list[str], target: str) -> list[tuple[str, float]]:
        generated = self._scorer.generate(prompts, ANSWER_TOKENS)
        forced = self._scorer.forced([(p, target) for p in prompts])
        return [(self._scorer.decode(ids).strip(), math.exp(-f.nll * len(f.target)))
                for ids, f in zip(generated, forced)]

    def _attach(self, name: str, pack: EditPack, newest_wins: bool) -> None:
        """Attach `pack` as `name` and hold it. With `newest_wins`, the stack drops the
        earlier edits of the same facts from the packs that held them: the held packs
        follow, and one left with no edit is let go."""
        before = set(self.attached())
        self.stack.add(pack, name, on_conflict="last" if newest_wins else "error", tokenizer=self.tokenizer)
        self.packs[name] = pack
        for attached in self.stack.list():
            self.packs[attached.name] = attached.pack
        for emptied in before - set(self.attached()):
            del self.packs[emptied]

    def _held(self, name: str) -> EditPack:
        if name not in self.packs:
            raise KeyError(f"no pack named {name!r} is held; the packs are {list(self.packs)}")
        return self.packs[name]

