"""Models spread by accelerate: offloaded to CPU or disk (weights on `meta`
between forwards, brought in by hooks) or loaded with a device map that puts
layers on disk. accelerate's offload hooks are the same code on CPU as on GPUs,
so on this machine they stand for several devices. Every method must make the
pack it makes on the undispatched model, and every kind must attach, generate
and come off exactly."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.anatomy import execution_device, input_device
from hf_kedit.methods import make_pack
from hf_kedit.methods.learned.mend import MENDTrainingConfig, train_mend
from test_mend import EXAMPLES as MEND_EXAMPLES, QUICK as MEND_QUICK
from test_rome import tiny
from test_steam import known_facts

EDITS = [Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French"),
         Edit("e1", "Toko Yasuda", "{} plays the", "piano", "guitar")]
CORPUS = ["The cat sat on the mat.", "Rain fell all day."]
LOCATE = dict(steps=3, context_templates=((2, 3),), stats_corpus=CORPUS, stats_tokens=64)
QUICK = {"rome": dict(LOCATE, layer=1), "memit": dict(LOCATE, layers=(1, 2)),
         "alphaedit": dict(LOCATE, layers=(1, 2)), "steam": dict(LOCATE, layer=1, mid_layers=(2,)),
         "ultraedit": dict(layers=(1, 2)), "lora": dict(steps=3), "ft": dict(steps=3, layer=1),
         "svf": dict(steps=3, layers=[0, 2]),
         "adalora": dict(steps=8, tinit=2, tfinal=3, delta_t=1, init_r=4, target_r=2, layers=[0, 1, 2]),
         "reft": dict(layer=1, steps=5), "baft": dict(layer=1, steps=5, positions="l1"),
         "sake": {}, "actadd": {}, "mend": dict(layers=MEND_QUICK.layers), "grace": dict(layer=1, steps=5),
         "distill": dict(layers=[1], steps=3, samples=1, sample_tokens=4, locality_samples=1, locality_tokens=6)}
WAYS = ["cpu_offload", "disk_offload", "device_map"]
# Two layers on "disk": read from the checkpoint (or --offload-folder) by accelerate's hooks at each forward.
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "cache"))


def dispatched(tokenizer, way: str, tmp_path):
    """The tiny model of `tiny(tokenizer)`, spread by accelerate in `way`."""
    from accelerate import cpu_offload, disk_offload

    model = tiny(tokenizer)
    if way == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
    elif way == "disk_offload":
        disk_offload(model, offload_dir=str(tmp_path / "disk"), execution_device="cpu")
    else:
        model.save_pretrained(tmp_path / "saved")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map=DEVICE_MAP,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert model.get_submodule("model.layers.1.mlp.down_proj").weight.device.type == "meta"
    return model


def settings(method, tokenizer):
    if method == "steam":  # facts the tiny model recalls, so STEAM's alignment term is in the loss
        return {**QUICK["steam"], "fact_base": known_facts(tiny(tokenizer), tokenizer)}
    return QUICK[method]


def edits_for(method, tokenizer):
    if method == "steam":
        target = known_facts(tiny(tokenizer), tokenizer)[0]["object"]
        return [Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", target, "French")]
    return EDITS


def test_the_execution_device_is_the_hooks_and_not_meta(tokenizer, tmp_path):
    model = dispatched(tokenizer, "device_map", tmp_path)
    assert execution_device(model, "model.layers.1.mlp.down_proj") == torch.device("cpu")
    assert input_device(model) == torch.device("cpu")
    plain = tiny(tokenizer)
    assert execution_device(plain, "model.layers.1.mlp.down_proj") == input_device(plain) == torch.device("cpu")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("method", sorted(QUICK))
def test_every_method_makes_the_same_pack_on_a_dispatched_model(tokenizer, method, way, tmp_path, one_thread):
    if method == "mend":  # an editor trained once on the undispatched weights, found again by their fingerprint
        train_mend(tiny(tokenizer), tokenizer, MEND_EXAMPLES, MENDTrainingConfig(**{**MEND_QUICK.__dict__, "steps": 4}),
                   progress=False)
    edits = edits_for(method, tokenizer)
    torch.manual_seed(0)
    reference = make_pack(method, tiny(tokenizer), tokenizer, edits, settings(method, tokenizer), progress=False)
    model = dispatched(tokenizer, way, tmp_path)
    hooks = {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}
    torch.manual_seed(0)
    pack = make_pack(method, model, tokenizer, edits, settings(method, tokenizer), progress=False)
    assert sorted(pack.tensors) == sorted(reference.tensors)
    for name, tensor in reference.tensors.items():
        torch.testing.assert_close(pack.tensors[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
        assert pack.tensors[name].device.type == "cpu"
    assert pack.base_model["fingerprint"] == reference.base_model["fingerprint"]
    named = {"base_model_name_or_path"}  # the saved copy has a path, the model built from a config none
    assert ({k: v for k, v in pack.kind_config.items() if k not in named}
            == {k: v for k, v in reference.kind_config.items() if k not in named})
    # the method left the dispatch as it was: weights still offloaded, no hook added or lost
    assert model.get_submodule("model.layers.1.mlp.down_proj").weight.device.type == "meta"
    assert {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# One method per kind: weight_delta, basis_intervention, steering_map, singular_scale, codebook.
@pytest.mark.parametrize("method", ["rome", "baft", "sake", "svf", "grace"])
@pytest.mark.parametrize("way", WAYS)
def test_every_kind_attaches_generates_and_comes_off_exactly_on_a_dispatched_model(tokenizer, method, way,
                                                                                  tmp_path, one_thread):
    plain = tiny(tokenizer)
    pack = make_pack(method, plain, tokenizer, EDITS, QUICK[method], progress=False)
    model = dispatched(tokenizer, way, tmp_path)
    rows = [tokenizer(EDITS[0].text).input_ids, tokenizer(EDITS[1].text).input_ids]
    ids = torch.tensor([r[:min(map(len, rows))] for r in rows])
    base = logits(model, ids)
    assert torch.equal(base, logits(plain, ids))
    load_edits(plain, pack, name="p", tokenizer=tokenizer)
    load_edits(model, pack, name="p", tokenizer=tokenizer)
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(model, ids), base)  # the pack acts
    prompt = torch.tensor([tokenizer(EDITS[0].text).input_ids])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(generated, plain.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                                 do_sample=False, pad_token_id=tokenizer.eos_token_id))
    remove_edits(model, "p")
    assert torch.equal(logits(model, ids), base)


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact.json"


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_kedit_edit_takes_a_device_map_and_an_offload_folder(tokenizer, tmp_path, one_thread):
    from hf_kedit.cli import main as kedit
    from hf_kedit.pack import EditPack

    tiny(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["edit", "--method", "lora", "--model", str(tmp_path / "model"), "--data", f"counterfact:{DATA}",
              "--limit", "1", "--set", "steps=3"]
    assert kedit(common + ["--out", str(tmp_path / "plain")]) == 0
    assert kedit(common + ["--device-map", json.dumps(DEVICE_MAP), "--offload-folder", str(tmp_path / "offload"),
                           "--out", str(tmp_path / "dispatched")]) == 0
    plain, dispatched = EditPack.from_pretrained(tmp_path / "plain"), EditPack.from_pretrained(tmp_path / "dispatched")
    assert sorted(plain.tensors) == sorted(dispatched.tensors)
    assert all(torch.equal(plain.tensors[k], dispatched.tensors[k]) for k in plain.tensors)


def test_load_model_takes_a_device_map_and_an_offload_folder(tokenizer, tmp_path):
    from hf_kedit.models import load_model

    tiny(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model, _ = load_model(str(tmp_path / "model"), device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"))
    assert model.get_submodule("model.layers.1.mlp.down_proj").weight.device.type == "meta"
    assert model.get_submodule("model.layers.0.mlp.down_proj").weight.device.type == "cpu"
    ids = torch.tensor([tokenizer(EDITS[0].text).input_ids])
    assert torch.equal(logits(model, ids), logits(tiny(tokenizer), ids))


def test_a_device_map_that_is_not_json_is_refused(capsys):
    from hf_kedit.cli import main as kedit

    with pytest.raises(SystemExit):
        kedit(["edit", "--method", "lora", "--data", "counterfact:x.json", "--out", "x", "--device-map", "{oops"])
    err = capsys.readouterr().err
    assert "--device-map" in err and "not valid JSON" in err
