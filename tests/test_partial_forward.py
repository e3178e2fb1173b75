"""Passes that stop after the last module read, and an LM head that reads only
the positions asked for: the same numbers as a full pass, less work."""
import pytest
import torch

from hf_kedit.anatomy import anatomy_of, hidden_states
from hf_kedit.partial_forward import lm_head_at, run_until
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
