"""basis_intervention packs on tiny models: Φ's formula, positions, cached generation,
stacking, exact removal, disk and Hub round trips, broken packs."""
import json

import pytest
import torch

from hf_kedit import Edit, EditPack, load_edits, remove_edits, stack_of
from hf_kedit.anatomy import anatomy_of, hidden_states
from hf_kedit.errors import IncompatiblePackError, KeditError, PackFormatError
from hf_kedit.kinds.basis_intervention import BasisInterventionConfig, intervention_delta, parse_positions
from hf_kedit.kinds.prompt_calls import prompt_lengths, select_positions
from hf_kedit.pack import CONFIG_NAME
from packs import kind_config_update, random_basis_pack, rewrite_pack, set_tensor
from test_bad_input import raises_exactly, untouched
from tiny_models import tiny_inputs, tiny_model

ARCHS = ["gpt2", "llama", "opt", "gpt_neox", "gemma"]


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(tiny_inputs() if ids is None else ids, **kwargs).logits


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def by_hand(arch, *packs, prompt=None):
    """A fresh model with plain hooks applying every pack's Φ, written out from the formula:
    at the first n and last m of the first `prompt` tokens (all, if None), each update
    computed from the layer's own output and summed."""
    model = tiny_model(arch)
    layers = model.get_submodule(anatomy_of(model).layers)
    terms = {}
    for pack in packs:
        config = pack.kind_config
        first, last = parse_positions(config["positions"])
        for layer in config["layers"]:
            for e in pack.edits:
                t = {part: pack.tensors[f"{e.id}.layers.{layer}.{part}"] for part in
                     ("rotation", "source.weight", "source.bias", "gate.weight", "gate.bias")
                     if f"{e.id}.layers.{layer}.{part}" in pack.tensors}
                terms.setdefault(layer, []).append((first, last, config.get("gate_floor", 0.0), t))

    def hook(layer):
        def apply(module, args, out):
            h = hidden_states(out)
            length = h.shape[1] if prompt is None else prompt
            new = h.clone()
            for first, last, floor, t in terms[layer]:
                pos = sorted(set(range(min(first, length))) | set(range(max(length - last, 0), length)))
                x = h[:, pos]
                R, W, b = t["rotation"], t["source.weight"], t["source.bias"]
                x_hat = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
                w = torch.sigmoid(x_hat @ t["gate.weight"].T + t["gate.bias"]) if "gate.weight" in t else 1.0
                w = w * (w >= floor) if floor else w
                new[:, pos] += (w * (x @ W.T + b - x @ R.T)) @ R
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return apply
    for layer in terms:
        layers[layer].register_forward_hook(hook(layer))
    return model


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----- the formula and the positions -----------------------------------------------------

def test_phi_with_unit_gate_is_loreft_and_the_gate_weighs_each_basis():
    g = torch.Generator().manual_seed(0)
    d, r = 16, 3
    h = torch.randn(5, d, generator=g)
    R = torch.linalg.qr(torch.randn(d, r, generator=g)).Q.T
    W, b = torch.randn(r, d, generator=g), torch.randn(r, generator=g)
    # pyreft's LoreftIntervention: h + (W h + b − h R_dr) @ R_drᵀ, with R_dr = Rᵀ [d, r]
    R_dr = R.T
    close(h + intervention_delta(h, R, W, b), h + ((h @ W.T + b) - h @ R_dr) @ R_dr.T)
    G, c = torch.randn(r, d, generator=g), torch.randn(r, generator=g)
    gated = torch.tensor([True, False, True])
    h_hat = h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    w = torch.where(gated, torch.sigmoid(h_hat @ G.T + c), torch.ones(r))
    close(intervention_delta(h, R, W, b, (G, c, gated, torch.zeros(r))),
          sum(w[:, k:k + 1] * ((h @ W[k] + b[k] - h @ R[k])[:, None] * R[k]) for k in range(r)))
    # a floor zeroes the gated weights below it, and only those
    floor = torch.full((r,), 0.5)
    floored = torch.where(gated & (w < 0.5), torch.zeros_like(w), w)
    assert 0 < int((gated & (w < 0.5)).sum()) < int(gated.sum()) * len(h)  # some, not all, gates are cut
    close(intervention_delta(h, R, W, b, (G, c, gated, floor)),
          sum(floored[:, k:k + 1] * ((h @ W[k] + b[k] - h @ R[k])[:, None] * R[k]) for k in range(r)))


