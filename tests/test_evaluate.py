"""The evaluation harness on a tiny random model with the default model's tokenizer."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hf_kedit import Edit, stack_of
from hf_kedit.cli import main as kedit
from hf_kedit.evaluate.cases import Case, Probe
from hf_kedit.evaluate.harness import EvalConfig, evaluate, locality_references
from hf_kedit.evaluate.metrics import ngram_entropy, reference_answers, score_cases
from hf_kedit.evaluate.scoring import Scorer
from tiny_models import tiny_llama_for

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact.json"


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture
def model(tokenizer):
    return tiny_llama_for(tokenizer)


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def force_say(model, tokenizer, text, unless_token=None):
    """Make `model` continue any prompt with `text`: the next token is the one after
    the current token in `text` (its first token otherwise). With `unless_token`,
    rows holding that token predict something else (a changed output). The final
    norm writes each position's next token into its state and the LM head reads it
    back, so the head may run on any subset of positions (as the scorer runs it)."""
    say = tokenizer(" " + text, add_special_tokens=False).input_ids
    follow = {a: b for a, b in zip(say, say[1:])}
    calls = {}

    def read_ids(module, args, kwargs):
        calls["ids"] = kwargs["input_ids"]

    def write_next(module, args, output):
        ids = calls["ids"]
        nxt = torch.tensor([[follow.get(t, say[0]) for t in row] for row in ids.tolist()])
        if unless_token is not None:
            changed = (ids == unless_token).any(-1, keepdim=True)
            nxt = torch.where(changed, torch.full_like(nxt, 7), nxt)
        state = torch.zeros_like(output)
        state[..., 0] = nxt.to(output.dtype)
        return state

    def read_next(module, args, output):
        logits = torch.zeros_like(output)
        logits.scatter_(-1, args[0][..., :1].round().long(), 100.0)
        return logits

    return _Handles(model.register_forward_pre_hook(read_ids, with_kwargs=True),
                    model.model.norm.register_forward_hook(write_next),
                    model.get_output_embeddings().register_forward_hook(read_next))


def case(prompts_loc=("The capital of Italy is", "The capital of Spain is")):
    edit = Edit("e0", "France", "The capital of {} is", "Paris France", "Lyon")
    return Case("c0", [edit], {
        "efficacy": [Probe(edit.text, ["Paris France"], "Lyon")],
        "generality": [Probe("France's capital is", ["Paris Texas"], "Lyon")],
        "portability": [Probe("The capital city of France is", ["Lyon"], "Paris France")],
        "locality": [Probe(p, ["Rome"], "Paris France") for p in prompts_loc],
    })


def test_a_model_forced_to_say_x_scores_one_on_x_and_zero_on_y(model, tokenizer):
    handle = force_say(model, tokenizer, "Paris France")
    scorer = Scorer(model, tokenizer)
    c = case()
    scores = score_probes(scorer, c, locality_references_for(scorer, c))
    assert scores["efficacy"] == {"cmp": 1.0, "tf": 1.0, "gen": 1.0}
    assert scores["portability"] == {"cmp": 0.0, "tf": 0.0, "gen": 0.0}
    # "Paris Texas": the first token is right, the second is not: tf gives partial credit, gen none.
    assert scores["generality"]["tf"] == 0.5 and scores["generality"]["gen"] == 0.0
    handle.remove()


def score_probes(scorer, c, references):
    return score_cases(scorer, [c], references)[c.id]


def locality_references_for(scorer, c):
    return reference_answers(scorer, [c])


def test_locality_drops_exactly_where_outputs_change(model, tokenizer):
    c = case(prompts_loc=("The capital of Italy is", "The capital of Spain is", "In Spain, the capital is",
                          "Italy has a capital, it is"))
    handle = force_say(model, tokenizer, "Rome")
    scorer = Scorer(model, tokenizer)
    reference = locality_references_for(scorer, c)
    assert score_probes(scorer, c, reference)["locality"] == {"cmp": 1.0, "tf": 1.0, "gen": 1.0}
    handle.remove()
    spain = tokenizer(" Spain", add_special_tokens=False).input_ids[0]
    handle = force_say(model, tokenizer, "Rome", unless_token=spain)  # the "edit" changes the Spain prompts only
    scores = score_probes(scorer, c, reference)["locality"]
    assert scores["tf"] == 0.5 and scores["gen"] == 0.5 and scores["cmp"] == 0.5
    handle.remove()


def test_ngram_entropy_follows_easyedit():
    assert ngram_entropy("a a a a a a") == 0.0  # one bigram, one trigram
    # 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3 bits), weighted 2/3 and 4/3, averaged
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2 + 4 / 3 * 1.584962500721156) / 2)


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_every_mode_edits_scores_and_leaves_the_model_as_it_was(model, tokenizer, mode):
    from hf_kedit.evaluate.datasets import read_cases

    cases = read_cases("counterfact", DATA, limit=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    config = EvalConfig(fluency_tokens=4)
    result = evaluate(model, tokenizer, cases, "lora", mode, {"steps": 3}, config, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before) and len(stack_of(model)) == 0
    assert result["n_cases"] == 2 and result["case_ids"] == [c.id for c in cases]
    assert set(result["metrics"]) >= {"efficacy", "generality", "locality", "portability", "robustness", "fluency"}
    for metric, scores in result["metrics"].items():
        assert all(v is None or 0 <= v <= 1 for k, v in scores.items() if k != "entropy"), metric
    timing = result["timing"]
    assert timing["edit_seconds_median"] > 0 and timing["pack_bytes_per_edit"] > 1000
    packs = {"single": 2, "batch": 1, "sequential": 2}[mode]  # sequential: EvalConfig's pack_cases, 1 case a pack
    assert len(timing["edit_seconds_per_pack"]) == packs and all(s > 0 for s in timing["edit_seconds_per_pack"])
    assert sum(timing["edits_per_pack"]) == 2 and len(timing["edits_per_pack"]) == packs
    if mode == "batch":
        assert timing["edit_seconds_median"] == pytest.approx(timing["edit_seconds_per_pack"][0] / 2)
    assert 0 < 4 * timing["pack_params_per_edit"] < timing["pack_bytes_per_edit"]   # fp32 tensors + manifest + card
    assert set(result["per_case"]) == set(result["case_ids"])


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_unedited_locality_is_exactly_one_and_icl_puts_the_fact_in_context(model, tokenizer):
    from hf_kedit.evaluate.datasets import read_cases

    cases = read_cases("counterfact", DATA, limit=2)
    config = EvalConfig(metrics=("efficacy", "locality"))
    references = locality_references(model, tokenizer, cases, config, progress=False)
    unedited = evaluate(model, tokenizer, cases, "unedited", config=config, references=references, progress=False)
    assert unedited["metrics"]["locality"]["tf"] == 1.0 and unedited["metrics"]["locality"]["gen"] == 1.0
    assert "fluency" not in unedited["metrics"] and "robustness" not in unedited["metrics"]
    seen = []
    handle = model.register_forward_hook(lambda m, a, k, o: seen.append(k["input_ids"]), with_kwargs=True)
    evaluate(model, tokenizer, cases, "icl", config=config, references=references, progress=False)
    handle.remove()
    fact = tokenizer(f"New Fact: {cases[0].edits[0].text} {cases[0].edits[0].target_new}.").input_ids
    assert any(fact[:8] == row[:8] for batch in seen for row in batch.tolist())


def test_bad_choices_are_clear_errors(model, tokenizer):
    with pytest.raises(ValueError, match="unknown metric \\['accuracy'\\]"):
        EvalConfig(metrics=("efficacy", "accuracy"))
    with pytest.raises(ValueError, match="unknown method 'rome2'"):
        evaluate(model, tokenizer, [case()], "rome2")
    with pytest.raises(ValueError, match="unknown mode 'parallel'"):
        evaluate(model, tokenizer, [case()], "lora", "parallel")
    with pytest.raises(ValueError, match="lora has no setting \\['ranks'\\]"):
        evaluate(model, tokenizer, [case()], "lora", "single", {"ranks": 2}, progress=False)


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_cli_bench_writes_json_markdown_and_plots(model, tokenizer, tmp_path, capsys, monkeypatch):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench"
    assert kedit(["bench", "--model", str(tmp_path / "model"), "--methods", "unedited,icl,lora", "--data",
                  f"counterfact:{DATA}", "--limit", "2", "--set", "lora.steps=2", "--modes", "single,batch",
                  "--metrics", "efficacy,locality,fluency", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["mode"]) for r in results] == [("unedited", "single"), ("icl", "single"),
                                                          ("lora", "single"), ("lora", "batch")]
    assert results[2]["settings"] == {"steps": 2}
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and rows[4].startswith("| lora (batch) |")  # header + 4 rows
    assert (out / "quality.png").stat().st_size > 10_000 and (out / "cost.png").stat().st_size > 5_000
    # NAME@VARIANT: the same method with other settings, side by side; --skip leaves the first records out
    assert kedit(["bench", "--model", str(tmp_path / "model"), "--methods", "lora,lora@short", "--data",
                  f"counterfact:{DATA}", "--skip", "1", "--limit", "1", "--set", "lora.steps=2", "--set",
                  "lora@short.steps=1", "--metrics", "efficacy", "--out", str(out / "variants")]) == 0
    results = json.loads((out / "variants" / "results.json").read_text())
    assert [(r["method"], r.get("variant"), r["settings"]) for r in results] == [
        ("lora", None, {"steps": 2}), ("lora", "short", {"steps": 1})]
    assert all(r["case_ids"] == [str(json.loads(DATA.read_text())[1]["case_id"])] for r in results)
    assert "| lora@short (single) |" in (out / "variants" / "results.md").read_text()
    # the sequential mode with checkpoints: lifelong.md and lifelong.png beside the rest
    sequential = ["bench", "--model", str(tmp_path / "model"), "--methods", "unedited,lora", "--data",
                  f"counterfact:{DATA}", "--limit", "2", "--set", "lora.steps=1", "--modes", "sequential",
                  "--batch-size", "1", "--checkpoints", "1", "--metrics", "efficacy,locality", "--out",
                  str(out / "lifelong")]
    assert kedit(sequential) == 0
    rows = [line for line in (out / "lifelong" / "lifelong.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[:2] for row in rows[1:]] == [["| lora (sequential)", "1"], ["| lora (sequential)", "2"]]
    assert (out / "lifelong" / "lifelong.png").stat().st_size > 10_000
    # cut short after its last pack, before results.json: --resume makes no pack and reads no answer again
    first = json.loads((out / "lifelong" / "results.json").read_text())
    (out / "lifelong" / "results.json").unlink()

    def refused(*args, **kwargs):
        raise AssertionError("done again on resuming")
    from hf_kedit.evaluate import bench, harness
    monkeypatch.setattr(harness, "make_pack", refused)
    monkeypatch.setattr(bench, "locality_references", refused)
    assert kedit(sequential + ["--resume"]) == 0
    again = json.loads((out / "lifelong" / "results.json").read_text())
    assert [(r["per_case"], r.get("checkpoints", [{}])[-1].get("metrics")) for r in again] == \
        [(r["per_case"], r.get("checkpoints", [{}])[-1].get("metrics")) for r in first]
    monkeypatch.undo()
    assert kedit(["bench", "--model", str(tmp_path / "model"), "--methods", "unedited,rome9", "--data",
                  f"counterfact:{DATA}", "--out", str(out)]) == 2
    assert "unknown method ['rome9']" in capsys.readouterr().err
    assert kedit(["eval", "--model", str(tmp_path / "model"), "--data", f"counterfact:{DATA}", "--limit", "9999",
                  "--out", str(out / "e.json")]) == 2
    assert "9999" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_the_sequential_mode_scores_at_each_checkpoint_and_carries_alphaedits_history(model, tokenizer,
                                                                                      monkeypatch, tmp_path):
    from hf_kedit.evaluate import harness
    from hf_kedit.evaluate.datasets import read_cases

    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path))
    cases = read_cases("counterfact", DATA, limit=4)
    made = []
    monkeypatch.setattr(harness, "make_pack", lambda *a, **k: made.append(harness_make_pack(*a, **k)) or made[-1])
    config = EvalConfig(metrics=("efficacy", "locality"), pack_cases=2, checkpoints=(2,), checkpoint_sample=1)
    settings = {"layers": (0, 1), "steps": 2, "context_templates": [[1, 2]], "stats_tokens": 64}
    result = evaluate(model, tokenizer, cases, "alphaedit", "sequential", settings, config, progress=False)
    assert len(stack_of(model)) == 0
    assert [p.hyperparameters["edits_before"] for p in made] == [0, 2]  # the second batch knew of the first
    assert [(c["n_edits"], c["n_scored"]) for c in result["checkpoints"]] == [(2, 1), (4, 1)]
    last = result["checkpoints"][-1]
    assert last["metrics"] == result["metrics"] and len(result["per_case"]) == 1
    assert last["general_ability"]["perplexity_ratio"] > 0 and last["general_ability"]["tokens_per_second_ratio"] > 0
    assert last["timing"]["pack_bytes"] > result["checkpoints"][0]["timing"]["pack_bytes"] > 0
    timing = result["timing"]  # two packs of two edits: the median is per edit, half a pack's time
    assert timing["edits_per_pack"] == [2, 2]
    assert timing["edit_seconds_median"] == pytest.approx(sum(timing["edit_seconds_per_pack"]) / 4)


class Cut(Exception):
    """A run stopped from outside (a session's end, a killed process)."""


def making(made: list, stop_at: int | None = None):
    """A stand-in for the harness's make_pack that keeps what it makes in `made`
    and raises `Cut` instead of making pack number `stop_at` (from 0)."""
    def make(*args, **kwargs):
        if len(made) == stop_at:
            raise Cut
        made.append(harness_make_pack(*args, **kwargs))
        return made[-1]
    return make


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_a_sequential_run_cut_short_goes_on_from_its_last_pack_as_if_never_stopped(model, tokenizer, monkeypatch,
                                                                                   tmp_path):
    from hf_kedit.evaluate import harness
    from hf_kedit.evaluate.datasets import read_cases

    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "cache"))
    cases = read_cases("counterfact", DATA, limit=4)
    config = EvalConfig(metrics=("efficacy", "locality"), pack_cases=1, checkpoints=(2,))
    settings = {"layers": (0, 1), "steps": 2, "context_templates": [[1, 2]], "stats_tokens": 64}

    def run(state, resume=False, run_settings=settings):
        return evaluate(model, tokenizer, cases, "alphaedit", "sequential", run_settings, config, progress=False,
                        state_dir=tmp_path / state, resume=resume)
    whole = run("whole")
    made = []
    monkeypatch.setattr(harness, "make_pack", making(made, stop_at=3))
    with pytest.raises(Cut):
        run("cut")
    assert len(stack_of(model)) == 0 and len(made) == 3
    monkeypatch.setattr(harness, "make_pack", making(made))
    resumed = run("cut", resume=True)
    assert len(made) == 4 and made[3].hyperparameters["edits_before"] == 3  # one pack more, the history kept
    assert len(stack_of(model)) == 0
    assert resumed["per_case"] == whole["per_case"]
    assert [(c["n_edits"], c["metrics"]) for c in resumed["checkpoints"]] == \
        [(c["n_edits"], c["metrics"]) for c in whole["checkpoints"]] == [(2, whole["checkpoints"][0]["metrics"]),
                                                                         (4, whole["metrics"])]
    assert resumed["timing"]["edits_per_pack"] == [1, 1, 1, 1]
    assert resumed["timing"]["pack_bytes_per_edit"] == whole["timing"]["pack_bytes_per_edit"]
    git = ["git", "-C", str(tmp_path), "check-ignore", "-q"]  # exit status 0: ignored
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert subprocess.run(git + ["cut/progress.json"]).returncode == 1  # committed, the checkpoints outlive the packs
    assert subprocess.run(git + ["cut/packs/eval-0/pack.json"]).returncode == 0
    assert subprocess.run(git + ["cut/history.safetensors"]).returncode == 0
    with pytest.raises(ValueError, match="holds another run"):  # refused before anything is attached
        run("cut", resume=True, run_settings={**settings, "steps": 3})
    assert len(stack_of(model)) == 0 and len(made) == 4
    run("cut")  # not resuming: starts again from nothing
    assert len(made) == 8
    shutil.rmtree(tmp_path / "cut" / "packs")  # a fresh clone: the progress without its packs
    with pytest.raises(ValueError, match="names 4 packs that are not there"):
        run("cut", resume=True)
    assert len(stack_of(model)) == 0 and len(made) == 8


