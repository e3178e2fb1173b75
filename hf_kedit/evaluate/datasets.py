"""Read knowledge-editing benchmark files (CounterFact, zsRE, RippleEdits,
MQuAKE, KnowEdit, and EasyEdit's flat edit format) into `Case`s: the edit request(s) and the test prompts
grouped by metric, whatever the benchmark's own schema.

Every file is a JSON list of records. A record that does not fit its format
raises `DatasetError` naming the file, the record (0-based, as in the JSON list)
and the field, e.g. "counterfact.json record 3: missing requested_rewrite.target_new.str".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import KeditError
from ..pack import Edit
from .cases import Case, Probe

FORMATS = ("counterfact", "zsre", "ripple", "mquake", "knowedit", "easyedit")

# RippleEdits' test categories and the metric each one measures: the last two ask
# that facts next to the edit stay as they were, which RippleEdits counts as specificity.
RIPPLE_CATEGORIES = {
    "Logical_Generalization": "portability",
    "Compositionality_I": "portability",
    "Compositionality_II": "portability",
    "Subject_Aliasing": "portability",
    "Relation_Specificity": "locality",
    "Forgetfulness": "locality",
}

# A top-level key only one format has: it lets an error say which format a file
# passed under the wrong name really is.
_SIGNATURE_KEYS = {"counterfact": "paraphrase_prompts", "zsre": "src", "ripple": "edit",
                   "mquake": "new_answer", "knowedit": "locality", "easyedit": "locality_prompt"}
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
               dict: "an object"}
_REQUIRED = object()


class DatasetError(KeditError, ValueError):
    """A benchmark file cannot be read: unknown format, not a JSON list of
    records, a record missing a field or holding one of the wrong type, or a
    limit the file cannot meet. The message names the file, record and field."""


@dataclass
class ReadReport:
    """What reading a file had to work around, counted rather than printed.
    Pass one to `read_cases` to see it."""

    # RippleEdits records whose subject the relation's template could not delimit.
    subject_fallbacks: int = 0
    # Portability prompts without any expected answer: nothing to score, so dropped.
    skipped_queries: int = 0


def read_cases(fmt: str, path, limit: int | None = None, report: ReadReport | None = None) -> list[Case]:
    """The evaluation cases of a benchmark file in format `fmt` (one of `FORMATS`).

    `limit` keeps the first `limit` records; it must be between 1 and the number
    of records. The whole file is read and each kept record is checked, except
    for RippleEdits, where every record is checked because the subject of an
    edit is inferred from all the prompts of its relation in the file (see
    `_split_subject`). `report`, if given, receives the counts of what was
    worked around (`ReadReport`).

    Example:
        >>> cases = read_cases("counterfact", "data/counterfact.json", limit=10)
        >>> cases[0].edits[0].text, cases[0].probes["efficacy"][0].answers
        ('Spike Hughes originates from', ['Philadelphia'])
    """
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; known formats: {', '.join(FORMATS)}")
    path = Path(path)
    data = _load_list(path)
    count = _records_to_read(limit, len(data), path)
    report = ReadReport() if report is None else report
    try:
        records = [_Record.at(path, index, item) for index, item in enumerate(data)]
        convert = _converter(fmt, records, report)
        return [_scorable(convert(record), report) for record in records[:count]]
    except DatasetError as e:
        raise DatasetError(f"{e}{_format_hint(fmt, data[0])}") from None


def benchmark_facts(fmt: str, path, limit: int | None = None) -> list[dict]:
    """The true facts behind a benchmark file's edits, as a fact base for STEAM:
    each edit with a known true answer as `{"subject", "prompt", "object"}` (the
    prompt with the subject in it, the true answer as the object), once each.

    Example:
        >>> facts = benchmark_facts("counterfact", "data/counterfact.json")
        >>> facts[0]
        {'subject': 'Spike Hughes', 'prompt': 'Spike Hughes originates from', 'object': 'London'}
        >>> config = STEAMConfig(fact_base=facts)
    """
    facts, seen = [], set()
    for case in read_cases(fmt, path, limit):
        for edit in case.edits:
            fact = {"subject": edit.subject, "prompt": edit.text, "object": edit.target_true}
            if edit.target_true and (fact["prompt"], fact["object"]) not in seen:
                seen.add((fact["prompt"], fact["object"]))
                facts.append(fact)
    return facts


# ----- the file -------------------------------------------------------------------------

def _load_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    text = path.read_bytes()
    if not text.strip():
        raise DatasetError(f"{path} is empty; a dataset file holds a JSON list of records")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); a dataset file holds a JSON list of records") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path} holds {_json_name(data)}; a dataset file holds a JSON list of records")
    if not data:
        raise DatasetError(f"{path} holds an empty list: there are no records to read")
    return data


def _records_to_read(limit, available: int, path: Path) -> int:
    if limit is None:
        return available
    if type(limit) is not int or limit <= 0:
        raise DatasetError(f"limit must be a positive number of records, got {limit!r}")
    if limit > available:
        raise DatasetError(f"limit {limit} is beyond the data: {path} holds {available} records")
    return limit


def _converter(fmt: str, records: list["_Record"], report: ReadReport):
    """The function turning one record into a `Case`. RippleEdits' needs the whole
    file first: its subjects come from templates learned over all the records."""
    if fmt == "ripple":
        return partial(_ripple_case, templates=_relation_templates(records), report=report)
    return _CONVERTERS[fmt]


def _format_hint(fmt: str, first) -> str:
    guesses = [name for name, key in _SIGNATURE_KEYS.items() if isinstance(first, dict) and key in first]
    if not guesses or fmt in guesses:
        return ""
    return f" (the file looks like {guesses[0]} data: read it with format {guesses[0]!r})"


def _json_name(value) -> str:
    return _JSON_NAMES.get(type(value), "null" if value is None else type(value).__name__)


class _Record:
    """A record, or an object inside one, with its place in the file, so that
    every error names the file, the record and the field."""

    def __init__(self, data: dict, where: str, index: int, path: str = ""):
        self.data, self.where, self.index, self.path = data, where, index, path

    @classmethod
    def at(cls, file: Path, index: int, data) -> "_Record":
        where = f"{file} record {index}"
        if not isinstance(data, dict):
            raise DatasetError(f"{where} is {_json_name(data)}; records are JSON objects")
        return cls(data, where, index)

    def fail(self, field: str, problem: str):
        raise DatasetError(f"{self.where}: {self.path}{field} {problem}")

    def has(self, field: str) -> bool:
        return field in self.data

    def value(self, field: str, *kinds: type, default=_REQUIRED):
        """The value at a dotted `field`, checked to be one of the JSON `kinds`."""
        value, walked = self.data, []
        for key in field.split("."):
            if type(value) is not dict:
                self.fail(".".join(walked), f"must be an object, got {_json_name(value)}")
            if key not in value:
                if default is not _REQUIRED:
                    return default
                raise DatasetError(f"{self.where}: missing {self.path}{field}")
            value = value[key]
            walked.append(key)
        if type(value) not in kinds:
            self.fail(field, f"must be {' or '.join(_JSON_NAMES[k] for k in kinds)}, got {_json_name(value)}")
        return value

    def text(self, field: str) -> str:
        value = self.value(field, str).strip()
        if not value:
            self.fail(field, "is empty")
        return value

    def texts(self, field: str, default=_REQUIRED) -> list[str]:
        values = self.value(field, list, default=default)
        for k, value in enumerate(values):
            if type(value) is not str:
                self.fail(f"{field}[{k}]", f"must be a string, got {_json_name(value)}")
        return [value.strip() for value in values]

    def child(self, field: str) -> "_Record":
        return _Record(self.value(field, dict), self.where, self.index, f"{self.path}{field}.")

    def children(self, field: str, default=_REQUIRED) -> list["_Record"]:
        items = self.value(field, list, default=default)
        for k, item in enumerate(items):
            if type(item) is not dict:
                self.fail(f"{field}[{k}]", f"must be an object, got {_json_name(item)}")
        return [_Record(item, self.where, self.index, f"{self.path}{field}[{k}].") for k, item in enumerate(items)]

    def groups(self, field: str) -> dict[str, list["_Record"]]:
        """A KnowEdit `portability` or `locality` object: group name -> entries."""
        if not self.has(field):
            return {}
        groups = self.child(field)
        return {name: groups.children(name) for name in groups.data}


# ----- shared pieces ----------------------------------------------------------------------

def _unique(answers) -> list[str]:
    """Answers stripped, empty ones and repeats dropped, order kept (the first is the main one)."""
    return list(dict.fromkeys(a.strip() for a in answers if a.strip()))


def _with_subject_slot(text: str, subject: str) -> str:
    # Where the subject is not written in the text (zsRE and KnowEdit spell it
    # differently in a few records), the text stays the whole prompt: Edit.text is then the text itself.
    return text.replace(subject, "{}", 1)


def _edit_probes(prompts: list[str], edit: Edit) -> list[Probe]:
    """Prompts that, after the edit, should be completed by its new target rather than the old one."""
    return [Probe(prompt, [edit.target_new], contrast=edit.target_true) for prompt in prompts]


def _one_hop_portability(record: _Record) -> list[Probe]:
    """The one-hop question EasyEdit adds to CounterFact and zsRE records (absent from ROME's files)."""
    if not record.has("portability"):
        return []
    portability = record.child("portability")
    return [Probe(portability.text("New Question"), [portability.text("New Answer")])]


def _scorable(case: Case, report: ReadReport) -> Case:
    """Drop portability probes without an answer (counted: nothing to score them
    against) and metrics left with no probes. Locality probes may have none: they
    only ask that the prediction stays unchanged."""
    kept = {}
    for metric, probes in case.probes.items():
        if metric.split("/")[0] == "portability":
            report.skipped_queries += sum(not probe.answers for probe in probes)
            probes = [probe for probe in probes if probe.answers]
        if probes:
            kept[metric] = probes
    case.probes = kept
    return case


# ----- one reader per format ---------------------------------------------------------------

def _rome_edit(edit_id: str, rewrite: _Record) -> Edit:
    """An edit written as ROME's `requested_rewrite` (CounterFact, MQuAKE)."""
    return Edit(edit_id, rewrite.text("subject"), rewrite.text("prompt"),
                rewrite.text("target_new.str"), rewrite.text("target_true.str"))


def _counterfact_case(record: _Record) -> Case:
    case_id = record.value("case_id", int)
    edit = _rome_edit(f"cf{case_id}", record.child("requested_rewrite"))
    neighbours = record.texts("neighborhood_prompts")
    return Case(str(case_id), [edit], {
        "efficacy": _edit_probes([edit.text], edit),
        "generality": _edit_probes(record.texts("paraphrase_prompts"), edit),
        # Neighbours share the relation, not the subject: they must keep the true answer.
        "locality": [Probe(prompt, [edit.target_true], contrast=edit.target_new) for prompt in neighbours],
        "portability": _one_hop_portability(record),
    }, generation_prompts=record.texts("generation_prompts"))


def _zsre_case(record: _Record) -> Case:
    subject, question = record.text("subject"), record.text("src")
    true_answers = record.texts("answers")
    if not true_answers:
        record.fail("answers", "is empty; its first entry is the true answer")
    edit = Edit(f"zsre-{record.index}", subject, _with_subject_slot(question, subject),
                record.text("alt"), true_answers[0])
    return Case(f"zsre-{record.index}", [edit], {
        "efficacy": _edit_probes([question], edit),
        "generality": _edit_probes([record.text("rephrase")], edit),
        "locality": [Probe(record.text("loc"), [record.text("loc_ans")])],
        "portability": _one_hop_portability(record),
    })


def _mquake_case(record: _Record) -> Case:
    case_id = record.value("case_id", int)
    rewrites = record.children("requested_rewrite")
    if not rewrites:
        record.fail("requested_rewrite", "is empty; MQuAKE cases hold one or more edits")
    edits = [_rome_edit(f"mquake{case_id}-{j}", rewrite) for j, rewrite in enumerate(rewrites)]
    answers = _unique([record.text("new_answer"), *record.texts("new_answer_alias")])
    return Case(str(case_id), edits, {
        "efficacy": [probe for edit in edits for probe in _edit_probes([edit.text], edit)],
        "generality": [probe for edit, rewrite in zip(edits, rewrites)
                       for probe in _edit_probes([rewrite.text("question")], edit)],
        # The multi-hop questions chain all the edits: the old chain's answer is the contrast.
        "portability": [Probe(question, answers, contrast=record.text("answer"))
                        for question in record.texts("questions")],
    })


def _knowedit_case(record: _Record) -> Case:
    subject, prompt = record.text("subject"), record.text("prompt")
    # wiki_recent records state no ground truth: those facts are new, not replacements.
    true_answers = _knowedit_answers(record, "ground_truth") if record.has("ground_truth") else []
    edit = Edit(f"knowedit-{record.index}", subject, _with_subject_slot(prompt, subject),
                record.text("target_new"), true_answers[0] if true_answers else None)
    rephrased = [record.text("rephrase_prompt")] if record.has("rephrase_prompt") else []
    probes = {"efficacy": _edit_probes([prompt], edit), "generality": _edit_probes(rephrased, edit)}
    for metric in ("portability", "locality"):
        for group, entries in record.groups(metric).items():
            probes[f"{metric}/{group}"] = [Probe(entry.text("prompt"), _knowedit_answers(entry, "ground_truth"))
                                           for entry in entries]
    return Case(f"knowedit-{record.index}", [edit], probes)


def _easyedit_case(record: _Record) -> Case:
    """EasyEdit's flat edit records (its CounterFact split, WikiBigEdit): prompt,
    subject, target_new, optional ground_truth (the old answer: absent where the
    fact is new), rephrase_prompt, locality_prompt and locality_ground_truth."""
    subject, prompt = record.text("subject"), record.text("prompt")
    case_id = f"easyedit-{record.value('case_id', int) if record.has('case_id') else record.index}"
    edit = Edit(case_id, subject, _with_subject_slot(prompt, subject), record.text("target_new"),
                record.text("ground_truth") if record.has("ground_truth") else None)
    probes = {"efficacy": _edit_probes([prompt], edit)}
    if record.has("rephrase_prompt"):
        probes["generality"] = _edit_probes([record.text("rephrase_prompt")], edit)
    if record.has("locality_prompt"):
        answers = [record.text("locality_ground_truth")] if record.has("locality_ground_truth") else []
        probes["locality"] = [Probe(record.text("locality_prompt"), answers,
                                    contrast=edit.target_new if answers else None)]
    return Case(case_id, [edit], probes)


def _knowedit_answers(record: _Record, field: str) -> list[str]:
    """KnowEdit writes an answer as a string, a list of strings, or a list of
    alias lists (one per accepted answer): flattened, the main answer first."""
    value = record.value(field, str, list)
    items = [value] if type(value) is str else value
    answers = [answer for item in items for answer in (item if type(item) is list else [item])]
    if not all(type(answer) is str for answer in answers):
        record.fail(field, "must be a string, a list of strings or a list of lists of strings")
    return _unique(answers)


# ----- RippleEdits: no subject or target strings, derived from the sentences -----------------

@dataclass(frozen=True)
class _RippleFact:
    relation: str
    stem: str  # the edit sentence without its target, e.g. "Big Mouth is followed by"
    target_new: str
    target_true: str


@dataclass(frozen=True)
class _Template:
    """How a relation phrases its prompts: the words before and after the subject."""

    before: int
    after: int


def _ripple_case(record: _Record, templates: dict[str, _Template | None], report: ReadReport) -> Case:
    fact = _ripple_fact(record)
    subject, prompt, fell_back = _split_subject(fact.stem, templates[fact.relation])
    report.subject_fallbacks += fell_back
    edit = Edit(f"ripple-{record.index}", subject, prompt, fact.target_new, fact.target_true)
    probes = {"efficacy": _edit_probes([fact.stem], edit)}
    for category, metric in RIPPLE_CATEGORIES.items():
        probes[f"{metric}/{category}"] = [Probe(query.text("prompt"), _ripple_answers(query))
                                          for query in _ripple_queries(record, category, "test_queries")]
    return Case(f"ripple-{record.index}", [edit], probes)


def _ripple_fact(record: _Record) -> _RippleFact:
    """Split the edited and the original sentence ("Big Mouth is followed by
    1977–78 French Division 2." / "... by The Golden Spoon.") into their shared
    stem and the two targets. The shared prefix is cut back to a word boundary,
    since the targets may begin with the same letters; two targets beginning with
    the same whole word would leave that word in the stem (no record of
    RippleEdits popular has such a pair)."""
    edit = record.child("edit")
    new, old = edit.text("prompt"), edit.text("original_fact.prompt")
    cut = os.path.commonprefix([new, old]).rfind(" ")
    target_new, target_true = (sentence[cut + 1:].removesuffix(".").strip() for sentence in (new, old))
    if cut <= 0 or not target_new or not target_true or target_new == target_true:
        edit.fail("prompt", f"and edit.original_fact.prompt must be one sentence ending in two different targets, "
                            f"got {new!r} and {old!r}")
    return _RippleFact(edit.text("relation"), new[:cut], target_new, target_true)


def _ripple_queries(record: _Record, category: str, kind: str) -> list[_Record]:
    return [query for test in record.children(category, default=[]) for query in test.children(kind)]


def _ripple_answers(query: _Record) -> list[str]:
    return _unique(answer for entry in query.children("answers")
                   for answer in (entry.value("value", str), *entry.texts("aliases", default=[])))


def _relation_templates(records: list[_Record]) -> dict[str, _Template | None]:
    """Each relation's template, from every prompt of that relation in the file:
    the edit stems, and the one-hop queries (test and condition), which RippleEdits
    phrases with the same template. Two-hop and "which is not X" queries carry a
    relation but wrap it in other words, so they are left out."""
    prompts: dict[str, set[str]] = {}
    for record in records:
        for relation, prompt in _relation_prompts(record):
            prompts.setdefault(relation, set()).add(prompt)
    return {relation: _infer_template(instances) for relation, instances in prompts.items()}


def _relation_prompts(record: _Record):
    """(relation, prompt) for the record's edit stem and its one-hop queries."""
    fact = _ripple_fact(record)
    yield fact.relation, fact.stem
    for category in RIPPLE_CATEGORIES:
        for kind in ("test_queries", "condition_queries"):
            for query in _ripple_queries(record, category, kind):
                if query.value("query_type", str, default="regular") == "regular" \
                        and query.value("phrase", str, type(None), default=None) is None:
                    yield query.text("relation"), query.text("prompt")


def _infer_template(prompts: set[str]) -> _Template | None:
    """The words all `prompts` share at the start and at the end: what is left
    in between is the subject. None where that cannot be told: a single
    prompt, or prompts sharing no word at either end."""
    words = [prompt.split(" ") for prompt in prompts]
    template = _Template(_shared_words(words), _shared_words([w[::-1] for w in words]))
    return template if len(words) >= 2 and template.before + template.after else None


def _shared_words(word_lists: list[list[str]]) -> int:
    shared, shortest = 0, min(map(len, word_lists))
    while shared < shortest and len({words[shared] for words in word_lists}) == 1:
        shared += 1
    return shared


def _split_subject(stem: str, template: _Template | None) -> tuple[str, str, bool]:
    """(subject, prompt with "{}", fell back?) for an edit stem.

    The subject is what the relation's template leaves between its words, e.g.
    "Big Mouth" in "Big Mouth is followed by" ("{} is followed by"). Where the
    template cannot delimit it (no template, or nothing left between its words),
    fall back: the subject is the stem up to the template's closing words if it
    has any ("{} is followed by"), else the whole stem, with prompt "{}"."""
    words = stem.split(" ")
    before, after = (template.before, template.after) if template else (0, 0)
    fell_back = template is None or before + after >= len(words)
    if fell_back:
        before, after = 0, after if after < len(words) else 0
    end = len(words) - after
    return " ".join(words[before:end]), " ".join(words[:before] + ["{}"] + words[end:]), fell_back


_CONVERTERS = {"counterfact": _counterfact_case, "zsre": _zsre_case, "mquake": _mquake_case,
               "knowedit": _knowedit_case, "easyedit": _easyedit_case}
