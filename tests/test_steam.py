"""STEAM's anchors and alignment on a tiny random model with the default model's tokenizer."""
import pytest
import torch
import torch.nn.functional as F

from hf_kedit import Edit
from hf_kedit.anatomy import anatomy_of, hidden_states
from hf_kedit.methods.locate.steam import STEAMConfig, read_fact_base, semantic_anchors, steam_edit
from test_rome import tiny

PROMPTS = ["The capital of Italy is", "My favourite colour is", "The river flows into the", "He was born in",
           "The first word is", "Her brother plays the", "They all speak", "The answer is"]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny(tokenizer)


def known_facts(model, tokenizer):
    """Facts the tiny model "knows": each prompt with its own argmax next token as the object."""
    facts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        word = tokenizer.decode([token]).strip()
        if word and tokenizer(" " + word, add_special_tokens=False).input_ids == [token]:
            facts.append({"subject": prompt.split()[1], "prompt": prompt, "object": word})
    assert len(facts) >= 2, "the tiny model should know a couple of one-token facts"
    return facts


def test_anchors_average_the_known_facts_only(model, tokenizer):
    facts = known_facts(model, tokenizer)
    target = facts[0]["object"]
    same = [f for f in facts if f["object"] == target]
    unknown = {"subject": "Zork", "prompt": "Zork is a", "object": target}  # the model does not say it here
    blocks = [model.get_submodule(anatomy_of(model).layer(2))]
    anchors = semantic_anchors(model, tokenizer, blocks, same + [unknown], target, count=10)
    expected = []
    for fact in same:
        seen = []
        h = blocks[0].register_forward_hook(lambda m, a, o: seen.append(hidden_states(o)))
        model(torch.tensor([tokenizer(fact["prompt"]).input_ids]))
        h.remove()
        expected.append(seen[0][0, -1])
    torch.testing.assert_close(anchors, torch.stack(expected).mean(0)[None], atol=1e-5, rtol=1e-5)
    assert semantic_anchors(model, tokenizer, blocks, [unknown], target, count=10) is None


def test_alignment_pulls_the_edited_states_towards_the_anchors(model, tokenizer):
    facts = known_facts(model, tokenizer)
    target = facts[0]["object"]
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", target, "French")
    base = dict(layer=0, covariance=False, steps=8, context_templates=((2, 3),), fact_base=facts, mid_layers=(2,))
    block = model.get_submodule(anatomy_of(model).layer(2))
    anchors = semantic_anchors(model, tokenizer, [block], facts, target, count=16)[0]

    def cosine_after(pack):
        from hf_kedit import load_edits, remove_edits

        load_edits(model, pack, name="p")
        seen = []
        h = block.register_forward_hook(lambda m, a, o: seen.append(hidden_states(o)))
        model(torch.tensor([tokenizer(edit.text).input_ids]))
        h.remove()
        remove_edits(model, "p")
        return F.cosine_similarity(seen[0][0, -1], anchors, dim=0).item()

    plain = cosine_after(steam_edit(model, tokenizer, [edit], STEAMConfig(**base, alignment_weight=0.0),
                                    progress=False))
    aligned = cosine_after(steam_edit(model, tokenizer, [edit], STEAMConfig(**base, alignment_weight=50.0),
                                      progress=False))
    assert aligned > plain


def test_no_usable_fact_falls_back_or_fails_when_strict(model, tokenizer):
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "Klingon", "French")
    base = dict(layer=0, covariance=False, steps=2, context_templates=((1, 2),), mid_layers=(2,),
                fact_base=[{"subject": "Worf", "prompt": "Worf speaks", "object": "Klingon"}])
    with pytest.warns(UserWarning, match="uses ROME's loss only"):
        pack = steam_edit(model, tokenizer, [edit], STEAMConfig(**base), progress=False)
    assert pack.method == "steam" and len(pack.edits) == 1
    with pytest.raises(ValueError, match="strict=True"):
        steam_edit(model, tokenizer, [edit], STEAMConfig(**base, strict=True), progress=False)


def test_bad_configuration_is_a_clear_error(model, tokenizer):
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    with pytest.raises(ValueError, match="needs a fact base"):
        steam_edit(model, tokenizer, [edit], STEAMConfig(), progress=False)
    with pytest.raises(ValueError, match="no layer after the edit layer 2"):
        steam_edit(model, tokenizer, [edit], STEAMConfig(layer=2, fact_base=[], mid_layers=(0, 1)), progress=False)
    with pytest.raises(ValueError, match="entry 0 needs non-empty strings"):
        read_fact_base([{"subject": "x", "prompt": "", "object": "y"}])