@pytest.mark.parametrize("spec, expected", [("f1+l1", (1, 1)), ("l3", (0, 3)), ("f2", (2, 0)), ("f0+l2", (0, 2))])
def test_positions_parse(spec, expected):
    assert parse_positions(spec) == expected


@pytest.mark.parametrize("spec", ["last", "f1+", "l1+f1", "f-1", "", "f0+l0", 3, "F1+L1"])
def test_positions_that_do_not_parse(spec):
    with raises_exactly(PackFormatError, r"positions=.*(does not parse|selects no token)"):
        parse_positions(spec)


def test_all_selects_every_prompt_token_and_nothing_after():
    real = torch.tensor([[0, 1, 1, 1, 1, 1]]).bool()
    assert select_positions(real, *parse_positions("all"), torch.tensor([3])).int().tolist() == [[0, 1, 1, 1, 0, 0]]


def test_selection_skips_padding_and_stops_at_the_prompt():
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]).bool()
    assert select_positions(real, 1, 2).int().tolist() == [[1, 0, 0, 0, 1, 1], [0, 0, 1, 0, 1, 1],
                                                           [1, 1, 1, 0, 0, 0]]
    assert select_positions(real, 0, 1, torch.tensor([4, 2, 2])).int().tolist() == [
        [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0]]


# ----- attaching, stacking, removing ------------------------------------------------------

@pytest.mark.parametrize("gated", [False, True], ids=["loreft", "baft"])
@pytest.mark.parametrize("arch", ARCHS)
def test_attach_applies_phi_and_removal_is_bit_exact(arch, gated):
    model = tiny_model(arch)
    base = logits(model)
    pack = random_basis_pack(model, layers=(0, 2), n_edits=2, positions="f1+l2", gated=gated)
    load_edits(model, pack, name="p")
    edited = logits(model)
    assert (edited - base).abs().max() > 1e-2
    close(edited, logits(by_hand(arch, pack)))
    remove_edits(model, "p")
    assert torch.equal(logits(model), base)
    assert no_hooks(model) and len(stack_of(model)) == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("first", ["a", "b"])
def test_two_stacked_packs_leave_no_trace_in_either_order(arch, first):
    model = tiny_model(arch)
    base = logits(model)
    a = random_basis_pack(model, layers=(0, 1), seed=1, prefix="a", positions="l1")
    b = random_basis_pack(model, layers=(1, 2), seed=2, prefix="b", positions="f1+l2", gated=True, subject="B{}",
                          gate_floor=0.5)  # one hook, rows with and without a floor
    load_edits(model, a, name="a")
    load_edits(model, b, name="b")
    assert sum(len(m._forward_hooks) for m in model.get_submodule(anatomy_of(model).layers)) == 3  # one per layer
    close(logits(model), logits(by_hand(arch, a, b)))
    remove_edits(model, first)
    close(logits(model), logits(by_hand(arch, b if first == "a" else a)))
    remove_edits(model, "b" if first == "a" else "a")
    assert torch.equal(logits(model), base) and no_hooks(model)


def test_packs_with_and_without_a_gate_floor_share_one_hook_each_with_its_own_floor():
    model = tiny_model("llama")
    floored = random_basis_pack(model, seed=1, prefix="a", gated=True, gate_floor=0.6)
    plain = random_basis_pack(model, seed=2, prefix="b", gated=True, subject="B{}")
    load_edits(model, floored, name="a")
    with_floor = logits(model)
    close(with_floor, logits(by_hand("llama", floored)))
    load_edits(model, plain, name="b")
    close(logits(model), logits(by_hand("llama", floored, plain)))
    floored.kind_config["gate_floor"] = 0.0  # the same tensors, every gate counted
    assert (logits(by_hand("llama", floored)) - with_floor).abs().max() > 1e-3


def test_many_packs_on_one_layer_share_one_hook_and_removing_an_edit_leaves_the_others():
    model = tiny_model("llama")
    base = logits(model)
    packs = [random_basis_pack(model, seed=s, prefix=f"p{s}x", subject=f"P{s}-{{}}", n_edits=2) for s in range(10)]
    for i, p in enumerate(packs):
        load_edits(model, p, name=f"p{i}")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2  # the layer's and the call's end
    close(logits(model), logits(by_hand("llama", *packs)))
    remove_edits(model, "p3", edit_ids=["p3x0"])
    close(logits(model), logits(by_hand("llama", *packs[:3], packs[3].select(["p3x1"]), *packs[4:])))
    for i in range(10):
        remove_edits(model, f"p{i}")
    assert torch.equal(logits(model), base) and no_hooks(model)


