"""The `singular_scale` kind (SVF's z): z = 1 is the model itself, the hook is the
merged weight, packs on one weight compose by z = 1 + Σ w (z − 1), a pack made
on other weights is refused, and everything comes off bit-exactly."""
from __future__ import annotations

import pytest
import torch

from hf_kedit import Edit, EditPack, load_edits, remove_edits, stack_of
from hf_kedit.anatomy import anatomy_of
from hf_kedit.errors import IncompatiblePackError, PackFormatError
from hf_kedit.kinds.singular_scale import (MIX_RULE, mix_experts, mix_weight_name,
                                           singular_decomposition, weight_matrix, z_name)
from packs import random_svf_pack
from test_bad_input import _logits, raises_exactly, untouched
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ["llama", "gpt2", "opt"]  # nn.Linear, GPT-2's transposed Conv1D, OPT's fc2


def module_of(model, layer=1):
    return anatomy_of(model).mlp_out(layer)


def adapted_weight(model, module, z):
    """U diag(S ⊙ z) Vᵀ, stored as the module stores its weight."""
    m = model.get_submodule(module)
    U, S, Vh = singular_decomposition(weight_matrix(m, m.weight))
    W = (U.double() * (S.double() * z.double())) @ Vh.double()
    return (W.T if W.shape != m.weight.shape else W).float()


