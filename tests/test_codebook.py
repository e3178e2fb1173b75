"""codebook packs and the grace method on tiny models: an entry fires within its
radius and nowhere else, the nearest entry wins, cached generation reads what
teacher-forced scoring reads, colliding keys are split as GRACE splits them,
stacking, exact removal of a pack and of one entry, disk round trips, broken
packs and bad requests."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_kedit import Edit, load_edits, remove_edits, stack_of
from hf_kedit.anatomy import anatomy_of
from hf_kedit.errors import EditRequestError, IncompatiblePackError, KeditError, PackFormatError
from hf_kedit.kinds.codebook import KeyIndex
from hf_kedit.kinds.prompt_calls import prompt_lengths
from hf_kedit.methods import make_pack
from hf_kedit.methods.memory.grace import projection_at, split_collisions
from packs import kind_config_update, random_codebook_pack, rewrite_pack, set_tensor
from test_bad_input import raises_exactly, untouched
from tiny_models import CONFIGS, tiny_inputs, tiny_model

ARCHS = ["gpt2", "llama", "opt", "qwen2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class WordTokenizer:
    """Words to ids by a fixed table (no download): enough for grace's teacher forcing."""

    def __init__(self, vocab=128):
        self.vocab, self.table = vocab, {}

    def _ids(self, text):
        return [3 + (sum(map(ord, w)) * 7 + len(w)) % (self.vocab - 3) for w in text.split()]

    def __call__(self, text, add_special_tokens=True):
        return type("Encoded", (), {"input_ids": ([1] if add_special_tokens else []) + self._ids(text)})()


def test_an_entry_fires_within_its_radius_only():
    keys = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    radii = torch.tensor([1.0, 0.5])
    queries = torch.tensor([[0.9, 0.0], [1.1, 0.0], [3.6, 0.0], [3.4, 0.0], [2.1, 0.0]])
    # 0.9 from key 0 (inside 1.0); 1.1 (outside); 0.4 from key 1 (inside 0.5); 0.6 (outside); nearest is key 1, 1.9 away
    assert KeyIndex(keys, radii).nearest(queries).tolist() == [0, -1, 1, -1, -1]
    assert KeyIndex(keys, torch.tensor([-1.0, -1.0])).nearest(queries).tolist() == [-1] * 5
    assert KeyIndex(keys[:0], radii[:0]).nearest(queries).tolist() == [-1] * 5


def brute_force_nearest(queries, keys, radii):
    distance = torch.cdist(queries.double(), keys.double())
    best = distance.argmin(1)
    return torch.where(distance.gather(1, best[:, None])[:, 0] <= radii[best].double(), best, -1)


@pytest.mark.parametrize("spread", ["isotropic", "low rank", "clustered"])
def test_the_bounded_search_finds_what_a_full_search_finds(spread):
    g = torch.Generator().manual_seed(1)
    n, d = 3000, 96
    if spread == "isotropic":
        keys = torch.randn(n, d, generator=g) * 3
    elif spread == "low rank":  # keys inside the basis: the bound is exact
        keys = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g)
    else:  # a few tight clusters far from the origin, as real keys of similar prompts are
        keys = 20 * torch.randn(5, d, generator=g)[torch.randint(5, (n,), generator=g)] + torch.randn(n, d, generator=g)
    radii = torch.rand(n, generator=g) * 2 + 0.5
    radii[::7] = -1.0  # entries that never fire
    # queries at every distance from the keys: on a key, within and just past radii, and far away
    near = torch.randint(n, (400,), generator=g)
    direction = torch.nn.functional.normalize(torch.randn(400, d, generator=g), dim=1)
    steps = torch.rand(400, generator=g) * 4
    queries = torch.cat([keys[near] + direction * steps[:, None], torch.randn(100, d, generator=g) * 30])
    found = KeyIndex(keys, radii).nearest(queries)
    expected = brute_force_nearest(queries, keys, radii)
    assert (found >= 0).sum() > 50 and (found == -1).sum() > 50, "the queries did not test both sides of the radii"
    assert torch.equal(found, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_entry_replaces_its_prompt_and_leaves_others_bit_identical(arch):
    model = tiny_model(arch)
    ids = tiny_inputs(batch=3, length=6)
    before = logits(model, ids)
    pack = random_codebook_pack(model, ids[:1], layer=1, radius=1e-3)
    load_edits(model, pack, name="cb")
    after = logits(model, ids)
    assert not torch.allclose(after[0, -1], before[0, -1], atol=1e-4), "the entry's own prompt was not edited"
    assert torch.equal(after[0, :-1], before[0, :-1]), "positions before the last prompt token changed"
    assert torch.equal(after[1:], before[1:]), "prompts outside the entry's radius changed"
    remove_edits(model, "cb")
    assert torch.equal(logits(model, ids), before) and no_hooks(model)


def test_the_value_is_what_the_projection_returns():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=1, length=5)
    pack = random_codebook_pack(model, ids, layer=2, radius=1e-3)
    module = model.get_submodule(anatomy_of(model).mlp_out(2))
    load_edits(model, pack)
    _, out = projection_at(model, module, ids, 4)
    assert torch.equal(out, pack.tensors["e0.codebook.value"])