@pytest.mark.parametrize("progress, match", [
    ("{not json", "is not a sequence's progress"),
    ('{"identity": {}, "progress": {"bogus": 1}}', "is not a sequence's progress"),
    ('{"progress": {}}', "is not a sequence's progress"),
    ('{"identity": {"method": "memit"}, "progress": {}}', "holds another run"),
])
def test_a_sequence_folder_that_is_not_this_runs_is_refused_and_kept(tmp_path, progress, match):
    from hf_kedit.evaluate.sequence_state import SequenceFolder

    (tmp_path / "progress.json").write_text(progress)
    with pytest.raises(ValueError, match=match):
        SequenceFolder(tmp_path, {"method": "alphaedit"}).start(resume=True)
    assert (tmp_path / "progress.json").read_text() == progress
    (tmp_path / "progress.json").unlink()
    (tmp_path / "notes.txt").write_text("mine")  # not a sequence's folder: never emptied
    with pytest.raises(ValueError, match="holds files but no progress.json"):
        SequenceFolder(tmp_path, {"method": "alphaedit"}).start(resume=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    fresh = SequenceFolder(tmp_path / "new", {"method": "alphaedit"})  # cut before its first pack: resumes from 0
    fresh.start(resume=False)
    assert SequenceFolder(tmp_path / "new", {"method": "alphaedit"}).start(resume=True).n_edits == 0


def harness_make_pack(*args, **kwargs):
    from hf_kedit.methods import make_pack

    return make_pack(*args, **kwargs)


def test_the_lifelong_table_shows_a_score_a_benchmark_lacks_as_a_dash():
    from hf_kedit.evaluate.report import lifelong_table

    metrics = {"efficacy": {"tf": 0.5, "cmp": 0.75}, "locality": {"tf": 1.0, "cmp": None}}  # zsRE: no old answer
    checkpoint = {"n_edits": 100, "n_scored": 100, "metrics": metrics,
                  "general_ability": {"perplexity_ratio": 1.25, "tokens_per_second_ratio": 0.9},
                  "timing": {"edit_seconds": 12.0, "pack_bytes": 1000, "pack_parameters": 200}}
    table = lifelong_table([{"method": "memit", "mode": "sequential", "checkpoints": [checkpoint]}],
                           unedited={"n_cases": 100, "metrics": metrics})
    header, _, memit, unedited = table.splitlines()
    assert memit.split(" | ")[1:] == ["100", "100", "0.50", "–", "1.00", "0.75", "–", "–", "1.250", "0.90", "12",
                                      "10", "2 |"]
    assert unedited.split(" | ")[:10] == ["| unedited (its first 100 cases)", "0", "100", "0.50", "–", "1.00", "0.75",
                                          "–", "–", "1.000"]


def test_the_perplexity_ratio_is_one_without_packs_and_moves_with_one(model, tokenizer):
    from hf_kedit import load_edits
    from hf_kedit.evaluate.general_ability import general_passages, perplexity_ratio
    from hf_kedit.methods import make_pack

    scorer = Scorer(model, tokenizer)
    assert perplexity_ratio(scorer) == 1.0 and len(general_passages()) == 6
    pack = make_pack("lora", model, tokenizer, [Edit("e0", "Danielle Darrieux", "The mother tongue of {} is",
                                                     "English", "French")], {"steps": 3, "lr": 0.5}, progress=False)
    load_edits(model, pack, name="lora")
    assert perplexity_ratio(scorer) != 1.0


def test_sequential_settings_are_checked():
    with pytest.raises(ValueError, match="pack_cases=0: give a positive int"):
        EvalConfig(pack_cases=0)
    with pytest.raises(ValueError, match="checkpoints=\\(0,\\): give positive ints"):
        EvalConfig(checkpoints=(0,))
    with pytest.raises(ValueError, match="checkpoint_sample=0"):
        EvalConfig(checkpoint_sample=0)


def test_the_sequential_mode_lets_a_later_edit_of_the_same_fact_win(model, tokenizer):
    first = Case("a", [Edit("a", "Athens", "What is the twin city of {}? It is", "Prague")],
                 {"efficacy": [Probe("What is the twin city of Athens? It is", ["Prague"])]})
    later = Case("b", [Edit("b", "Athens", "What is the twin city of {}? It is", "Jakarta")],
                 {"efficacy": [Probe("What is the twin city of Athens? It is", ["Jakarta"])]})
    config = EvalConfig(metrics=("efficacy",), checkpoints=(1,))
    with pytest.warns(UserWarning, match="newest edit wins"):
        result = evaluate(model, tokenizer, [first, later], "lora", "sequential", {"steps": 1}, config,
                          progress=False)
    assert [c["n_edits"] for c in result["checkpoints"]] == [1, 2] and len(stack_of(model)) == 0


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_a_bench_cut_short_keeps_what_it_finished_and_resumes_from_it(model, tokenizer, tmp_path):
    from hf_kedit.evaluate import read_cases, run_bench

    cases = read_cases("counterfact", DATA, limit=2)
    config = EvalConfig(metrics=("efficacy", "locality"))
    out = tmp_path / "bench"
    with pytest.raises(ValueError, match="lora has no setting"):  # the second method fails: the first stays
        run_bench(model, tokenizer, cases, ["unedited", "lora"], settings={"lora": {"ranks": 2}}, config=config,
                  out_dir=out, progress=False)
    first = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in first] == ["unedited"]
    first[0]["timing"]["eval_seconds"] = -1.0  # a mark: kept if taken from the file, lost if run again
    (out / "results.json").write_text(json.dumps(first))

    settings = {"lora": {"steps": 1}, "lora@two": {"steps": 2}}
    results = run_bench(model, tokenizer, cases, ["unedited", "lora", "lora@two"], settings=settings,
                        config=config, out_dir=out, progress=False, resume=True)
    assert [(r["method"], r.get("variant")) for r in results] == [("unedited", None), ("lora", None), ("lora", "two")]
    assert results[0]["timing"]["eval_seconds"] == -1.0 and results[1]["timing"]["eval_seconds"] > 0
    assert json.loads((out / "results.json").read_text()) == results
    # other settings, other cases or other evaluation settings are another run: nothing is taken
    again = run_bench(model, tokenizer, cases, ["lora"], settings={"lora": {"steps": 2}}, config=config,
                      out_dir=out, progress=False, resume=True)
    assert again[0]["settings"] == {"steps": 2} and again[0]["per_case"] == results[2]["per_case"]
    assert again[0]["timing"]["eval_seconds"] != results[2]["timing"]["eval_seconds"]
    fewer = run_bench(model, tokenizer, cases[:1], ["unedited"], config=config, out_dir=out, progress=False,
                      resume=True)
    assert fewer[0]["timing"]["eval_seconds"] > 0 and fewer[0]["case_ids"] == [cases[0].id]
    (out / "results.json").write_text("[{")
    with pytest.raises(ValueError, match="cannot resume from .*results.json: it is not valid JSON"):
        run_bench(model, tokenizer, cases, ["unedited"], config=config, out_dir=out, progress=False, resume=True)


MQUAKE = DATA.parent / "mquake_hard.json"


@pytest.mark.skipif(not MQUAKE.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("says, portable", [("Arabic", 1.0), ("Arabian language", 1.0), ("ar", 1.0),
                                            ("English", 0.0), ("Arabia", 0.0)])
def test_a_mquake_case_is_portable_exactly_when_its_question_gets_the_new_answer_or_an_alias(model, tokenizer,
                                                                                           says, portable):
    from hf_kedit.evaluate import read_cases

    first = read_cases("mquake", MQUAKE, limit=1)[0]
    question = first.probes["portability"][0]
    assert question.answers == ["Arabic", "ar", "Arabian language", "Arabic language"]
    c = Case(first.id, first.edits, {"portability": [question]})
    handle = force_say(model, tokenizer, says)
    scores = score_probes(Scorer(model, tokenizer), c, {})
    handle.remove()
    assert scores["portability"]["gen"] == portable
