import pytest
from torch import nn

from hf_kedit import AnatomyError, anatomy_of
from hf_kedit.anatomy import hidden_states, linear_shape, weight_layout
from tiny_models import ARCHITECTURES, tiny_inputs, tiny_model

EXPECTED = {  # (layers, MLP output projection suffix, layout, final norm)
    "gpt2": ("transformer.h", "mlp.c_proj", "in_out", "transformer.ln_f"),
    "gptj": ("transformer.h", "mlp.fc_out", "out_in", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "out_in", "gpt_neox.final_layer_norm"),
    "llama": ("model.layers", "mlp.down_proj", "out_in", "model.norm"),
    "mistral": ("model.layers", "mlp.down_proj", "out_in", "model.norm"),
    "qwen2": ("model.layers", "mlp.down_proj", "out_in", "model.norm"),
    "gemma": ("model.layers", "mlp.down_proj", "out_in", "model.norm"),
    "phi": ("model.layers", "mlp.fc2", "out_in", "model.final_layernorm"),
    "opt": ("model.decoder.layers", "fc2", "out_in", "model.decoder.final_layer_norm"),
}


def test_every_architecture_is_listed():
    assert sorted(EXPECTED) == ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_anatomy_finds_the_parts(arch):
    model = tiny_model(arch)
    a = anatomy_of(model)
    layers, suffix, layout, norm = EXPECTED[arch]
    assert (a.layers, a.mlp_out_suffix, a.final_norm) == (layers, suffix, norm)
    # GPT-NeoX's head is `embed_out` before transformers 5 and `lm_head` from 5 on.
    assert a.lm_head in (("embed_out", "lm_head") if arch == "gpt_neox" else ("lm_head",))
    assert a.num_layers == model.config.num_hidden_layers
    proj = model.get_submodule(a.mlp_out(1))
    assert weight_layout(proj) == layout
    # The MLP output projection writes the residual stream: out = hidden size.
    assert linear_shape(proj)[0] == model.config.hidden_size
    assert model.get_submodule(a.lm_head) is model.get_output_embeddings()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hidden_states_reads_layer_outputs_of_either_shape(arch):
    model = tiny_model(arch)
    a = anatomy_of(model)
    seen = []
    model.get_submodule(a.layer(0)).register_forward_hook(lambda m, i, o: seen.append(hidden_states(o)))
    model(tiny_inputs())
    assert seen[0].shape == (2, 7, model.config.hidden_size)
    assert hidden_states((seen[0], None)) is seen[0]


def test_layer_out_of_range_is_a_clear_error():
    a = anatomy_of(tiny_model("llama"))
    with pytest.raises(AnatomyError, match="layer 3 is out of range.*3 layers"):
        a.mlp_out(3)


class NoLayers(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])


class NoMlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(config.num_hidden_layers)])


def test_unreadable_models_name_what_was_looked_for():
    config = tiny_model("llama").config
    with pytest.raises(AnatomyError, match="nn.ModuleList of length config.num_hidden_layers=3"):
        anatomy_of(NoLayers(config))
    with pytest.raises(AnatomyError, match="looked for mlp.down_proj"):
        anatomy_of(NoMlp(config))