def test_the_nearest_of_two_overlapping_entries_wins():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=2, length=5)
    pack = random_codebook_pack(model, ids, layer=1, radius=1e6)  # each query within both radii
    module = model.get_submodule(anatomy_of(model).mlp_out(1))
    load_edits(model, pack)
    for row in range(2):
        _, out = projection_at(model, module, ids[row:row + 1], 4)
        assert torch.equal(out, pack.tensors[f"e{row}.codebook.value"])


def test_cached_generation_reads_what_teacher_forced_scoring_reads():
    model = tiny_model("llama")
    prompt = tiny_inputs(batch=1, length=5)
    load_edits(model, random_codebook_pack(model, prompt, layer=1, radius=1e-3))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with prompt_lengths(model, [5]):
            forced = model(generated).logits
        steps = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True).logits
    for i, step in enumerate(steps):
        assert torch.allclose(forced[0, 4 + i], step[0], atol=1e-4)
    assert torch.equal(generated[0, 5:], forced[0, 4:-1].argmax(-1))


def test_stacked_packs_and_removal_of_one_entry_are_exact():
    model = tiny_model("llama")
    ids = tiny_inputs(batch=3, length=6)
    before = logits(model, ids)
    first = random_codebook_pack(model, ids[:2], layer=1, radius=1e-3)
    second = random_codebook_pack(model, ids[2:], layer=2, radius=1e-3, prefix="f", seed=1, subject="R{}")
    load_edits(model, first, name="a")
    only_first = logits(model, ids)
    load_edits(model, second, name="b")
    both = logits(model, ids)
    assert torch.equal(both[:2], only_first[:2]) and not torch.equal(both[2], before[2])
    remove_edits(model, "a", edit_ids=["e0"])
    now = logits(model, ids)
    assert torch.equal(now[0], before[0]) and torch.equal(now[1:], both[1:])
    remove_edits(model, "b")
    remove_edits(model, "a")
    assert torch.equal(logits(model, ids), before) and no_hooks(model) and len(stack_of(model)) == 0


def test_a_saved_pack_loads_to_the_same_logits(tmp_path):
    model = tiny_model("llama")
    ids = tiny_inputs(batch=2, length=6)
    pack = random_codebook_pack(model, ids, layer=1, radius=1e-3)
    load_edits(model, pack, name="mem")
    edited = logits(model, ids)
    remove_edits(model, "mem")
    load_edits(model, str(pack.save_pretrained(tmp_path / "cb")), name="disk")
    assert torch.equal(logits(model, ids), edited)


def test_merge_is_refused_with_the_reason():
    model = tiny_model("llama")
    pack = random_codebook_pack(model, tiny_inputs(batch=1), layer=1)
    with untouched(model), raises_exactly(KeditError, "codebook pack.*keep it hooked"):
        load_edits(model, pack, merge=True)


@pytest.mark.parametrize("change, error, match", [
    (kind_config_update(layer=7), IncompatiblePackError, "layer 7; this model has 3 layers"),
    (kind_config_update(key_size=63), PackFormatError, "e0.*codebook.key has shape"),
    (kind_config_update(layer=-1), PackFormatError, "layer=-1"),
    (kind_config_update(value_size="32"), PackFormatError, "value_size must be a positive integer"),
])
def test_a_broken_manifest_is_refused_and_changes_nothing(tmp_path, change, error, match):
    model = tiny_model("llama")
    folder = random_codebook_pack(model, tiny_inputs(batch=1), layer=1).save_pretrained(tmp_path / "cb")
    rewrite_pack(folder, change_manifest=change)
    with untouched(model), raises_exactly(error, match):
        load_edits(model, str(folder))


