"""AlphaEdit on tiny random models with the default model's tokenizer."""
import pytest
import torch

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.errors import EditRequestError
from hf_kedit.methods.locate.alphaedit import (AlphaEditConfig, EditedKeys, alphaedit_edit, null_space_projection,
                                               null_space_update)
from hf_kedit.methods.locate.stats import key_second_moments
from packs import delta_matrix
from test_rome import tiny

EDITS = [Edit("a", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
         Edit("b", "Toko Yasuda", "{} plays the", "piano", "guitar")]
LATER = [Edit("c", "Paris", "{} is the capital of", "Italy", "France")]
# Few tokens, so the statistics leave most of the 64 key dimensions as null space.
CORPUS = ["The cat sat on the mat.", "Rain fell all day."]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path))
    return AlphaEditConfig(layers=(0, 1), steps=3, context_templates=((2, 3),), stats_corpus=CORPUS,
                           stats_tokens=64)


def test_the_update_leaves_every_key_outside_the_null_space_where_it_was():
    g = torch.Generator().manual_seed(0)
    preserved = torch.randn(40, 12, generator=g)  # 12 keys spanning 12 of 40 dimensions
    C = preserved @ preserved.T / 12
    P = null_space_projection(torch.nn.Linear(1, 1), C, share=1e-6)
    assert torch.linalg.matrix_rank(P.double(), atol=1e-4) == 28
    K, R = torch.randn(40, 3, generator=g), torch.randn(7, 3, generator=g)
    A, B = null_space_update(K, R, P, None, ridge=1e-6)
    delta = B @ A
    assert (delta @ preserved).abs().max() < 1e-4 * R.abs().max()  # their outputs stay (to rounding)
    torch.testing.assert_close(delta @ K, R, atol=1e-3, rtol=1e-3)  # the new keys get their values
    assert A.shape == (3, 40) and B.shape == (7, 3)


def test_earlier_keys_enter_the_least_squares():
    g = torch.Generator().manual_seed(1)
    P = torch.eye(30)
    earlier, K, R = torch.randn(30, 20, generator=g), torch.randn(30, 2, generator=g), torch.randn(5, 2, generator=g)
    A, B = null_space_update(K, R, P, earlier @ earlier.T, ridge=1.0)
    with_history = (B @ A @ earlier).norm()
    A, B = null_space_update(K, R, P, None, ridge=1.0)
    assert with_history < 0.5 * (B @ A @ earlier).norm()


def test_an_alphaedit_pack_keeps_the_keys_of_the_statistics_corpus(tokenizer, config):
    model = tiny(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pack = alphaedit_edit(model, tokenizer, EDITS, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    anatomy = anatomy_of(model)
    for layer in (0, 1):
        name = anatomy.mlp_out(layer)
        C = key_second_moments(model, tokenizer, [layer], CORPUS, 64, progress=False)[layer]
        delta = delta_matrix(pack, name)
        values, vectors = torch.linalg.eigh(C.double())
        kept = vectors[:, values.cumsum(0) > config.nullspace_share * values.sum()].float()  # C's own directions
        assert kept.shape[1] > 0 and delta.norm() > 0
        assert (delta @ kept).norm() < 1e-4 * delta.norm()
    load_edits(model, pack, name="alphaedit")
    remove_edits(model, "alphaedit")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_sequence_of_batches_carries_its_keys_and_saves_them(tokenizer, config, tmp_path):
    model = tiny(tokenizer)
    history = EditedKeys()
    first = alphaedit_edit(model, tokenizer, EDITS, config, progress=False, history=history)
    assert history.n_edits == 2 and sorted(history.tensors) == sorted(first.kind_config["modules"])
    load_edits(model, first, name="first")
    history.save(tmp_path / "keys.safetensors")
    reloaded = EditedKeys.load(tmp_path / "keys.safetensors")
    assert reloaded.n_edits == 2 and reloaded.base_model == history.base_model
    assert all(torch.equal(reloaded.tensors[k], history.tensors[k]) for k in history.tensors)
    second = alphaedit_edit(model, tokenizer, LATER, config, progress=False, history=history)
    again = alphaedit_edit(model, tokenizer, LATER, config, progress=False, history=reloaded)
    assert all(torch.equal(second.tensors[k], again.tensors[k]) for k in second.tensors)
    assert history.n_edits == 3 and second.hyperparameters["edits_before"] == 2
    fresh = alphaedit_edit(model, tokenizer, LATER, config, progress=False)
    assert any(not torch.equal(second.tensors[k], fresh.tensors[k]) for k in second.tensors)


def test_keys_from_other_weights_are_refused(tokenizer, config, tmp_path):
    history = EditedKeys()
    alphaedit_edit(tiny(tokenizer), tokenizer, EDITS[:1], config, progress=False, history=history)
    other = tiny(tokenizer, initializer_range=0.3)
    with pytest.raises(EditRequestError, match="this EditedKeys was made on other weights of the edited modules"):
        alphaedit_edit(other, tokenizer, LATER, config, progress=False, history=history)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EditRequestError, match="is not a file EditedKeys.save wrote"):
        EditedKeys.load(tmp_path / "junk.safetensors")