def state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def same_state(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_z_of_ones_is_the_model_itself_and_removal_is_exact(arch):
    model = tiny_model(arch)
    base, weights = _logits(model), state(model)
    pack = random_svf_pack(model, scale=0.0)
    assert all(torch.equal(t, torch.ones_like(t)) for t in pack.tensors.values())
    load_edits(model, pack, name="ones")
    assert torch.equal(_logits(model), base)
    load_edits(model, random_svf_pack(model, seed=1, prefix="x", subject="X{}"), name="other")
    assert not torch.equal(_logits(model), base)
    remove_edits(model, "other")
    remove_edits(model, "ones")
    assert torch.equal(_logits(model), base) and same_state(model, weights) and no_hooks(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_hook_gives_the_merged_weight_s_output_and_merge_writes_u_diag_s_z_v(arch):
    model = tiny_model(arch)
    weights = state(model)
    pack = random_svf_pack(model)
    module = module_of(model)
    expected = adapted_weight(model, module, pack.tensors[z_name("e0", module)])
    load_edits(model, pack, name="svf")
    hooked = _logits(model)
    stack_of(model).merge("svf")
    assert torch.allclose(model.get_submodule(module).weight, expected, atol=1e-5)
    assert torch.allclose(_logits(model), hooked, atol=1e-5)
    assert not torch.equal(_logits(model), torch.zeros_like(hooked))
    remove_edits(model, "svf")
    assert same_state(model, weights) and no_hooks(model)


def test_packs_on_one_weight_add_their_offsets_in_one_hook_of_rank_k():
    model = tiny_model("llama")
    module = module_of(model)
    first, second = random_svf_pack(model, seed=0), random_svf_pack(model, seed=1, prefix="x", subject="X{}")
    z1, z2 = first.tensors[z_name("e0", module)], second.tensors[z_name("x0", module)]
    load_edits(model, first, name="first")
    load_edits(model, second, name="second")
    runtime = stack_of(model).runtimes["singular_scale"]
    assert runtime.hooks[module].factors[0].shape[0] == len(z1)  # one rank-k hook, not two
    both = _logits(model)
    fresh = tiny_model("llama")
    with torch.no_grad():
        fresh.get_submodule(module).weight.copy_(adapted_weight(fresh, module, 1 + (z1 - 1) + (z2 - 1)))
    assert torch.allclose(both, _logits(fresh), atol=1e-5)


def test_mixed_experts_are_transformer_squared_s_weighted_mix_of_z():
    model = tiny_model("llama")
    module = module_of(model)
    first, second = random_svf_pack(model, seed=0), random_svf_pack(model, seed=1, prefix="x", subject="X{}")
    z1, z2 = first.tensors[z_name("e0", module)], second.tensors[z_name("x0", module)]
    mixed = mix_experts([first, second], [0.25, 0.75])
    assert mixed.kind_config["mix"] == MIX_RULE
    assert mixed.tensors[mix_weight_name("e0")].item() == 0.25 and mixed.tensors[mix_weight_name("x0")].item() == 0.75
    load_edits(model, mixed, name="mixed")
    stack_of(model).merge("mixed")
    assert torch.allclose(model.get_submodule(module).weight,
                          adapted_weight(tiny_model("llama"), module, 0.25 * z1 + 0.75 * z2), atol=1e-5)
    with raises_exactly(IncompatiblePackError, "one weight per pack"):
        mix_experts([first], [0.5, 0.5])


def test_a_pack_made_on_other_weights_is_refused_by_its_spectrum_and_nothing_attaches():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    pack = random_svf_pack(other)
    with untouched(model), raises_exactly(IncompatiblePackError, "singular values here .* are not those"):
        load_edits(model, pack, verify="shapes")  # past the fingerprint: the spectrum alone refuses it
    assert no_hooks(model) and "singular_scale" not in stack_of(model).runtimes
    with untouched(model), raises_exactly(IncompatiblePackError, "fingerprint|weights"):
        load_edits(model, pack)


def test_a_second_pack_attaches_on_a_weight_a_merged_one_changed():
    """The spectrum is checked against the weight before merged packs changed it."""
    model = tiny_model("llama")
    weights = state(model)
    first, second = random_svf_pack(model, seed=0), random_svf_pack(model, seed=1, prefix="x", subject="X{}")
    load_edits(model, first, name="merged", merge=True)
    load_edits(model, second, name="hooked")
    both = _logits(model)
    reference = tiny_model("llama")
    load_edits(reference, random_svf_pack(reference, seed=0), name="a")
    load_edits(reference, random_svf_pack(reference, seed=1, prefix="x", subject="X{}"), name="b")
    assert torch.allclose(both, _logits(reference), atol=1e-5)
    remove_edits(model, "hooked")
    remove_edits(model, "merged")
    assert same_state(model, weights) and no_hooks(model)


def test_one_edit_comes_off_a_pack_exactly(tmp_path):
    model = tiny_model("llama")
    pack = random_svf_pack(model, layers=(0, 2), n_edits=2)
    load_edits(model, pack, name="two")
    remove_edits(model, "two", edit_ids=["e0"])
    alone = tiny_model("llama")
    load_edits(alone, pack.select(["e1"]), name="one")
    assert torch.equal(_logits(model), _logits(alone))


def test_a_pack_round_trips_through_files_and_holds_only_z_and_its_weights(tmp_path):
    model = tiny_model("llama")
    pack = random_svf_pack(model, layers=(0, 1, 2), n_edits=2)
    again = EditPack.from_pretrained(pack.save_pretrained(tmp_path / "svf"))
    assert again.kind_config == pack.kind_config
    assert again.tensors.keys() == pack.tensors.keys() and all(torch.equal(again.tensors[n], t)
                                                               for n, t in pack.tensors.items())
    k = min(pack.kind_config["modules"][module_of(model)]["shape"])
    assert pack.nbytes == 2 * (3 * k + 1) * 4  # per edit: one float32 z per weight, one mix weight
    base = _logits(model)
    load_edits(model, again, name="svf")
    assert not torch.equal(_logits(model), base)


def _broken(pack, change):
    tensors, config = dict(pack.tensors), {**pack.kind_config, "modules": dict(pack.kind_config["modules"])}
    change(tensors, config)
    edits = [Edit(**{**e.__dict__, "tensors": [n for n in e.tensors if n in tensors]}) for e in pack.edits]
    return EditPack(pack.kind, pack.method, edits, tensors, pack.base_model, pack.hyperparameters, config)


BROKEN = {
    "z of the wrong length": (lambda t, c: t.update({z_name("e0", "model.layers.1.mlp.down_proj"): torch.ones(3)}),
                              "z has shape \\[3\\], not \\[32\\]"),
    "no mix weight": (lambda t, c: t.pop(mix_weight_name("e0")), "needs its mix weight"),
    "another mix rule": (lambda t, c: c.update({"mix": "product"}), "'mix' ="),
    "no spectrum": (lambda t, c: c["modules"].update({"model.layers.1.mlp.down_proj": {"layout": "out_in",
                                                                                       "shape": [32, 64]}}),
                    "spectrum"),
    "a NaN in the spectrum": (lambda t, c: c["modules"].update({"model.layers.1.mlp.down_proj": {
        "layout": "out_in", "shape": [32, 64], "spectrum": [float("nan")]}}), "finite singular values"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_malformed_pack_is_refused_with_what_is_wrong(case):
    model = tiny_model("llama")
    change, match = BROKEN[case]
    pack = random_svf_pack(model)
    with raises_exactly(PackFormatError, match):
        _broken(pack, change).validate()


def test_a_weight_is_decomposed_once_per_model_and_again_once_it_holds_other_values(monkeypatch):
    from hf_kedit.kinds import singular_scale

    model = tiny_model("llama")
    pack = random_svf_pack(model)
    calls = []
    real = singular_scale.singular_decomposition
    monkeypatch.setattr(singular_scale, "singular_decomposition", lambda matrix: calls.append(1) or real(matrix))
    for _ in range(3):
        load_edits(model, pack, name="svf")
        remove_edits(model, "svf")
    assert len(calls) == 1
    load_edits(model, pack, name="svf", merge=True)  # a merge, then its bit-exact unmerge: the same values
    remove_edits(model, "svf")
    assert len(calls) == 1
    with torch.no_grad():
        model.get_submodule(module_of(model)).weight[0, 0] += 1e-6  # other values, the same spectrum to 1 %
    load_edits(model, pack, name="svf")
    assert len(calls) == 2


def test_a_pack_made_in_float32_attaches_to_the_same_weights_in_bfloat16():
    """bf16 rounding moves the spectrum by less than the tolerance: the same model in
    another dtype takes the pack, and it acts as it does in float32."""
    model, low = tiny_model("llama"), tiny_model("llama", dtype=torch.bfloat16)
    pack = random_svf_pack(model)
    changes = []
    for m in (model, low):
        base = _logits(m).float()
        load_edits(m, pack, name="svf")
        changes.append((_logits(m).float() - base).flatten())
    assert torch.nn.functional.cosine_similarity(changes[0], changes[1], 0) > 0.9  # bf16 logits round the change


def test_exports_to_serving_formats_are_refused_with_the_reason(tmp_path):
    pack = random_svf_pack(tiny_model("llama"))
    with raises_exactly(PackFormatError, "singular_scale packs have no PEFT equivalent"):
        pack.export_peft(tmp_path / "peft")
    with raises_exactly(PackFormatError, "singular_scale packs have no llama.cpp equivalent"):
        pack.export_gguf(tmp_path / "edits.gguf")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "edits.gguf").exists()
