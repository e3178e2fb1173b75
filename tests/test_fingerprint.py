"""The base-model check: same weights pass in any dtype, other weights do not."""
import pytest
import torch

from hf_kedit import IncompatiblePackError, load_edits, stack_of
from packs import random_pack
from tiny_models import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_pack_made_in_fp32_fits_the_same_weights_in_any_dtype(dtype):
    pack = random_pack(tiny_model("qwen2"))
    model = tiny_model("qwen2", dtype)
    load_edits(model, pack, name="p")
    assert list(stack_of(model).packs) == ["p"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_other_weights_are_refused_in_any_dtype(dtype):
    pack = random_pack(tiny_model("qwen2", seed=0))
    with pytest.raises(IncompatiblePackError, match="weights of model.layers.1.mlp.down_proj differ"):
        load_edits(tiny_model("qwen2", dtype, seed=1), pack)


def test_a_fine_tuned_sibling_is_refused_in_fp32_and_accepted_with_verify_shapes():
    pack = random_pack(tiny_model("llama"))
    sibling = tiny_model("llama")
    with torch.no_grad():  # a small update, as fine-tuning makes
        sibling.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(1.01)
    with pytest.raises(IncompatiblePackError, match="verify='shapes'"):
        load_edits(sibling, pack)
    load_edits(sibling, pack, verify="shapes")
    assert len(stack_of(sibling)) == 1


def test_the_record_names_the_architecture():
    model = tiny_model("llama")
    record = random_pack(model, layers=(0, 2)).base_model
    assert (record["model_type"], record["hidden_size"], record["num_hidden_layers"],
            record["intermediate_size"], record["vocab_size"]) == ("llama", 32, 3, 64, 128)
    assert sorted(record["fingerprint"]) == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    with pytest.raises(IncompatiblePackError, match="num_hidden_layers=3.*num_hidden_layers=4"):
        from hf_kedit.pack.fingerprint import check_base_model
        from transformers import AutoConfig, AutoModelForCausalLM
        from tiny_models import CONFIGS
        bigger = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**CONFIGS["llama"],
                                                                                   "num_hidden_layers": 4}))
        check_base_model(record, bigger)


def test_a_merged_pack_does_not_make_the_next_pack_look_foreign():
    model = tiny_model("llama")
    first = random_pack(model, layers=(1,), prefix="a")
    second = random_pack(model, layers=(1,), seed=1, prefix="b", subject="B{}")
    load_edits(model, first, name="a", merge=True)
    load_edits(model, second, name="b", merge=True)  # checked against the weights before "a" was merged
    assert [p.merged for p in stack_of(model).list()] == [True, True]
