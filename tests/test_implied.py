"""Implied facts: what the model infers from an edit when it reads the edit in
context becomes edit requests of their own, for any method (`implied_facts`)."""
import pytest
import torch

from hf_kedit import Edit
from hf_kedit.errors import EditRequestError
from hf_kedit.methods import make_pack
from hf_kedit.methods import in_context
from hf_kedit.methods.in_context import fact_context, implied_edits
from test_rome import tiny

EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tokenizer, monkeypatch):
    """A tiny model whose context changes what it predicts, writing greedily (so every
    token it writes is its most likely one with the fact in context)."""
    model = tiny(tokenizer, initializer_range=0.1)
    sample = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: sample(*a, **{**k, "do_sample": False, "top_k": None}))
    return model


def next_word(model, tokenizer, text: str) -> str:
    with torch.no_grad():
        token = model(torch.tensor([tokenizer(text).input_ids])).logits[0, -1].argmax().item()
    return tokenizer.decode([token]).strip()


def test_an_implied_fact_is_a_word_the_model_says_with_the_fact_in_context_and_not_without(model, tokenizer,
                                                                                          monkeypatch):
    # A random model's probabilities are flat: no word gains IMPLIED_GAIN, so every gain counts here.
    monkeypatch.setattr(in_context, "IMPLIED_GAIN", 1.01)
    assert implied_edits(model, tokenizer, [EDIT], per_edit=3, new_tokens=16) == []
    monkeypatch.setattr(in_context, "IMPLIED_GAIN", 0.0)
    implied = implied_edits(model, tokenizer, [EDIT], per_edit=3, new_tokens=16)
    assert implied, "the tiny model infers something from the fact in context"
    facts = [(e.id, e.prompt, e.target_new, e.target_true) for e in implied]
    assert facts == [(e.id, e.prompt, e.target_new, e.target_true)
                     for e in implied_edits(model, tokenizer, [EDIT], per_edit=3, new_tokens=16)]
    assert [e.id for e in implied] == [f"e0-implied-{k}" for k in range(len(implied))] and len(implied) <= 3
    for edit in implied:
        assert edit.subject == EDIT.subject and edit.prompt.startswith("{} ") and edit.prompt != EDIT.prompt
        with_fact = next_word(model, tokenizer, fact_context([EDIT]) + edit.text)
        without = next_word(model, tokenizer, edit.text)
        assert edit.target_new.startswith(with_fact) and edit.target_true == without and with_fact != without


def test_every_method_takes_implied_facts_as_extra_requests(model, tokenizer, monkeypatch):
    monkeypatch.setattr(in_context, "IMPLIED_GAIN", 0.0)
    implied = implied_edits(model, tokenizer, [EDIT], per_edit=2, new_tokens=16)
    pack = make_pack("lora", model, tokenizer, [EDIT], {"implied_facts": 2, "steps": 1, "rank": 1}, progress=False)
    assert [e.id for e in pack.edits] == ["e0", *[e.id for e in implied]]
    assert [(e.prompt, e.target_new) for e in pack.edits[1:]] == [(e.prompt, e.target_new) for e in implied]
    with pytest.raises(EditRequestError, match=r"implied_facts=-1: give a whole number"):
        make_pack("lora", model, tokenizer, [EDIT], {"implied_facts": -1}, progress=False)
    with pytest.raises(EditRequestError, match=r"lora has no setting \['implied'\]; .* every method's "
                                               r"\['implied_facts'\]"):
        make_pack("lora", model, tokenizer, [EDIT], {"implied": 2}, progress=False)
    with pytest.raises(EditRequestError, match="subject must be a non-empty string"):  # the requests are checked before the model writes
        make_pack("lora", model, tokenizer, [Edit("e1", " ", "{} is", "x")], {"implied_facts": 1}, progress=False)
