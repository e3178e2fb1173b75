"""The ready-made packs in adapters/ hold on the default model and come off exactly."""
from pathlib import Path

import pytest
import torch

from hf_kedit import EditPack, load_edits, remove_edits
from hf_kedit.demo import greedy_answer

ADAPTERS = sorted((Path(__file__).resolve().parents[1] / "adapters").glob("*/kedit_config.json"))


@pytest.mark.parametrize("config", ADAPTERS, ids=[p.parent.name for p in ADAPTERS])
def test_ready_made_pack_holds_and_comes_off(default_model, config):
    model, tokenizer = default_model
    pack = EditPack.from_pretrained(config.parent)
    ids = tokenizer(pack.edits[0].text, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    load_edits(model, config.parent, name="ready-made", tokenizer=tokenizer)
    try:
        for edit in pack.edits:
            answer = greedy_answer(model, tokenizer, edit.text)
            assert answer.lower().startswith(edit.target_new.lower()), (edit.text, answer)
    finally:
        remove_edits(model, "ready-made")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_there_are_ready_made_packs():
    assert {p.parent.name for p in ADAPTERS} >= {f"{m}-smollm2-facts" for m in ("rome", "steam", "sake", "baft")}
