"""`kedit info` and `kedit export-peft` on local packs (push and pull: test_hub.py),
and a sequence of `kedit edit` batches continued across sessions."""
import json
from pathlib import Path

import pytest
import torch

from hf_kedit import EditPack
from hf_kedit.cli import main as kedit
from packs import random_pack
from tiny_models import tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact.json"


def test_info_lists_the_edits(tmp_path, capsys):
    random_pack(tiny_model("gpt2"), layers=(0, 1), n_edits=3).save_pretrained(tmp_path)
    assert kedit(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kind:        weight_delta" in out and "edits:       3" in out
    assert "e2: The capital of S2 is Old -> T0-2" in out
    assert "gpt2, 3 layers, hidden 32" in out


def test_export_peft_writes_a_lora_adapter(tmp_path):
    random_pack(tiny_model("gpt2"), layers=(0, 1), n_edits=2, rank=2).save_pretrained(tmp_path / "pack")
    assert kedit(["export-peft", str(tmp_path / "pack"), str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D
    # every layer's c_proj: serving engines (TGI) use a module type only where every layer has it
    assert config["target_modules"] == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "kedit_config.json").write_text("{not json")
    (tmp_path / "kedit_model.safetensors").write_bytes(b"")
    assert kedit(["info", str(tmp_path)]) == 2
    assert "PackFormatError" in capsys.readouterr().err


# ----- `kedit edit --on --history`: a sequence continued across sessions ------------------------------

SETTINGS = {"steps": 3, "context_templates": [[2, 3]], "stats_corpus": ["The cat sat on the mat.", "Rain fell all day."],
            "stats_tokens": 64}


@pytest.fixture
def saved_tiny(tokenizer, tmp_path, monkeypatch):
    """A tiny model saved as a folder `--model` reads, and a data file of four CounterFact records."""
    from test_rome import tiny

    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "cache"))
    model = tiny(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cases.json").write_text(json.dumps(json.loads(DATA.read_text())[:4]))
    return tmp_path


def edit_args(folder, method, settings, *extra):
    return ["edit", "--method", method, "--model", str(folder / "model"), "--data", f"counterfact:{folder / 'cases.json'}",
            *(a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")), *extra]


def edits_of(folder, skip, limit):
    from hf_kedit.evaluate.datasets import read_cases

    return [e for c in read_cases("counterfact", folder / "cases.json", skip + limit)[skip:] for e in c.edits]


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_history_continued_from_the_command_line_gives_the_packs_of_one_session(saved_tiny, capsys):
    from hf_kedit import load_edits
    from hf_kedit.methods import make_pack, new_history
    from hf_kedit.methods.locate.alphaedit import EditedKeys
    from hf_kedit.models import load_model

    folder, history, settings = saved_tiny, saved_tiny / "history.safetensors", {**SETTINGS, "layers": [1, 2]}
    assert kedit(edit_args(folder, "alphaedit", settings, "--limit", "2", "--out", str(folder / "p0"),
                           "--history", str(history))) == 0
    assert EditedKeys.load(history).n_edits == 2
    assert kedit(edit_args(folder, "alphaedit", settings, "--skip", "2", "--limit", "2", "--on", str(folder / "p0"),
                           "--out", str(folder / "p1"), "--history", str(history))) == 0
    assert "history of 4 edits" in capsys.readouterr().out and EditedKeys.load(history).n_edits == 4
    assert not list(folder.glob("*.partial"))
    # the same two batches in one process, the history kept in memory
    model, tokenizer = load_model(str(folder / "model"))
    kept = new_history("alphaedit")
    load_edits(model, make_pack("alphaedit", model, tokenizer, edits_of(folder, 0, 2), settings, False, kept))
    second = make_pack("alphaedit", model, tokenizer, edits_of(folder, 2, 2), settings, False, kept)
    saved = EditPack.from_pretrained(folder / "p1")
    assert saved.hyperparameters["edits_before"] == 2 and same_tensors(saved.tensors, second.tensors)
    without = make_pack("alphaedit", load_model(str(folder / "model"))[0], tokenizer, edits_of(folder, 2, 2),
                        settings, False)
    assert not same_tensors(saved.tensors, without.tensors), "the history changed nothing: the test shows nothing"


def test_a_batch_made_on_earlier_packs_is_made_on_the_model_they_edit(saved_tiny):
    from hf_kedit import load_edits
    from hf_kedit.methods import make_pack
    from hf_kedit.models import load_model

    folder, settings = saved_tiny, {**SETTINGS, "layer": 1}
    assert kedit(edit_args(folder, "rome", settings, "--limit", "1", "--out", str(folder / "p0"))) == 0
    # the same edit again, on the model the first pack edited: ROME starts where that pack left the value
    assert kedit(edit_args(folder, "rome", settings, "--limit", "1", "--on", str(folder / "p0"),
                           "--out", str(folder / "p1"))) == 0
    # each reference on a freshly loaded model, as each command: the context templates ROME samples are
    # kept per model, and the second command samples them with the first pack attached
    model, tokenizer = load_model(str(folder / "model"))
    load_edits(model, folder / "p0")
    on_first = make_pack("rome", model, tokenizer, edits_of(folder, 0, 1), settings, False)
    model, tokenizer = load_model(str(folder / "model"))
    bare = make_pack("rome", model, tokenizer, edits_of(folder, 0, 1), settings, False)
    saved = EditPack.from_pretrained(folder / "p1").tensors
    assert same_tensors(saved, on_first.tensors) and not same_tensors(saved, bare.tensors)


def test_a_history_for_a_method_that_keeps_none_is_refused_before_the_model_loads(saved_tiny, capsys):
    args = edit_args(saved_tiny, "rome", SETTINGS, "--limit", "1", "--out", str(saved_tiny / "p"),
                     "--history", str(saved_tiny / "h"))
    assert kedit(args) == 2
    assert "rome keeps no history between batches" in capsys.readouterr().err
    assert not (saved_tiny / "p").exists() and not (saved_tiny / "h").exists()


def test_an_existing_pack_is_refused_before_the_edit_is_made(saved_tiny, capsys):
    (saved_tiny / "p").mkdir()
    (saved_tiny / "p" / "kedit_config.json").write_text("{}")
    assert kedit(edit_args(saved_tiny, "rome", SETTINGS, "--limit", "1", "--out", str(saved_tiny / "p"))) == 2
    assert "FileExistsError" in capsys.readouterr().err
    assert not (saved_tiny / "cache").exists(), "the edit ran (its statistics were computed) before the refusal"
