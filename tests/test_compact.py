"""Compacting a pack's changes for serving: the truncated SVD of each weight's
summed change, at a rank or a kept share; at full rank the exports give the
pack's outputs."""
import json

import pytest
import torch

from hf_kedit import load_edits
from hf_kedit.cli import main as kedit
from hf_kedit.errors import KeditError
from hf_kedit.kinds.weight_delta import compacted, factors_by_module
from packs import random_pack
from test_weight_delta import logits
from tiny_models import tiny_model


def delta(A, B):
    return B.double() @ A.double()


def test_full_rank_reproduces_every_change_and_never_exceeds_its_rank():
    pack = random_pack(tiny_model("llama"), layers=(0, 1), n_edits=5, rank=2)
    factors = factors_by_module(pack)
    for module, (A, B) in compacted(factors, rank=1000).items():
        assert A.shape[0] == 10  # ΔW's own rank: 5 edits of rank 2
        torch.testing.assert_close(delta(A, B), delta(*factors[module]), atol=1e-6, rtol=1e-5)  # float32 factors


def test_a_rank_gives_the_best_approximation_of_that_rank():
    pack = random_pack(tiny_model("llama"), layers=(1,), n_edits=6, rank=1)
    [(module, (A, B))] = factors_by_module(pack).items()
    [(A3, B3)] = compacted({module: (A, B)}, rank=3).values()
    S = torch.linalg.svdvals(delta(A, B))
    error = torch.linalg.matrix_norm(delta(A, B) - delta(A3, B3))
    assert A3.shape[0] == 3 and torch.isclose(error, S[3:].square().sum().sqrt(), rtol=1e-5)  # Eckart-Young


def test_a_share_keeps_the_fewest_directions_that_hold_it():
    pack = random_pack(tiny_model("llama"), layers=(1,), n_edits=8, rank=1)
    [(module, (A, B))] = factors_by_module(pack).items()
    S2 = torch.linalg.svdvals(delta(A, B)).square()
    for share in (0.5, 0.9, 0.99, 1.0):
        [(Ak, _)] = compacted({module: (A, B)}, share=share).values()
        k = Ak.shape[0]
        assert S2[:k].sum() / S2.sum() >= share - 1e-9
        assert k == 1 or S2[:k - 1].sum() / S2.sum() < share


@pytest.mark.parametrize("settings, match", [
    ({}, "give one of them"), ({"rank": 2, "share": 0.9}, "give one of them"), ({"rank": 0}, "positive integer"),
    ({"rank": 1.5}, "positive integer"), ({"share": 0.0}, r"in \(0, 1\]"), ({"share": 1.5}, r"in \(0, 1\]"),
])
def test_bad_compaction_settings_are_refused(settings, match):
    with pytest.raises(KeditError, match=match):
        compacted(factors_by_module(random_pack(tiny_model("llama"))), **settings)


def test_a_compacted_peft_export_at_full_rank_gives_the_packs_outputs(tmp_path):
    from peft import PeftModel

    model = tiny_model("llama")
    pack = random_pack(model, layers=(0, 2), n_edits=4, rank=1)
    pack.export_peft(tmp_path / "lora", share=1.0)
    load_edits(model, pack, name="p")
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=1e-5)


def test_cli_compacts_both_exports(tmp_path):
    random_pack(tiny_model("llama"), layers=(1,), n_edits=6, rank=1).save_pretrained(tmp_path / "pack")
    assert kedit(["export-peft", str(tmp_path / "pack"), str(tmp_path / "lora"), "--rank", "2"]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 2
    assert kedit(["export-gguf", str(tmp_path / "pack"), str(tmp_path / "e.gguf"), "--rank", "2"]) == 0
    from test_gguf_export import read
    fields, tensors = read(tmp_path / "e.gguf")
    assert fields["adapter.lora.alpha"] == 2.0 and tensors["blk.1.ffn_down.weight.lora_a"].shape[0] == 2
