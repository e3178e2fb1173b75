"""Benchmark files become `Case`s: the real files in ../shared/data map as read
by eye, RippleEdits' subjects are inferred from its relation templates, and bad
files or arguments fail with a `DatasetError` naming the file, record and field."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hf_kedit.errors import KeditError
from hf_kedit.evaluate.cases import Probe
from hf_kedit.evaluate.datasets import FORMATS, DatasetError, ReadReport, read_cases
from hf_kedit.pack import EDIT_ID

DATA = Path(__file__).parents[1].parent / "shared" / "data"

FILES = {  # file -> (format, records)
    "counterfact.json": ("counterfact", 640),
    "counterfact_distracting_neighbor.json": ("counterfact", 504),
    "zsre.json": ("zsre", 624),
    "rippleedits_popular.json": ("ripple", 407),
    "mquake_hard.json": ("mquake", 259),
    "knowedit_wiki_counterfact.json": ("knowedit", 857),
    "knowedit_wiki_recent.json": ("knowedit", 335),
    "knowedit_zsre.json": ("knowedit", 793),
    "counterfact_easyedit.json": ("easyedit", 13216),
    "wikibigedit_3k.json": ("easyedit", 1790),
    "zsre_3k.json": ("zsre", 1846),
}

# A small CounterFact record in ROME's schema, for the bad-input tests (no shared data needed).
COUNTERFACT_RECORD = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
                          "target_new": {"str": "Philadelphia"}, "target_true": {"str": "London"}},
    "paraphrase_prompts": ["Spike Hughes is native to"],
    "neighborhood_prompts": ["Max Mosley originates from"],
    "generation_prompts": ["Spike Hughes currently lives in"],
}


def read_shared(name: str, report: ReadReport | None = None):
    if not DATA.is_dir():
        pytest.skip(f"no benchmark data at {DATA}")
    fmt, _ = FILES[name]
    return read_cases(fmt, DATA / name, report=report)


@pytest.fixture(scope="module")
def shared_cases():
    """Every shared file read once (the files are large enough for this to matter)."""
    cache = {}

    def cases(name):
        if name not in cache:
            report = ReadReport()
            cache[name] = read_shared(name, report), report
        return cache[name]
    return cases


def write_json(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def counterfact_file(tmp_path: Path, break_second=None) -> Path:
    """Two CounterFact records; `break_second` changes the second one in place."""
    second = copy.deepcopy(COUNTERFACT_RECORD)
    second["case_id"] = 8
    if break_second:
        break_second(second)
    return write_json(tmp_path, [COUNTERFACT_RECORD, second], "cf.json")


# ----- the real files ----------------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_every_record_of_every_file_reads(name, shared_cases):
    cases, _ = shared_cases(name)
    assert len(cases) == FILES[name][1]
    assert len({case.id for case in cases}) == len(cases)
    assert all(case.probes["efficacy"] for case in cases)
    edit_ids = [edit.id for case in cases for edit in case.edits]
    assert all(EDIT_ID.match(i) for i in edit_ids) and len(set(edit_ids)) == len(edit_ids)


def test_counterfact_first_record(shared_cases):
    case = shared_cases("counterfact.json")[0][0]
    edit = case.edits[0]
    assert (case.id, edit.id, edit.subject, edit.prompt) == ("4482", "cf4482", "Spike Hughes", "{} originates from")
    assert (edit.target_new, edit.target_true) == ("Philadelphia", "London")
    assert {metric: len(probes) for metric, probes in case.probes.items()} == \
        {"efficacy": 1, "generality": 2, "locality": 10, "portability": 1}
    assert case.probes["efficacy"] == [Probe("Spike Hughes originates from", ["Philadelphia"], "London")]
    assert case.probes["locality"][0] == Probe("Max Mosley originates from", ["London"], "Philadelphia")
    assert case.probes["portability"] == [Probe(
        "What famous food is associated with the city where Spike Hughes originates from?", ["Cheesesteaks"])]
    assert case.generation_prompts[2] == "Where Spike Hughes is from, people speak the language of"


def test_counterfact_distracting_neighbour_file_reads_as_counterfact(shared_cases):
    case = shared_cases("counterfact_distracting_neighbor.json")[0][0]
    assert case.id == "4482" and case.probes["generality"][1].prompt == \
        "Amateur Athletic Union (AAU). Spike Hughes was born in"


def test_zsre_first_record(shared_cases):
    case = shared_cases("zsre.json")[0][0]
    edit = case.edits[0]
    assert (case.id, edit.id, edit.subject, edit.prompt) == ("zsre-0", "zsre-0", "Call the Doctor",
                                                             "What artist created {}?")
    assert (edit.target_new, edit.target_true) == ("The X-Files", "Sleater-Kinney")
    assert case.probes == {
        "efficacy": [Probe("What artist created Call the Doctor?", ["The X-Files"], "Sleater-Kinney")],
        "generality": [Probe("Which artist created Call the Doctor?", ["The X-Files"], "Sleater-Kinney")],
        "locality": [Probe("nq question: who sang nice day for a white wedding", ["Billy Idol"])],
        "portability": [Probe("Who were the lead actors in the series that inspired the creators of Call the Doctor?",
                              ["David Duchovny and Gillian Anderson"])],
    }
    assert case.generation_prompts == []


def test_mquake_first_record(shared_cases):
    case = shared_cases("mquake_hard.json")[0][0]
    assert case.id == "7417"
    assert [(e.id, e.subject, e.target_new, e.target_true) for e in case.edits] == [
        ("mquake7417-0", "Hey Jude", "Madonna", "The Beatles"),
        ("mquake7417-1", "Madonna", "Narendra Modi", "Guy Oseary"),
        ("mquake7417-2", "Narendra Modi", "Australia", "India"),
        ("mquake7417-3", "Australia", "Arabic", "English"),
    ]
    assert {metric: len(probes) for metric, probes in case.probes.items()} == \
        {"efficacy": 4, "generality": 4, "portability": 3}
    assert case.probes["efficacy"][3] == Probe("The official language of Australia is", ["Arabic"], "English")
    assert case.probes["generality"][0] == Probe("Who performed Hey Jude?", ["Madonna"], "The Beatles")
    assert case.probes["portability"][0] == Probe(
        "What is the official language of the country of citizenship of the director/manager of \"Hey Jude\"'s "
        "performer?", ["Arabic", "ar", "Arabian language", "Arabic language"], "English")


def test_knowedit_wiki_counterfact_first_record(shared_cases):
    case = shared_cases("knowedit_wiki_counterfact.json")[0][0]
    edit = case.edits[0]
    assert (case.id, edit.subject, edit.prompt) == (
        "knowedit-0", "Goursez Vreizh", "The name of the country which {} is associated with is")
    assert (edit.target_new, edit.target_true) == ("Franche-Comté", "France")
    assert case.probes == {
        "efficacy": [Probe("The name of the country which Goursez Vreizh is associated with is", ["Franche-Comté"],
                           "France")],
        "portability/Reasoning": [Probe(
            "The name of the capital city of the country Goursez Vreizh is associated with is", ["Besançon"])],
        "portability/Subject_Aliasing": [Probe(
            "The name of the country which Gorsedd of Brittany is associated with is", ["Franche-Comté"])],
        "locality/Relation_Specificity": [Probe("The name of the founder of Goursez Vreizh is", ["Jean Le Fustec"])],
    }


def test_knowedit_wiki_recent_has_no_true_target_and_flattens_alias_lists(shared_cases):
    case = shared_cases("knowedit_wiki_recent.json")[0][0]
    edit = case.edits[0]
    assert (edit.subject, edit.prompt, edit.target_new, edit.target_true) == (
        "Ingrīda Amantova", "The gender of {} is", "female", None)
    assert case.probes["efficacy"] == [Probe("The gender of Ingrīda Amantova is", ["female"])]
    locality = case.probes["locality/Relation_Specificity"]
    assert len(locality) == 5 and set(case.probes) == {"efficacy", "locality/Relation_Specificity"}
    assert locality[2] == Probe("The name of the alma mater of Ingrīda Amantova is",
                                ["University of Latvia", "Latvijas Universitāte"])


def test_counterfact_in_easyedits_format_first_record(shared_cases):
    case = shared_cases("counterfact_easyedit.json")[0][0]
    edit = case.edits[0]
    assert (case.id, edit.subject, edit.prompt, edit.target_new, edit.target_true) == (
        "easyedit-0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert case.probes["generality"] == [Probe("Where Danielle Darrieux is from, people speak the language of",
                                               ["English"], contrast="French")]
    assert case.probes["locality"] == [Probe("Michel Rocard is a native speaker of", ["French"], contrast="English")]


def test_wikibigedit_has_no_old_answer(shared_cases):
    case = shared_cases("wikibigedit_3k.json")[0][0]
    edit = case.edits[0]
    assert (case.id, edit.subject, edit.target_new, edit.target_true) == (
        "easyedit-0", "Stefan Mair", "head coach", None)
    assert edit.prompt == "What position does {} hold within the organization?"
    assert case.probes["efficacy"] == [Probe("What position does Stefan Mair hold within the organization?",
                                             ["head coach"], contrast=None)]
    assert case.probes["locality"][0].answers == ["Holocaust victim"]


def test_easyedit_record_without_a_target_names_the_field(tmp_path):
    record = {"prompt": "A is", "subject": "A", "rephrase_prompt": "A was"}
    with pytest.raises(DatasetError) as error:
        read_cases("easyedit", write_json(tmp_path, [record]))
    assert str(error.value).endswith("data.json record 0: missing target_new")


def test_knowedit_zsre_first_record(shared_cases):
    case = shared_cases("knowedit_zsre.json")[0][0]
    edit = case.edits[0]
    assert (edit.subject, edit.prompt, edit.target_new, edit.target_true) == (
        "Epaspidoceras", "Which family does {} belong to?", "Noctuidae", "Aspidoceratidae")
    assert case.probes["generality"] == [Probe("What family are Epaspidoceras?", ["Noctuidae"], "Aspidoceratidae")]
    assert case.probes["locality/Relation_Specificity"] == [
        Probe("The taxon rank of Epaspidoceras is", ["genus"]), Probe("Epaspidoceras taxon rank", ["genus"])]
    assert case.probes["portability/Reasoning"] == [
        Probe("What is the common name for the family Epaspidoceras belongs to?", ["Owlet moths"])]


def test_knowedit_subject_missing_from_the_prompt_keeps_the_prompt(shared_cases):
    # Record 'Raja Zarith Sofiah' asks about "Raja Zarith Sofia's father": the prompt stays whole.
    cases = shared_cases("knowedit_zsre.json")[0]
    edit = next(case.edits[0] for case in cases if case.edits[0].subject == "Raja Zarith Sofiah")
    assert edit.prompt == edit.text == "Who is Raja Zarith Sofia's father?"


# ----- RippleEdits ---------------------------------------------------------------------------

def test_ripple_first_record(shared_cases):
    cases, report = shared_cases("rippleedits_popular.json")
    edit = cases[0].edits[0]
    assert (cases[0].id, edit.id, edit.subject, edit.prompt) == (
        "ripple-0", "ripple-0", "Academy Award for Best Picture",
        "The name of the country which {} is associated with is")
    assert (edit.target_new, edit.target_true) == ("Wassoulou Empire", "United States of America")
    # Both of its Logical_Generalization queries have no answer: only efficacy is left.
    assert cases[0].probes == {"efficacy": [Probe(
        "The name of the country which Academy Award for Best Picture is associated with is",
        ["Wassoulou Empire"], "United States of America")]}
    assert report.skipped_queries == 122


@pytest.mark.parametrize("index, subject, prompt, target_new, target_true", [
    (3, "Big Mouth", "{} is followed by", "1977–78 French Division 2", "The Golden Spoon"),
    (6, "Soviet Union", "{} follows", "2011 Greece Junior Badminton Championships – men's doubles",
     "Russian Soviet Federative Socialist Republic"),
    (7, "Prince Harry, Duke of Sussex", "The names of the siblings of {} are", "Shiban", "William, Prince of Wales"),
])
def test_ripple_subject_from_the_relation_template(shared_cases, index, subject, prompt, target_new, target_true):
    edit = shared_cases("rippleedits_popular.json")[0][index].edits[0]
    assert (edit.subject, edit.prompt, edit.target_new, edit.target_true) == (subject, prompt, target_new, target_true)


def test_ripple_test_queries_become_probes_with_aliases(shared_cases):
    case = shared_cases("rippleedits_popular.json")[0][3]
    assert case.probes["portability/Logical_Generalization"] == [
        Probe("1977–78 French Division 2 is followed by", ["Big Mouth", "빅마우스", "Big Mouse"])]


def test_ripple_subject_fallback_is_rare(shared_cases):
    cases, report = shared_cases("rippleedits_popular.json")
    assert report.subject_fallbacks < 0.05 * len(cases)  # 0 of 407 on this file


def ripple_record(new: str, old: str, relation: str, queries=()) -> dict:
    return {"edit": {"prompt": new, "relation": relation, "original_fact": {"prompt": old}},
            "Relation_Specificity": [{"test_queries": list(queries), "condition_queries": []}]}


def test_ripple_fallbacks_are_counted(tmp_path):
    records = [
        # Only instance of its relation: no template, the whole stem is the subject.
        ripple_record("Ann Lee is loved by Bob.", "Ann Lee is loved by Cy.", "LOVED_BY"),
        # "{} follows" from the second record; the third leaves nothing between the words: falls back.
        ripple_record("Ukraine follows Rome.", "Ukraine follows Kyiv.", "FOLLOWS",
                      [{"prompt": "Kyiv follows", "relation": "FOLLOWS", "answers": []}]),
        ripple_record("Big Mouth follows Rome.", "Big Mouth follows Kyiv.", "FOLLOWS"),
    ]
    report = ReadReport()
    edits = [case.edits[0] for case in read_cases("ripple", write_json(tmp_path, records), report=report)]
    assert [(e.subject, e.prompt, e.target_new, e.target_true) for e in edits] == [
        ("Ann Lee is loved by", "{}", "Bob", "Cy"),
        ("Ukraine", "{} follows", "Rome", "Kyiv"),
        ("Big Mouth", "{} follows", "Rome", "Kyiv"),
    ]
    assert report == ReadReport(subject_fallbacks=1, skipped_queries=0)


# ----- limits ---------------------------------------------------------------------------------

def test_limit_keeps_the_first_records(tmp_path):
    cases = read_cases("counterfact", counterfact_file(tmp_path), limit=1)
    assert [case.id for case in cases] == ["7"]


@pytest.mark.parametrize("limit, message", [
    (3, "limit 3 is beyond the data: {path} holds 2 records"),
    (0, "limit must be a positive number of records, got 0"),
    (-1, "limit must be a positive number of records, got -1"),
])
def test_bad_limit(tmp_path, limit, message):
    path = counterfact_file(tmp_path)
    with pytest.raises(DatasetError) as error:
        read_cases("counterfact", path, limit=limit)
    assert str(error.value) == message.format(path=path)


# ----- bad input ------------------------------------------------------------------------------

def test_unknown_format_lists_the_known_ones(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset format 'rome'; known formats: " + ", ".join(FORMATS)):
        read_cases("rome", counterfact_file(tmp_path))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.json"):
        read_cases("zsre", tmp_path / "no-such.json")


def test_counterfact_file_read_as_zsre(tmp_path):
    with pytest.raises(DatasetError) as error:
        read_cases("zsre", counterfact_file(tmp_path))
    assert str(error.value).endswith("cf.json record 0: missing subject (the file looks like counterfact data: "
                                     "read it with format 'counterfact')")


@pytest.mark.parametrize("break_record, problem", [
    (lambda r: r["requested_rewrite"].pop("subject"), "missing requested_rewrite.subject"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=5),
     "requested_rewrite.target_new.str must be a string, got an integer"),
    (lambda r: r.update(requested_rewrite=["x"]), "requested_rewrite must be an object, got a list"),
    (lambda r: r["paraphrase_prompts"].append(None), "paraphrase_prompts[1] must be a string, got null"),
    (lambda r: r.update(case_id="8"), "case_id must be an integer, got a string"),
    (lambda r: r["requested_rewrite"].update(subject="  "), "requested_rewrite.subject is empty"),
])
def test_bad_record_names_file_record_and_field(tmp_path, break_record, problem):
    path = counterfact_file(tmp_path, break_record)
    with pytest.raises(DatasetError) as error:
        read_cases("counterfact", path)
    assert str(error.value) == f"{path} record 1: {problem}"
    assert isinstance(error.value, KeditError) and isinstance(error.value, ValueError)


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(DatasetError, match=r"data\.json record 1 is a string; records are JSON objects"):
        read_cases("counterfact", write_json(tmp_path, [COUNTERFACT_RECORD, "oops"]))


def test_bad_nested_entry_names_its_place(tmp_path):
    record = {"subject": "A", "prompt": "A is", "target_new": "B",
              "locality": {"Relation_Specificity": [{"prompt": "A was", "ground_truth": [["C"], [3]]}]}}
    with pytest.raises(DatasetError) as error:
        read_cases("knowedit", write_json(tmp_path, [record]))
    assert "data.json record 0: locality.Relation_Specificity[0].ground_truth must be a string, a list of " \
           "strings or a list of lists of strings" in str(error.value)


@pytest.mark.parametrize("content, problem", [
    ("", "is empty"),
    ("[]", "holds an empty list: there are no records to read"),
    ('[{"case_id": 1,', "is not valid JSON"),
    ('{"case_id": 1}', "holds an object; a dataset file holds a JSON list of records"),
])
def test_unreadable_file(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError) as error:
        read_cases("counterfact", path)
    assert str(error.value).startswith(f"{path} {problem}")
