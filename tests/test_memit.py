"""MEMIT on tiny random models with the default model's tokenizer."""
import pytest
import torch

from hf_kedit import Edit, load_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.methods.locate.memit import MEMITConfig, least_squares_update, memit_edit, scaled_update_weight
from hf_kedit.methods.requests import edit_layers
from test_rome import tiny

EDITS = [Edit("a", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
         Edit("b", "Toko Yasuda", "{} plays the", "piano", "guitar"),
         Edit("c", "Paris", "{} is the capital of", "Italy", "France")]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.mark.parametrize("with_covariance", [False, True])
def test_the_update_solves_memits_least_squares_problem(with_covariance):
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    X = torch.randn(100, 12, generator=g, dtype=torch.float64)
    C = X.T @ X / 100 if with_covariance else None
    A, B = least_squares_update(K, R, C, update_weight=0.7)
    delta = (B @ A).double()
    C = C if with_covariance else torch.eye(12, dtype=torch.float64)
    # The gradient of ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) vanishes at the solution.
    gradient = (delta @ K - R) @ K.T + 0.7 * delta @ C
    assert gradient.abs().max() < 1e-5
    assert A.shape == (3, 12) and B.shape == (5, 3)  # rank n for a batch of n


def test_memit_pack_has_one_rank_one_pair_per_edit_and_layer(tokenizer):
    model = tiny(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = MEMITConfig(layers=(0, 1, 2), covariance=False, update_weight=1.0, steps=3, context_templates=((2, 3),))
    pack = memit_edit(model, tokenizer, EDITS, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(pack.kind_config["modules"]) == [anatomy_of(model).mlp_out(i) for i in range(3)]
    assert all(len(e.tensors) == 6 for e in pack.edits)  # A and B at 3 layers
    load_edits(model, pack, name="memit")


def test_the_default_update_weight_scales_memits_to_the_mlp_width(tokenizer):
    model = tiny(tokenizer)
    config = MEMITConfig(layers=(0, 1), covariance=False, steps=1, context_templates=((2, 3),))
    pack = memit_edit(model, tokenizer, EDITS[:1], config, progress=False)
    width = model.config.intermediate_size
    assert pack.hyperparameters["update_weight"] == scaled_update_weight(width) == 15000 * width / 16384
    # a key with kᵀC⁻¹k = d_ff (typical under C = E[kkᵀ]) gets about half of its residual written, as on GPT-J
    assert abs(16384 / (15000 + 16384) - width / (scaled_update_weight(width) + width)) < 1e-12


def test_layer_specs():
    assert edit_layers((0.13, 0.27), 30) == [4, 5, 6, 7, 8]
    assert edit_layers((3, 1, 2), 30) == [1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        edit_layers((28, 31), 30)
