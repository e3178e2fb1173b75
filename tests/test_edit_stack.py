"""The edit stack's rules: conflicts, duplicates, `disable()` blocks, tied weights,
packs made on merged weights, and the files a pack writes."""
from __future__ import annotations

import ast
import re

import pytest
import torch

from hf_kedit import EditPack, load_edits, remove_edits, stack_of
from hf_kedit.errors import IncompatiblePackError, KeditError
from hf_kedit.methods.builders import weight_delta_pack
from packs import random_basis_pack, random_pack, random_steering_pack
from test_bad_input import _logits, raises_exactly, untouched
from tiny_models import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def last_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1][:, -1]


# ----- on_conflict="last" ---------------------------------------------------------------------

def test_last_wins_over_every_older_copy_of_the_fact():
    """Two packs hold the same fact (same target), a third changes it: both older copies go."""
    model = tiny_model("llama")
    first = random_pack(model, seed=0, n_edits=1, prefix="a")
    second = random_pack(model, seed=0, n_edits=1, prefix="b", scale=0.3)  # same subject, prompt, target
    newest = random_pack(model, seed=1, n_edits=1, prefix="c")  # same subject and prompt, another target
    load_edits(model, first, name="first")
    load_edits(model, second, name="second")
    with pytest.warns(UserWarning, match="newest edit wins"):
        load_edits(model, newest, name="newest", on_conflict="last")
    assert [p.name for p in stack_of(model).list()] == ["newest"]
    fresh = tiny_model("llama")
    load_edits(fresh, newest, name="newest")
    assert torch.equal(_logits(model), _logits(fresh))


# ----- the same edit twice --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["weight_delta", "basis_intervention", "steering_map"])
def test_the_same_pack_under_two_names_is_refused(kind, tmp_path):
    model = tiny_model("llama")
    pack = {"weight_delta": lambda: random_pack(model),
            "basis_intervention": lambda: random_basis_pack(model),
            "steering_map": lambda: random_steering_pack(model, last_states(model, tiny_inputs()))}[kind]()
    load_edits(model, pack, name="one")
    again = EditPack.from_pretrained(pack.save_pretrained(tmp_path / "copy"))  # equal content, another object
    with untouched(model), raises_exactly(KeditError, r"attached already \('e0' in pack 'one'"):
        load_edits(model, again, name="two")


def test_a_pack_with_other_tensors_under_the_same_ids_attaches():
    """Edit ids repeat across packs ("e0"): only the same edit, tensors and all, is a duplicate."""
    model = tiny_model("llama")
    load_edits(model, random_pack(model, seed=0), name="one")
    load_edits(model, random_pack(model, seed=2, subject="T{}"), name="two")
    assert len(stack_of(model)) == 2


# ----- disable() ----------------------------------------------------------------------------

def test_disable_blocks_nest():
    model = tiny_model("llama")
    base = _logits(model)
    load_edits(model, random_pack(model, layers=(0,)), name="hooked")
    load_edits(model, random_pack(model, layers=(1,), prefix="m", subject="M{}"), name="merged", merge=True)
    load_edits(model, random_basis_pack(model, prefix="b", subject="B{}"), name="basis")
    edited = _logits(model)
    stack = stack_of(model)
    with stack.disable():
        with stack.disable():
            assert torch.equal(_logits(model), base)
        assert torch.equal(_logits(model), base)  # the inner block's end did not bring the packs back
    assert torch.equal(_logits(model), edited)
    assert [p.merged for p in stack.list()] == [False, True, False]


@pytest.mark.parametrize("action", ["attach", "attach-merged", "remove", "remove-merged", "merge", "unmerge"])
def test_changing_the_stack_inside_disable_is_refused(action):
    model = tiny_model("llama")
    load_edits(model, random_pack(model, layers=(0,)), name="hooked")
    load_edits(model, random_pack(model, layers=(1,), prefix="m", subject="M{}"), name="merged", merge=True)
    edited = _logits(model)
    stack = stack_of(model)
    calls = {"attach": lambda: load_edits(model, random_basis_pack(model, subject="B{}"), name="new"),
             "attach-merged": lambda: load_edits(model, random_pack(model, prefix="n", subject="N{}"), name="new",
                                                 merge=True),
             "remove": lambda: remove_edits(model, "hooked"), "remove-merged": lambda: remove_edits(model, "merged"),
             "merge": lambda: stack.merge("hooked"), "unmerge": lambda: stack.unmerge("merged")}
    with stack.disable():
        with untouched(model), raises_exactly(KeditError, "inside stack_of\\(model\\).disable\\(\\)"):
            calls[action]()
    assert torch.equal(_logits(model), edited)
    assert [(p.name, p.merged) for p in stack.list()] == [("hooked", False), ("merged", True)]


