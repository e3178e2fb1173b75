"""`kedit info` and `kedit export-peft` on local packs (push and pull: test_hub.py)."""
import json


from hf_kedit.cli import main as kedit
from packs import random_pack
from tiny_models import tiny_model


def test_info_lists_the_edits(tmp_path, capsys):
    random_pack(tiny_model("gpt2"), layers=(0, 1), n_edits=3).save_pretrained(tmp_path)
    assert kedit(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kind:        weight_delta" in out and "edits:       3" in out
    assert "e2: The capital of S2 is Old -> T0-2" in out
    assert "gpt2, 3 layers, hidden 32" in out


def test_export_peft_writes_a_lora_adapter(tmp_path):
    random_pack(tiny_model("gpt2"), layers=(0, 1), n_edits=2, rank=2).save_pretrained(tmp_path / "pack")
    assert kedit(["export-peft", str(tmp_path / "pack"), str(tmp_path / "lora")]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D
    # every layer's c_proj: serving engines (TGI) use a module type only where every layer has it
    assert config["target_modules"] == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "kedit_config.json").write_text("{not json")
    (tmp_path / "kedit_model.safetensors").write_bytes(b"")
    assert kedit(["info", str(tmp_path)]) == 2
    assert "PackFormatError" in capsys.readouterr().err
