"""STEAM's anchors and alignment on a tiny random model with the default model's tokenizer."""
import pytest
import torch
import torch.nn.functional as F

from hf_kedit import Edit
from hf_kedit.anatomy import anatomy_of, hidden_states
from hf_kedit.methods.locate.steam import STEAMConfig, model_facts, read_fact_base, semantic_anchors, steam_edit
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


def writing(model, tokenizer, text: str, monkeypatch) -> None:
    """Makes the model write `text` after any prompt, in every sampled row."""
    more = tokenizer(text, add_special_tokens=False).input_ids

    def generate(ids, **kwargs):
        return torch.cat([ids, torch.tensor([more] * ids.shape[0], device=ids.device)], 1)
    monkeypatch.setattr(model, "generate", generate)


def test_with_no_fact_base_the_anchors_are_the_models_own_facts_that_it_recalls(model, tokenizer, monkeypatch):
    facts = known_facts(model, tokenizer)
    target = facts[0]["object"]
    # What the model "writes" about the target: each prompt followed by the target, known or not.
    writing(model, tokenizer, " " + " ".join(f"{prompt} {target}." for prompt in PROMPTS) + " Jean Gabin and",
            monkeypatch)
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", target)
    about, other = model_facts(model, tokenizer, [edit], texts=3)
    assert [f["prompt"] for f in about] == [p for p in PROMPTS if target.lower() not in p.lower()]
    assert all(f["object"] == target for f in about)
    # sibling_names reads a name up to its first "is", "and", comma or stop, at most three words
    assert [f["prompt"] for f in other] == ["The mother tongue of The capital of is"]
    block = model.get_submodule(anatomy_of(model).layer(2))
    first = tokenizer(" " + target, add_special_tokens=False).input_ids[0]
    recalled = []
    for fact in about:
        seen = []
        h = block.register_forward_hook(lambda m, a, o: seen.append(hidden_states(o)))
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer(fact["prompt"]).input_ids])).logits[0, -1]
        h.remove()
        if first in logits.topk(5).indices.tolist():
            recalled.append(seen[0][0, -1])
    assert 0 < len(recalled) < len(about), "the model recalls its target after some of its own text, not all"
    anchors = semantic_anchors(model, tokenizer, [block], about, target, count=len(about))
    torch.testing.assert_close(anchors, torch.stack(recalled).mean(0)[None], atol=1e-5, rtol=1e-5)

    base = dict(layer=0, covariance=False, steps=3, context_templates=((1, 2),), mid_layers=(2,), model_fact_texts=3)
    unset = steam_edit(model, tokenizer, [edit], STEAMConfig(**base), progress=False)
    given = steam_edit(model, tokenizer, [edit], STEAMConfig(**base, fact_base=about), progress=False)
    plain = steam_edit(model, tokenizer, [edit], STEAMConfig(**base, alignment_weight=0.0), progress=False)
    assert unset.hyperparameters["fact_base"] == "model"
    assert any(not torch.equal(t, plain.tensors[n]) for n, t in unset.tensors.items()), "the anchors are used"
    assert any(not torch.equal(t, given.tensors[n]) for n, t in unset.tensors.items()), \
        "centred on the facts of other objects, not on the target's"
    with pytest.warns(UserWarning, match="uses ROME's loss only"):  # a target the model never writes
        steam_edit(model, tokenizer, [Edit("e1", "Worf", "{} speaks", "Klingon")], STEAMConfig(**base),
                   progress=False)


def test_lead_ups_are_sentence_starts_before_the_target_that_do_not_name_it(tokenizer, monkeypatch):
    from hf_kedit.sampling import lead_ups

    model = tiny(tokenizer)
    writing(model, tokenizer, " London is big. The capital of England is London; The Tower of London.\n"
            "2. In London. Big Ben, London, and The City of London", monkeypatch)
    # a sentence counts up to the target's first mention in it; the same start twice is one
    assert lead_ups(model, tokenizer, "London", 2) == ["The capital of England is", "The Tower of", "Big Ben,"]


def test_a_fact_base_comes_from_a_benchmark_file_a_hub_dataset_repo_or_a_json_file(hub_server, tmp_path):
    import json
    from pathlib import Path

    from huggingface_hub import HfApi

    from hf_kedit.evaluate import benchmark_facts, read_cases

    data = Path(__file__).parents[1].parent / "shared" / "data"
    cases = read_cases("mquake", data / "mquake_hard.json", limit=3)
    facts = benchmark_facts("mquake", data / "mquake_hard.json", limit=3)
    truths = list(dict.fromkeys((e.subject, e.text, e.target_true) for c in cases for e in c.edits if e.target_true))
    assert [(f["subject"], f["prompt"], f["object"]) for f in facts] == truths and len(truths) > 3
    assert read_fact_base(facts) == facts

    (tmp_path / "facts.json").write_text(json.dumps(facts))
    assert read_fact_base(str(tmp_path / "facts.json")) == facts
    api = HfApi()
    api.create_repo("me/facts", repo_type="dataset", exist_ok=True)
    api.upload_file(path_or_fileobj=str(tmp_path / "facts.json"), path_in_repo="facts.json", repo_id="me/facts",
                    repo_type="dataset")
    assert read_fact_base("me/facts") == facts
    with pytest.raises(FileNotFoundError, match="no such fact base file: facts.json"):
        read_fact_base("facts.json")  # a file's name is never taken for a repo id


def test_bad_configuration_is_a_clear_error(model, tokenizer):
    edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    with pytest.raises(ValueError, match="no layer after the edit layer 2"):
        steam_edit(model, tokenizer, [edit], STEAMConfig(layer=2, fact_base=[], mid_layers=(0, 1)), progress=False)
    with pytest.raises(ValueError, match="entry 0 needs non-empty strings"):
        read_fact_base([{"subject": "x", "prompt": "", "object": "y"}])