def test_non_finite_tensors_and_a_model_of_another_width_are_refused(tmp_path):
    model = tiny_model("llama")
    folder = random_codebook_pack(model, tiny_inputs(batch=1), layer=1).save_pretrained(tmp_path / "cb")
    rewrite_pack(folder, change_tensors=set_tensor("e0.codebook.radius", lambda t: t * float("nan")))
    with untouched(model), raises_exactly(PackFormatError, "e0.codebook.radius.* holds NaN or inf"):
        load_edits(model, str(folder))
    pack = random_codebook_pack(tiny_model("llama"), tiny_inputs(batch=1), layer=1)
    wider = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **{**CONFIGS["llama"],
                                                                           "intermediate_size": 48})).eval()
    with untouched(wider), raises_exactly(IncompatiblePackError, "keys of width 64.*is 48 -> 32"):
        load_edits(wider, pack, verify="off")


def edits(targets):
    return [Edit(f"e{i}", f"Person{i}", "The mother tongue of {} is", t, "French") for i, t in enumerate(targets)]


def test_colliding_keys_are_split_as_grace_splits_them():
    keys = [torch.tensor([0.0, 0.0]), torch.tensor([1.2, 0.0]), torch.tensor([10.0, 0.0])]
    entries = {f"e{i}": (k, torch.zeros(2), 1.0) for i, k in enumerate(keys)}
    split = split_collisions(edits(["English", "German", "Dutch"]), entries)
    assert split["e0"][2] == pytest.approx(0.6 - 1e-5) and split["e1"][2] == pytest.approx(0.6)
    assert split["e2"][2] == 1.0  # too far to collide
    same = split_collisions(edits(["English", "English", "Dutch"]), entries)
    assert [same[f"e{i}"][2] for i in range(3)] == [1.0, 1.0, 1.0]  # one target: both keep their reach


def test_grace_makes_its_prompt_say_the_target_and_leaves_other_prompts_alone():
    model, tokenizer = tiny_model("llama"), WordTokenizer()
    requests = edits(["English", "German"])
    pack = make_pack("grace", model, tokenizer, requests, {"layer": 1, "radius": 1e-3}, progress=False)
    assert pack.kind == "codebook" and [e.id for e in pack.edits] == ["e0", "e1"]
    other = torch.tensor([tokenizer("A quite different prompt about rivers").input_ids])
    before = logits(model, other)
    load_edits(model, pack)
    for edit in requests:
        ids = torch.tensor([tokenizer(edit.text).input_ids])
        target = tokenizer(" " + edit.target_new, add_special_tokens=False).input_ids[0]
        assert logits(model, ids)[0, -1].argmax().item() == target
    assert torch.equal(logits(model, other), before)


def test_grace_settings_are_checked():
    model, tokenizer = tiny_model("llama"), WordTokenizer()
    for settings, match in [({"radius": 0}, "radius=0"), ({"init": "hot"}, "init='hot'"), ({"steps": 0}, "steps=0")]:
        with untouched(model), raises_exactly(EditRequestError, match):
            make_pack("grace", model, tokenizer, edits(["English"]), settings, progress=False)


def test_grace_on_the_default_model_end_to_end(default_model, tmp_path):
    from hf_kedit.demo import NEIGHBOUR, greedy_answer

    model, tokenizer = default_model
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert greedy_answer(model, tokenizer, edit.text).startswith("French")
    neighbour = greedy_answer(model, tokenizer, NEIGHBOUR)
    ids = tokenizer(edit.text, return_tensors="pt").input_ids
    base = logits(model, ids)
    folder = make_pack("grace", model, tokenizer, [edit], progress=False).save_pretrained(tmp_path / "grace")
    assert torch.equal(logits(model, ids), base)  # the method left the model as it was
    load_edits(model, str(folder), name="g")
    try:
        assert greedy_answer(model, tokenizer, edit.text).startswith("English")
        assert greedy_answer(model, tokenizer, NEIGHBOUR) == neighbour
    finally:
        remove_edits(model, "g")
    assert torch.equal(logits(model, ids), base) and no_hooks(model)