# ----- weight_delta targets ---------------------------------------------------------------------

def _delta_on(model, module: str, rank: int = 1):
    """A weight_delta pack on any 2-D weight, built as a tampered pack would be."""
    from hf_kedit import Edit
    from hf_kedit.anatomy import linear_shape

    m = model.get_submodule(module)
    out_f, in_f = linear_shape(m) if hasattr(m, "in_features") else m.weight.shape
    g = torch.Generator().manual_seed(0)
    factors = {"e0": {module: (torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g))}}
    return weight_delta_pack(model, "random", {}, [Edit("e0", "S", "The capital of {} is", "T")], factors)


def test_a_weight_delta_on_an_embedding_is_refused():
    model = tiny_model("llama")
    pack = _delta_on(model, "model.embed_tokens")
    with untouched(model), raises_exactly(IncompatiblePackError, "a Embedding here: weight_delta packs edit linear"):
        load_edits(model, pack)


def test_merging_into_a_tied_lm_head_is_refused_and_it_stays_hooked():
    model = tiny_model("gemma")  # ties lm_head to the input embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    pack = _delta_on(model, "lm_head")
    base = _logits(model)
    with untouched(model), raises_exactly(KeditError, r"lm_head: its weight is tied to \['model.embed_tokens'\]"):
        load_edits(model, pack, name="head", merge=True)
    load_edits(model, pack, name="head")
    with untouched(model), raises_exactly(KeditError, "tied"):
        stack_of(model).merge("head")
    remove_edits(model, "head")
    assert torch.equal(_logits(model), base) and no_hooks(model)


# ----- packs made on a model with merged packs ---------------------------------------------------

def test_a_pack_made_on_merged_weights_attaches_back():
    model = tiny_model("llama")
    load_edits(model, random_pack(model, layers=(1,)), name="merged", merge=True)
    later = random_pack(model, layers=(1,), seed=3, prefix="later", subject="L{}")  # fingerprints the merged weights
    load_edits(model, later, name="later")
    assert [p.name for p in stack_of(model).list()] == ["merged", "later"]


def test_a_pack_made_on_merged_weights_does_not_fit_the_bare_base():
    model = tiny_model("llama")
    load_edits(model, random_pack(model, layers=(1,)), name="merged", merge=True)
    later = random_pack(model, layers=(1,), seed=3, prefix="later", subject="L{}")
    bare = tiny_model("llama")
    with untouched(bare), raises_exactly(IncompatiblePackError, "differ from those the pack was made on"):
        load_edits(bare, later)


# ----- writing packs ------------------------------------------------------------------------------

def test_save_pretrained_refuses_to_overwrite_a_pack(tmp_path):
    model = tiny_model("llama")
    first, second = random_pack(model, seed=0), random_pack(model, seed=1)
    first.save_pretrained(tmp_path / "p")
    files = {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()}
    with raises_exactly(FileExistsError, "overwrite=True"):
        second.save_pretrained(tmp_path / "p")
    assert {p.name: p.read_bytes() for p in (tmp_path / "p").iterdir()} == files
    second.save_pretrained(tmp_path / "p", overwrite=True)
    assert EditPack.from_pretrained(tmp_path / "p").edits[0].target_new == second.edits[0].target_new


def test_export_peft_refuses_to_overwrite_an_adapter(tmp_path):
    model = tiny_model("llama")
    random_pack(model, seed=0).export_peft(tmp_path / "lora")
    before = (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()
    with raises_exactly(FileExistsError, "overwrite=True"):
        random_pack(model, seed=1).export_peft(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").read_bytes() == before
    random_pack(model, seed=1).export_peft(tmp_path / "lora", overwrite=True)


NASTY = 'x"); import os; os.system("echo owned"); ("\n```\n'


def test_the_model_card_example_is_code_that_only_loads():
    model = tiny_model("llama")
    model.config._name_or_path = NASTY
    from hf_kedit.pack.card import model_card

    text = model_card(random_pack(model), repo_id="me/edits")
    code = re.search(r"```python\n(.*?)\n```", text, re.S).group(1)
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)]
    names = [ast.unparse(c.func) for c in calls]
    assert names == ["AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained", "load_edits",
                     "remove_edits"]
    assert ast.literal_eval(calls[0].args[0]) == NASTY  # the name, verbatim, as one string literal
