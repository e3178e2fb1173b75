"""weight_delta packs as llama.cpp GGUF LoRA adapters and uniform steering packs
as control vectors, read back with the gguf package's own reader: the metadata
llama.cpp reads, its tensor names and shapes, changes of exactly B A for every
edited weight, and the sum of the shifts at the steered layer."""
import gguf
import numpy as np
import pytest
import torch

from hf_kedit.cli import main as kedit
from hf_kedit.errors import IncompatiblePackError, PackFormatError
from hf_kedit.kinds.weight_delta import factors_by_module
from hf_kedit.pack.gguf import control_vector_buffer, gguf_tensor_name
from packs import random_basis_pack, random_pack, random_steering_pack
from tiny_models import tiny_model

SERVED = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "phi"]
GGUF_NAMES = {"gpt2": "gpt2", "gptj": "gptj", "gpt_neox": "gptneox", "llama": "llama", "mistral": "llama",
              "qwen2": "qwen2", "gemma": "gemma", "phi": "phi2"}


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("arch", SERVED)
def test_an_adapter_holds_what_llama_cpp_reads(arch, tmp_path):
    model = tiny_model(arch)
    pack = random_pack(model, layers=(0, 2), n_edits=2, rank=1)
    path = pack.export_gguf(tmp_path / "edits.gguf")
    fields, tensors = read(path)
    assert fields["general.architecture"] == GGUF_NAMES[arch]
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 2.0  # two rank-one edits per weight
    for module, (A, B) in factors_by_module(pack).items():
        layer = int(module.split(".")[-3])
        a, b = tensors[f"blk.{layer}.ffn_down.weight.lora_a"], tensors[f"blk.{layer}.ffn_down.weight.lora_b"]
        assert a.shape == tuple(A.shape) and b.shape == tuple(B.shape)
        torch.testing.assert_close(torch.from_numpy(b @ a), B @ A)


def test_every_weight_changes_by_exactly_b_a_whatever_its_rank(tmp_path):
    model = tiny_model("llama")
    # One pack of rank 6 on layer 0's weight and rank 1 on layer 1's.
    pack = random_pack(model, layers=(0,), n_edits=3, rank=2).extend(
        random_pack(model, layers=(1,), n_edits=1, rank=1, prefix="f"))
    fields, tensors = read(pack.export_gguf(tmp_path / "edits.gguf"))
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 6.0
    for module, (A, B) in factors_by_module(pack).items():
        name = f"blk.{module.split('.')[-3]}.ffn_down.weight"
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        scale = alpha / a.shape[0]  # what llama.cpp multiplies B A by
        torch.testing.assert_close(torch.from_numpy(scale * (b @ a)), B @ A)


def test_opt_has_no_llama_cpp_architecture(tmp_path):
    with pytest.raises(IncompatiblePackError, match="llama.cpp has no architecture for model_type 'opt'"):
        random_pack(tiny_model("opt")).export_gguf(tmp_path / "edits.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_module_without_a_gguf_name_is_named_in_the_error():
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    with pytest.raises(IncompatiblePackError, match="model.layers.1.mlp.weird has no llama.cpp tensor name"):
        gguf_tensor_name(name_map, "model.layers.1.mlp.weird")


def test_other_kinds_are_refused_with_what_to_use_instead(tmp_path):
    pack = random_basis_pack(tiny_model("llama"))
    with pytest.raises(PackFormatError, match="basis_intervention packs have no llama.cpp equivalent.*load_edits"):
        pack.export_gguf(tmp_path / "edits.gguf")
    assert list(tmp_path.iterdir()) == []


def centroids(model, n=2):
    return torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_uniform_steering_pack_is_a_control_vector_of_its_summed_shifts(arch, tmp_path):
    model = tiny_model(arch)
    pack = random_steering_pack(model, centroids(model), rank=0, site=2)
    fields, tensors = read(pack.export_gguf(tmp_path / "steer.gguf"))
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == GGUF_NAMES[arch]
    assert set(tensors) == {"direction.2"} and tensors["direction.2"].dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(tensors["direction.2"]),
                               pack.tensors["e0.map.bias"] + pack.tensors["e1.map.bias"])