# ----- shared bases: one intervention that every edit of the pack owns -----------------------

def test_a_shared_pack_acts_once_whatever_its_number_of_edits(tmp_path):
    model = tiny_model("llama")
    base = logits(model)
    one = random_basis_pack(model, layers=(0, 2), n_edits=1, rank=6, gated=True, positions="f1+l2")
    shared = random_basis_pack(model, layers=(0, 2), n_edits=5, rank=6, gated=True, positions="f1+l2", shared=True)
    assert len(shared.tensors) == len(one.tensors) == 10  # stored once, not per edit
    assert all(set(e.tensors) == set(shared.tensors) for e in shared.edits)
    load_edits(model, shared, name="s")
    edited = logits(model)
    assert (edited - base).abs().max() > 1e-2
    close(edited, logits(by_hand("llama", one)))  # the intervention once, not five times
    shared.save_pretrained(tmp_path / "pack")
    assert torch.equal(logits(load_edits(tiny_model("llama"), str(tmp_path / "pack"))), edited)
    remove_edits(model, "s", edit_ids=[e.id for e in shared.edits])  # every edit of the group: the pack goes
    assert torch.equal(logits(model), base) and no_hooks(model) and len(stack_of(model)) == 0


def test_edits_that_share_an_intervention_come_off_together_or_not_at_all():
    model = tiny_model("llama")
    shared = random_basis_pack(model, n_edits=3, gated=True, shared=True)
    load_edits(model, shared, name="s")
    with untouched(model), raises_exactly(IncompatiblePackError, r"edits \['e1'\] share their tensors with "
                                                                 r"\['e0', 'e2'\] \(3 edits in all"):
        remove_edits(model, "s", edit_ids=["e1"])
    with raises_exactly(IncompatiblePackError, r"they come off together"):
        shared.select(["e0", "e1"])
    # a newer edit that supersedes one of the group attaches beside it: the group cannot be split
    newer = random_basis_pack(model, n_edits=1, gated=True, seed=5, prefix="n")
    newer = EditPack(newer.kind, newer.method, [Edit(**{**newer.edits[0].__dict__, "subject": "S1"})],
                     newer.tensors, newer.base_model, kind_config=newer.kind_config)
    with pytest.warns(UserWarning, match=r"earlier edits 'e1' \(pack 's'\) share their tensors with edits that "
                                         r"stay, so they stay attached"):
        load_edits(model, newer, name="n", on_conflict="last")
    assert [e.id for e in stack_of(model).packs["s"].pack.edits] == ["e0", "e1", "e2"]
    remove_edits(model, "n")
    with raises_exactly(IncompatiblePackError, r"both packs hold tensors named \['bases.layers.1.gate.bias'"):
        shared.extend(random_basis_pack(model, n_edits=2, gated=True, shared=True, prefix="x", seed=3))


def test_edits_may_share_tensors_only_all_of_them_alike():
    model = tiny_model("llama")
    pack = random_basis_pack(model, n_edits=2, gated=True)
    e0, e1 = pack.edits
    partly = [e0, Edit(**{**e1.__dict__, "tensors": [*e1.tensors, e0.tensors[0]]})]
    with raises_exactly(PackFormatError, r"edits 'e0' and 'e1' share tensor 'e0.layers.1.rotation' but not all "
                                         r"their tensors"):
        EditPack(pack.kind, pack.method, partly, pack.tensors, pack.base_model, kind_config=pack.kind_config)
    with raises_exactly(PackFormatError, r"edit 'e0' lists a tensor twice"):
        EditPack(pack.kind, pack.method, [Edit(**{**e0.__dict__, "tensors": [*e0.tensors, e0.tensors[0]]}), e1],
                 pack.tensors, pack.base_model, kind_config=pack.kind_config)
    with raises_exactly(PackFormatError, r"edit 'e0' must own exactly its .* \(named 'bases': shared_bases\)"):
        EditPack(pack.kind, pack.method, pack.edits, pack.tensors, pack.base_model,
                 kind_config={**pack.kind_config, "shared_bases": True})
    loreft = random_basis_pack(model, n_edits=1)
    with raises_exactly(PackFormatError, r"shared_bases must be true or false, and false without a gate"):
        EditPack(loreft.kind, loreft.method, loreft.edits, loreft.tensors, loreft.base_model,
                 kind_config={**loreft.kind_config, "shared_bases": True})


