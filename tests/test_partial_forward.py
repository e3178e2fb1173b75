"""Passes that stop after the last module read, and an LM head that reads only
the positions asked for: the same numbers as a full pass, less work."""
import pytest
import torch

from hf_kedit.anatomy import anatomy_of, hidden_states, linear_shape
from hf_kedit.kinds.weight_delta import deltas_applied
from hf_kedit.methods.teacher_forcing import fit_target
from hf_kedit.partial_forward import layers_before, lm_head_at, run_until
from tiny_models import ARCHITECTURES, tiny_inputs, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_run_until_stops_after_the_module_with_its_output_as_in_a_full_pass(arch):
    model, ids = tiny_model(arch), tiny_inputs()
    layers = model.get_submodule(anatomy_of(model).layers)
    ran, seen = [], []
    for name, module in [("last layer", layers[-1]), ("head", model.get_output_embeddings())]:
        module.register_forward_pre_hook(lambda m, args, name=name: ran.append(name))
    handle = layers[1].register_forward_hook(lambda m, args, out: seen.append(hidden_states(out)))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        ran.clear()
        run_until(model, [layers[1]], input_ids=ids)
        assert ran == [] and len(seen) == 2  # neither the last layer nor the head ran
        torch.testing.assert_close(seen[1], seen[0])
        handle.remove()
        torch.testing.assert_close(model(input_ids=ids).logits, full)  # nothing is left behind


def test_run_until_waits_for_every_module():
    model, ids = tiny_model("llama"), tiny_inputs()
    layers, ran = model.model.layers, []
    layers[2].register_forward_pre_hook(lambda *args: ran.append(2))
    with torch.no_grad():
        run_until(model, [layers[1], layers[0]], input_ids=ids)
        assert ran == []
        run_until(model, [layers[0], layers[2]], input_ids=ids)
        assert ran == [2]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_head_at_positions_gives_those_positions_logits(arch):
    model, ids = tiny_model(arch), tiny_inputs(batch=3)
    rows, columns = torch.tensor([0, 1, 2]), torch.tensor([6, 2, 4])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for index, expected in [((slice(None), -1), full[:, -1]), ((slice(None), slice(-2, None)), full[:, -2:]),
                                ((rows, columns), full[rows, columns])]:
            with lm_head_at(model, index):
                torch.testing.assert_close(model(input_ids=ids).logits, expected)
        torch.testing.assert_close(model(input_ids=ids).logits, full)  # the head's hooks are gone


def test_the_head_at_positions_without_compute_hands_over_its_input():
    model, ids = tiny_model("llama"), tiny_inputs(batch=3)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with lm_head_at(model, (slice(None), slice(-2, None)), compute=False) as read:
            assert model(input_ids=ids).logits.shape == (0, 128)  # the head did no work
        assert read[0].shape == (3, 2, 32)
        torch.testing.assert_close(model.get_output_embeddings()(read[0]), full[:, -2:])


def _train_last_mlp(model, ids, labels, trained: bool) -> list[torch.Tensor]:
    """Five Adam steps on a rank-2 delta of the last layer's MLP output projection."""
    name = anatomy_of(model).mlp_out(anatomy_of(model).num_layers - 1)
    out_f, in_f = linear_shape(model.get_submodule(name))
    torch.manual_seed(0)
    A, B = (0.1 * torch.randn(2, in_f)).requires_grad_(), torch.zeros(out_f, 2, requires_grad=True)
    with deltas_applied(model, {name: (A, B)}):
        fit_target(model, ids, labels, torch.optim.Adam([A, B], lr=1e-2), 5, -1.0,
                   trained=[model.get_submodule(name)] if trained else None)
    return [A.detach(), B.detach()]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_training_loop_runs_the_layers_below_its_trained_module_once_and_trains_the_same(arch):
    model, ids = tiny_model(arch), tiny_inputs(batch=1)
    model.requires_grad_(False)
    labels = ids.clone()
    labels[0, :4] = -100
    anatomy = anatomy_of(model)
    runs = {i: [] for i in range(anatomy.num_layers)}
    for i in runs:
        model.get_submodule(anatomy.mlp_out(i)).register_forward_pre_hook(lambda m, args, i=i: runs[i].append(1))
    every_step = _train_last_mlp(model, ids, labels, trained=False)
    assert [len(r) for r in runs.values()] == [5] * anatomy.num_layers
    for r in runs.values():
        r.clear()
    replayed = _train_last_mlp(model, ids, labels, trained=True)
    below = len(layers_before(model, [model.get_submodule(anatomy.mlp_out(anatomy.num_layers - 1))]))
    assert below == anatomy.num_layers - 1
    assert [len(r) for r in runs.values()] == [1] * below + [5]
    for a, b in zip(replayed, every_step):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the layers run again once the loop is over
        model(input_ids=ids)
    assert [len(r) for r in runs.values()] == [2] * below + [6]