def test_the_control_vector_buffer_is_laid_out_as_llama_cpp_loads_it(tmp_path):
    model = tiny_model("llama")
    pack = random_steering_pack(model, centroids(model, 1), rank=0, site=2)
    buffer = control_vector_buffer(pack.export_gguf(tmp_path / "steer.gguf"))
    d = model.config.hidden_size
    assert buffer.dtype == np.float32 and buffer.shape == (2 * d,)
    assert not buffer[:d].any()  # layer 1: no direction
    torch.testing.assert_close(torch.from_numpy(buffer[d:]), pack.tensors["e0.map.bias"])  # layer 2 at (2 − 1) · d
    padded = control_vector_buffer(tmp_path / "steer.gguf", layers=5)  # layers 1 to 4, as llama.cpp is given them
    assert padded.shape == (4 * d,) and np.array_equal(padded[:2 * d], buffer) and not padded[2 * d:].any()
    with pytest.raises(IncompatiblePackError, match="steers layer 2; the model has layers 1 to 1"):
        control_vector_buffer(tmp_path / "steer.gguf", layers=2)
    with pytest.raises(PackFormatError, match="is not a control vector direction"):
        control_vector_buffer(random_pack(model).export_gguf(tmp_path / "lora.gguf"))


STEERING_REFUSED = [  # (pack settings, export settings, message)
    ({"rank": 0}, {}, r"steering_map packs have no llama.cpp equivalent.*uniform steering packs \(actadd with site"),
    ({"rank": 0, "site": 0}, {}, r"steers decoder layer 0's output; llama.cpp's control vectors act on layers 1 to 2"),
    ({"rank": 2, "site": 1}, {}, r"edits \['e0', 'e1'\] are linear maps.*only pure shifts \(actadd\) export"),
    ({"rank": 0, "site": 1}, {"rank": 1}, r"rank and share compact a LoRA adapter's factors; a control vector"),
]


@pytest.mark.parametrize("settings, export, match", STEERING_REFUSED, ids=["routed", "layer-0", "linear", "rank"])
def test_steering_packs_without_a_control_vector_are_refused(settings, export, match, tmp_path):
    model = tiny_model("llama")
    pack = random_steering_pack(model, centroids(model), **settings)
    with pytest.raises(PackFormatError, match=match):
        pack.export_gguf(tmp_path / "steer.gguf", **export)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_gguf_writes_a_control_vector(tmp_path, capsys):
    model = tiny_model("llama")
    random_steering_pack(model, centroids(model), rank=0, site=1).save_pretrained(tmp_path / "pack")
    assert kedit(["export-gguf", str(tmp_path / "pack"), str(tmp_path / "steer.gguf")]) == 0
    assert "--control-vector" in capsys.readouterr().out
    assert read(tmp_path / "steer.gguf")[0]["general.architecture"] == "controlvector"


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    pack = random_pack(tiny_model("llama"))
    path = tmp_path / "edits.gguf"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pack.export_gguf(path)
    assert path.read_bytes() == b"mine"
    pack.export_gguf(path, overwrite=True)
    assert read(path)[0]["adapter.type"] == "lora"


def test_cli_export_gguf(tmp_path, capsys):
    random_pack(tiny_model("llama")).save_pretrained(tmp_path / "pack")
    assert kedit(["export-gguf", str(tmp_path / "pack"), str(tmp_path / "edits.gguf")]) == 0
    assert "--lora" in capsys.readouterr().out and (tmp_path / "edits.gguf").is_file()
    assert kedit(["export-gguf", str(tmp_path / "pack"), str(tmp_path / "edits.gguf")]) == 2  # exists
