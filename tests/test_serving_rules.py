"""Every weight_delta pack's PEFT export satisfies the rules that vLLM's and TGI's
LoRA loaders apply to an adapter folder (docs/serving.md lists them and where
they come from), and still gives the pack's outputs in PEFT."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from hf_kedit import load_edits
from hf_kedit.methods import make_pack
from packs import random_pack
from test_weight_delta import logits
from tiny_models import tiny_model

KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def mixed_pack(model):
    """Edits of ranks 1 and 3 on layers 0, 2 and 1: ranks and layers that differ."""
    a = random_pack(model, layers=(0, 2), n_edits=2, rank=1)
    return a.extend(random_pack(model, layers=(1,), n_edits=1, rank=3, seed=5, prefix="b", subject="B{}"))


def check_serving_rules(folder, num_layers):
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    r = config["r"]
    assert {"r", "lora_alpha", "target_modules"} <= set(config)      # vLLM's required fields
    assert not config.get("modules_to_save") and not config.get("use_dora")  # vLLM refuses both
    assert config["bias"] == "none"                                    # vLLM: a bias needs bias_enabled
    assert config["lora_alpha"] == r and not config.get("use_rslora")  # both scale every module by alpha / r ...
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")  # ... and read no patterns
    factors = {}
    for key, t in tensors.items():
        module, which = KEY.fullmatch(key).groups()                    # the names both loaders parse
        factors.setdefault(module, {})[which] = t
    assert sorted(factors) == sorted(config["target_modules"])
    for module, pair in factors.items():
        assert pair["A"].shape[0] == r and pair["B"].shape[1] == r    # one rank: TGI stacks the layers of a type
    types = {re.sub(r"\.\d+\.", ".{}.", m, count=1) for m in factors}
    for t in types:                                                    # TGI drops a type some layer lacks
        assert all(t.format(i) in factors for i in range(num_layers)), t


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "opt"])
def test_a_pack_of_mixed_ranks_and_layers_exports_by_the_rules(arch, tmp_path):
    from peft import PeftModel

    model = tiny_model(arch)
    pack = mixed_pack(model)
    pack.export_peft(tmp_path / "lora")
    check_serving_rules(tmp_path / "lora", model.config.num_hidden_layers)
    load_edits(model, pack, name="p")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=1e-5)


def test_a_lora_pack_exports_by_the_rules(tmp_path, default_model):
    tokenizer = default_model[1]
    from test_rome import EDIT, tiny
    model = tiny(tokenizer)
    make_pack("lora", model, tokenizer, [EDIT], {"steps": 2}, progress=False).export_peft(tmp_path / "lora")
    check_serving_rules(tmp_path / "lora", model.config.num_hidden_layers)
