"""weight_delta packs on tiny models of every architecture: exact effect, exact removal."""
import pytest
import torch

from hf_kedit import load_edits, remove_edits, stack_of
from hf_kedit.anatomy import weight_layout
from packs import delta_matrix, random_pack
from tiny_models import ARCHITECTURES, tiny_inputs, tiny_model

DTYPES = [torch.float32, torch.bfloat16]


def logits(model, ids=None):
    with torch.no_grad():
        return model(tiny_inputs() if ids is None else ids).logits


def edited_by_hand(arch, dtype, *packs):
    """A fresh model whose weights carry the packs' deltas, written directly."""
    model = tiny_model(arch, dtype)
    for pack in packs:
        for name in pack.kind_config["modules"]:
            module = model.get_submodule(name)
            delta = delta_matrix(pack, name)
            with torch.no_grad():
                w = module.weight
                w.copy_((w.float() + (delta.T if weight_layout(module) == "in_out" else delta)).to(w.dtype))
    return model


def assert_matches(actual, expected, base, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    else:  # bf16 rounds the hooked sum and the edited weight differently: compare to the edit's size
        assert (actual.float() - expected.float()).abs().max() < 0.1 * (expected.float() - base.float()).abs().max()


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_attach_applies_the_delta_and_removal_is_bit_exact(arch, dtype):
    model = tiny_model(arch, dtype)
    base = logits(model)
    pack = random_pack(model, layers=(0, 2), n_edits=2)
    load_edits(model, pack, name="p")
    hooked = logits(model)
    assert (hooked.float() - base.float()).abs().max() > 1e-2  # the edit does something
    assert_matches(hooked, logits(edited_by_hand(arch, dtype, pack)), base, dtype)
    remove_edits(model, "p")
    assert torch.equal(logits(model), base)
    assert no_hooks(model) and len(stack_of(model)) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_then_unmerge_restores_weights_bit_exactly(arch, dtype):
    model = tiny_model(arch, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model)
    pack = random_pack(model, layers=(1,), n_edits=2)
    load_edits(model, pack, name="p", merge=True)
    assert no_hooks(model)  # merged packs run in the weights, not in hooks
    assert_matches(logits(model), logits(edited_by_hand(arch, dtype, pack)), base, dtype)
    stack_of(model).unmerge("p")
    assert not no_hooks(model)  # back on the hook
    remove_edits(model, "p")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("first", ["a", "b"])
def test_two_stacked_packs_leave_no_trace_in_either_order(arch, dtype, first):
    model = tiny_model(arch, dtype)
    base = logits(model)
    a = random_pack(model, layers=(0, 1), seed=1, prefix="a")
    b = random_pack(model, layers=(1, 2), seed=2, prefix="b", subject="B{}")
    load_edits(model, a, name="a")
    load_edits(model, b, name="b", merge=dtype == torch.float32)  # hooked + merged in one stack
    assert_matches(logits(model), logits(edited_by_hand(arch, dtype, a, b)), base, dtype)
    remove_edits(model, first)
    only = b if first == "a" else a
    assert_matches(logits(model), logits(edited_by_hand(arch, dtype, only)), base, dtype)
    remove_edits(model, "b" if first == "a" else "a")
    assert torch.equal(logits(model), base)
    assert no_hooks(model)


def test_many_packs_on_one_module_run_in_one_fused_hook():
    model = tiny_model("llama")
    base = logits(model)
    packs = [random_pack(model, layers=(1,), seed=s, prefix=f"p{s}x", subject=f"P{s}-{{}}") for s in range(20)]
    for i, p in enumerate(packs):
        load_edits(model, p, name=f"p{i}")
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    assert len(module._forward_hooks) == 1
    assert sum(len(m._forward_hooks) for m in model.modules()) == 1
    torch.testing.assert_close(logits(model), logits(edited_by_hand("llama", torch.float32, *packs)),
                               atol=1e-5, rtol=1e-5)
    for i in range(20):
        remove_edits(model, f"p{i}")
    assert torch.equal(logits(model), base)


def test_removing_one_edit_of_a_pack_leaves_the_others():
    model = tiny_model("llama")
    base = logits(model)
    pack = random_pack(model, layers=(0, 2), n_edits=3)
    load_edits(model, pack, name="p", merge=True)
    remove_edits(model, "p", edit_ids=["e1"])
    assert [e.id for _, e in stack_of(model).edits()] == ["e0", "e2"]
    assert stack_of(model).packs["p"].merged
    torch.testing.assert_close(logits(model), logits(edited_by_hand("llama", torch.float32, pack.select(["e0", "e2"]))),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="no edits"):
        remove_edits(model, "p", edit_ids=["nope"])
    remove_edits(model, "p", edit_ids=["e0", "e2"])
    assert len(stack_of(model)) == 0 and torch.equal(logits(model), base)


def test_disable_runs_the_base_model_hooked_and_merged():
    model = tiny_model("gpt2")
    base = logits(model)
    load_edits(model, random_pack(model, layers=(0,), prefix="a"), name="a")
    load_edits(model, random_pack(model, layers=(1,), seed=3, prefix="b", subject="B{}"), name="b", merge=True)
    edited = logits(model)
    with stack_of(model).disable():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), edited)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_cache_matches_the_edited_weights(arch):
    model = tiny_model(arch)
    pack = random_pack(model, layers=(0, 1, 2), n_edits=2, scale=1.0)
    load_edits(model, pack, name="p")
    reference = edited_by_hand(arch, torch.float32, pack)
    ids = tiny_inputs(batch=1)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_export_peft_loads_in_peft_with_the_same_outputs(arch, tmp_path):
    from peft import PeftModel

    model = tiny_model(arch)
    a = random_pack(model, layers=(0, 2), n_edits=2, rank=1)
    b = random_pack(model, layers=(1,), n_edits=1, rank=3, seed=5, prefix="b", subject="B{}")  # another rank: rank_pattern
    tensors, edits = {**a.tensors, **b.tensors}, a.edits + b.edits
    base_model = {**a.base_model, "fingerprint": {**a.base_model["fingerprint"], **b.base_model["fingerprint"]}}
    combined = type(a)("weight_delta", "random", edits, tensors, base_model,
                       kind_config={"modules": {**a.kind_config["modules"], **b.kind_config["modules"]}})
    combined.export_peft(tmp_path / "lora")
    load_edits(model, combined, name="p")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), logits(tiny_model(arch)))


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_accelerate_offloaded_model_gets_the_same_edit(offload, tmp_path):
    from accelerate import cpu_offload, disk_offload

    reference = tiny_model("llama")
    pack = random_pack(reference, layers=(0, 2), n_edits=2)
    base = logits(reference)
    load_edits(reference, pack, name="p")
    model = tiny_model("llama")
    if offload == "cpu":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, offload_dir=str(tmp_path), execution_device="cpu")
    assert model.get_submodule("model.layers.0.mlp.down_proj").weight.device.type == "meta"
    load_edits(model, pack, name="p")  # the fingerprint reads the offloaded weights
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    remove_edits(model, "p")
    assert torch.equal(logits(model), base)


def test_a_model_loaded_with_a_device_map_and_disk_offload(tmp_path):
    from transformers import AutoModelForCausalLM

    reference = tiny_model("llama")
    reference.save_pretrained(tmp_path / "model")
    pack = random_pack(reference, layers=(0, 2), n_edits=2)
    base = logits(reference)
    load_edits(reference, pack, name="p")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert model.get_submodule("model.layers.2.mlp.down_proj").weight.device.type == "meta"
    with pytest.raises(Exception, match="offloaded"):
        load_edits(model, pack, name="p", merge=True)
    assert len(stack_of(model)) == 0 and no_hooks(model) and torch.equal(logits(model), base)
    load_edits(model, pack, name="p")
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="offloaded"):
        stack_of(model).merge("p")
    assert not stack_of(model).packs["p"].merged
    remove_edits(model, "p")
    assert torch.equal(logits(model), base)