def test_disable_runs_the_base_model():
    model = tiny_model("llama")
    base = logits(model)
    load_edits(model, random_basis_pack(model, gated=True), name="p")
    with stack_of(model).disable():
        assert torch.equal(logits(model), base)
    assert not torch.equal(logits(model), base)


def test_merge_is_refused_and_leaves_no_trace():
    model = tiny_model("llama")
    with untouched(model), raises_exactly(KeditError, r"acts on hidden states .* keep it hooked \(merge=False\)"):
        load_edits(model, random_basis_pack(model), name="p", merge=True)


def test_right_padded_rows_read_as_alone():
    model = tiny_model("llama")
    load_edits(model, random_basis_pack(model, layers=(0, 1), positions="f1+l2", gated=True), name="p")
    ids = tiny_inputs(batch=2, length=7)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = logits(model, ids, attention_mask=mask)
    close(batch[0], logits(model, ids[:1])[0])
    close(batch[1, :4], logits(model, ids[1:, :4])[0])


def test_prompt_lengths_limit_the_positions_to_the_prompt():
    model = tiny_model("llama")
    pack = random_basis_pack(model, layers=(0, 2), positions="f1+l2", gated=True)
    load_edits(model, pack, name="p")
    ids = tiny_inputs(batch=1, length=9)
    with prompt_lengths(model, [5]):
        close(logits(model, ids), logits(by_hand("llama", pack, prompt=5), ids))
    close(logits(model, ids), logits(by_hand("llama", pack), ids))  # outside: the whole input is the prompt


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_cached_generation_equals_uncached_recomputation_with_the_prompt_marked(arch):
    """Cached generation intervenes on the prompt only; each step equals an uncached
    forward over prompt + generated tokens with the prompt's length given."""
    model = tiny_model(arch)
    pack = random_basis_pack(model, layers=(0, 1, 2), positions="f1+l2", gated=True, scale=2.0)
    ids = tiny_inputs(batch=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(ids, **kwargs)
    load_edits(model, pack, name="p")
    reference = by_hand(arch, pack, prompt=ids.shape[1])
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    assert not torch.equal(out, plain)  # the edit changes the continuation
    for k in range(ids.shape[1], out.shape[1]):
        with prompt_lengths(model, [ids.shape[1]]):
            step = logits(model, out[:, :k])[0, -1]
        close(step, logits(reference, out[:, :k])[0, -1])
        assert step.argmax().item() == out[0, k].item()
    remove_edits(model, "p")
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kwargs), plain)


def test_bf16_model_runs_the_pack_in_its_dtype():
    model = tiny_model("llama", torch.bfloat16)
    base = logits(model)
    load_edits(model, random_basis_pack(model), name="p")
    edited = logits(model)
    assert edited.dtype == torch.bfloat16 and not torch.equal(edited, base)
    remove_edits(model, "p")
    assert torch.equal(logits(model), base)


# ----- round trips ---------------------------------------------------------------------------

def test_disk_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model("gpt2")
    pack = random_basis_pack(model, layers=(0, 2), n_edits=2, positions="f1+l1", gated=True)
    pack.save_pretrained(tmp_path / "pack")
    manifest = json.loads((tmp_path / "pack" / CONFIG_NAME).read_text())
    assert manifest["kind"] == "basis_intervention"
    assert manifest["kind_config"] == {**BasisInterventionConfig(
        peft_type="BAFT", gate="sigmoid_rms", r=2, layers=[0, 2], positions="f1+l1", hidden_size=32).to_dict(),
        "base_model_name_or_path": None, "revision": None}
    assert not (tmp_path / "pack" / "adapter_config.json").exists()
    in_memory = logits(load_edits(tiny_model("gpt2"), pack))
    assert torch.equal(logits(load_edits(tiny_model("gpt2"), str(tmp_path / "pack"))), in_memory)


def test_hub_round_trip_gives_identical_outputs(hub_server):
    model = tiny_model("llama")
    pack = random_basis_pack(model, layers=(1,), n_edits=2, gated=True)
    sha = pack.push_to_hub("user/basis-pack")
    fresh = load_edits(tiny_model("llama"), "user/basis-pack")
    assert stack_of(fresh).packs["user/basis-pack"].pack.revision == sha
    assert torch.equal(logits(fresh), logits(load_edits(tiny_model("llama"), pack)))
    remove_edits(fresh, "user/basis-pack")
    assert torch.equal(logits(fresh), logits(tiny_model("llama")))


