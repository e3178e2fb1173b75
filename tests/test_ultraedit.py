"""UltraEdit on tiny random models with the default model's tokenizer."""
import pytest
import torch

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.errors import EditRequestError
from hf_kedit.methods.lifelong.ultraedit import LifelongNorm, UltraEditConfig, ultraedit_edit
from hf_kedit.methods.teacher_forcing import teacher_forced
from test_rome import tiny

EDITS = [Edit("a", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
         Edit("b", "Toko Yasuda", "{} plays the", "piano", "guitar")]
LATER = [Edit("c", "Paris", "{} is the capital of", "Italy", "France")]
CONFIG = UltraEditConfig(layers=(1, 2), lr=1e-3)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def target_nll(model, tokenizer, edit) -> float:
    ids, labels, _ = teacher_forced(tokenizer, edit.text, edit.target_new, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).item()


def test_the_running_normalisation_equals_the_statistics_of_all_rows_at_once():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 6, generator=g) * 3 + 1
    together, parts = LifelongNorm(), LifelongNorm()
    together.update("s", rows)
    for part in rows.split([7, 30, 13]):
        parts.update("s", part)
    for name in ("s.count", "s.mean", "s.m2"):
        torch.testing.assert_close(parts.tensors[name], together.tensors[name], atol=1e-4, rtol=1e-5)
    normalised = parts.normalise("s", rows)
    torch.testing.assert_close(normalised.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(0), torch.ones(6), atol=1e-4, rtol=0)


def test_an_ultraedit_pack_makes_the_targets_likelier_and_comes_off(tokenizer):
    model = tiny(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nll = [target_nll(model, tokenizer, e) for e in EDITS]
    pack = ultraedit_edit(model, tokenizer, EDITS, CONFIG, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    assert sorted(pack.kind_config["modules"]) == [f"model.layers.{i}.mlp.{p}" for i in (1, 2)
                                                    for p in ("gate_proj", "up_proj")]
    load_edits(model, pack, name="ultraedit")
    assert all(target_nll(model, tokenizer, e) < n for e, n in zip(EDITS, nll))
    remove_edits(model, "ultraedit")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_continuing_from_a_saved_normalisation_gives_the_update_continuing_in_memory(tokenizer, tmp_path):
    model = tiny(tokenizer)
    norm = LifelongNorm()
    first = ultraedit_edit(model, tokenizer, EDITS, CONFIG, progress=False, history=norm)
    load_edits(model, first, name="first")
    norm.save(tmp_path / "norm.safetensors")
    reloaded = LifelongNorm.load(tmp_path / "norm.safetensors")
    assert reloaded.n_edits == 2 and reloaded.tensors.keys() == norm.tensors.keys()
    in_memory = ultraedit_edit(model, tokenizer, LATER, CONFIG, progress=False, history=norm)
    from_file = ultraedit_edit(model, tokenizer, LATER, CONFIG, progress=False, history=reloaded)
    assert all(torch.equal(in_memory.tensors[k], from_file.tensors[k]) for k in in_memory.tensors)
    fresh = ultraedit_edit(model, tokenizer, LATER, CONFIG, progress=False)
    assert any(not torch.allclose(in_memory.tensors[k], fresh.tensors[k]) for k in in_memory.tensors)
    assert norm.n_edits == 3 and in_memory.hyperparameters["edits_before"] == 2


def test_a_saved_history_of_another_kind_or_model_is_refused(tokenizer, tmp_path):
    from hf_kedit.methods.locate.alphaedit import EditedKeys

    norm = LifelongNorm()
    ultraedit_edit(tiny(tokenizer), tokenizer, EDITS[:1], CONFIG, progress=False, history=norm)
    norm.save(tmp_path / "norm.safetensors")
    with pytest.raises(EditRequestError, match="holds a ultraedit-norm history, not a alphaedit-keys one"):
        EditedKeys.load(tmp_path / "norm.safetensors")
    with pytest.raises(EditRequestError, match="this LifelongNorm was made on other weights"):
        ultraedit_edit(tiny(tokenizer, initializer_range=0.3), tokenizer, LATER, CONFIG, progress=False,
                       history=norm)
    with pytest.raises(EditRequestError, match="has no model.layers.1.mlp.fc_in"):
        ultraedit_edit(tiny(tokenizer), tokenizer, LATER, UltraEditConfig(layers=(1,), projections=("mlp.fc_in",)),
                       progress=False)