# ----- broken packs: a typed error, and the model as it was -------------------------------------

R0 = "e0.layers.1.rotation"


def _drop(name):
    def change(manifest):
        for e in manifest["edits"]:
            if name in e["tensors"]:
                e["tensors"].remove(name)
    return change


BROKEN = [  # (id, tensors change, manifest change, error, message)
    ("wrong-shape", set_tensor("e0.layers.1.source.weight", lambda t: t[:, :-1].contiguous()), None, PackFormatError,
     r"source.weight has shape \[2, 31\], expected \[2, 32\]"),
    ("nan", set_tensor("e0.layers.1.gate.bias", lambda t: t.clone().fill_(float("nan"))), None, PackFormatError,
     r"'e0.layers.1.gate.bias' holds NaN"),
    ("missing", lambda tensors: tensors.pop("e0.layers.1.gate.weight"), _drop("e0.layers.1.gate.weight"),
     PackFormatError, r"must own exactly .* missing \['e0.layers.1.gate.weight'\]"),
    ("not-orthonormal", set_tensor(R0, lambda t: t * 1.5), None, PackFormatError, r"rows of rotation are not orthonormal"),
    ("bad-positions", None, kind_config_update(positions="last2"), PackFormatError, r"positions='last2' does not parse"),
    ("rank-over-hidden", None, kind_config_update(r=64), PackFormatError, r"rank r=64 exceeds hidden_size=32"),
    ("gate-of-loreft", None, kind_config_update(peft_type="LOREFT"), PackFormatError,
     r"peft_type 'LOREFT' with gate 'sigmoid_rms'"),
    ("unknown-field", None, kind_config_update(alpha=2), PackFormatError, r"unknown: \['alpha'\]"),
    ("floor-one", None, kind_config_update(gate_floor=1.0), PackFormatError, r"gate_floor must be a number in \[0, 1\)"),
    ("floor-text", None, kind_config_update(gate_floor="0.5"), PackFormatError, r"gate_floor must be a number"),
    ("floor-of-loreft", None, kind_config_update(peft_type="LOREFT", gate="none", gate_floor=0.5), PackFormatError,
     r"and 0 without a gate; got 0.5 with gate 'none'"),
    ("layers-without-tensors", None, kind_config_update(layers=[7]), PackFormatError, r"must own exactly"),
    ("layers-nested", None, kind_config_update(layers=[[1]]), PackFormatError, r"layers must be distinct layer indices"),
    ("layers-text", None, kind_config_update(layers=["1"]), PackFormatError, r"layers must be distinct layer indices"),
    ("positions-2-to-70", None, kind_config_update(positions=f"l{2 ** 70}"), PackFormatError,
     r"a count of tokens above \d+ is no prompt's"),
    ("positions-newline", None, kind_config_update(positions="l1\n"), PackFormatError, r"does not parse"),
    ("r-is-a-list", None, kind_config_update(r=[2]), PackFormatError, r"r must be a positive integer"),
    ("revision-is-a-number", None, kind_config_update(revision=3), PackFormatError, r"revision must be a string"),
]


@pytest.mark.parametrize("change_tensors, change_manifest, exc, match", [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_a_broken_pack_fails_and_leaves_the_model_unchanged(tmp_path, change_tensors, change_manifest, exc, match):
    model = tiny_model("llama")
    load_edits(model, random_basis_pack(model, layers=(0,), seed=5, prefix="other", subject="O{}"), name="other")
    folder = random_basis_pack(model, layers=(1,), gated=True).save_pretrained(tmp_path / "pack")
    rewrite_pack(folder, change_tensors, change_manifest)
    with raises_exactly(exc, match):
        EditPack.from_pretrained(folder)
    with untouched(model), raises_exactly(exc, match):
        load_edits(model, str(folder))


def test_a_pack_for_a_deeper_model_is_incompatible(tmp_path):
    deep = tiny_model("llama")
    pack = random_basis_pack(deep, layers=(2,))
    pack.kind_config["layers"] = [5]  # as if made on a model with more layers
    pack.tensors = {n.replace(".layers.2.", ".layers.5."): t for n, t in pack.tensors.items()}
    for e in pack.edits:
        e.tensors = [n.replace(".layers.2.", ".layers.5.") for n in e.tensors]
    pack.validate()
    model = tiny_model("llama")
    with untouched(model), raises_exactly(IncompatiblePackError, r"intervenes on layers \[5\]; this model has 3"):
        load_edits(model, pack)
