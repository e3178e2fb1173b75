"""Edit requests and settings a method cannot carry out fail with a typed error that
says what is wrong and how to fix it, before any statistics, templates or value
optimisation start, leaving the model and the disk as they were. (Broken packs:
test_bad_input.py.)"""
import json

import pytest

from hf_kedit import Edit
from hf_kedit.cli import main as kedit
from hf_kedit.errors import EditRequestError
from hf_kedit.methods import ActAddConfig, BaFTConfig, MEMITConfig, SAKEConfig, make_pack
from hf_kedit.methods.finetune import lora
from hf_kedit.methods.lifelong import ultraedit
from hf_kedit.methods.locate import alphaedit, memit, rome
from test_bad_input import raises_exactly, untouched
from test_datasets import COUNTERFACT_RECORD
from test_rome import tiny

GOOD = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
FACTS = [{"subject": "Worf", "prompt": "Worf speaks", "object": "Klingon"}]


def edit(**fields) -> Edit:
    return Edit(**{**GOOD.__dict__, **fields})


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny(tokenizer)


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Statistics, context templates, value optimisation and LoRA's training fail the test if they start."""
    def started(*args, **kwargs):
        raise AssertionError("expensive work started before the request was checked")
    for module, names in ((rome, ("key_second_moments", "context_templates", "optimise_values")),
                          (memit, ("key_second_moments", "spread_update")),
                          (alphaedit, ("key_second_moments", "context_templates", "spread_update")),
                          (ultraedit, ("_read",)),
                          (lora, ("teacher_forced_rows",))):
        for name in names:
            monkeypatch.setattr(module, name, started)


@pytest.fixture
def fact_files(tmp_path, monkeypatch):
    """Fact base files in the working folder: broken.json (not JSON) and object.json (not a list)."""
    (tmp_path / "broken.json").write_text('[{"subject": "Worf",')
    (tmp_path / "object.json").write_text(json.dumps(FACTS[0]))
    monkeypatch.chdir(tmp_path)


CASES = [  # (id, method, requests, settings, error type, regex the message must match)
    ("subject-written-in", "rome", [edit(prompt="The mother tongue of Danielle Darrieux is")], {},
     EditRequestError, r"must hold \"\{\}\" exactly once, where the subject goes: write 'The mother tongue of \{\} is"),
    ("subject-not-in-prompt", "steam", [edit(prompt="The mother tongue of Jacques Chirac is")], {"fact_base": FACTS},
     EditRequestError, r"exactly once.*\(the subject 'Danielle Darrieux' does not occur in it\)"),
    ("two-slots", "memit", [edit(prompt="{} and {} speak")], {}, EditRequestError, r"'\{\} and \{\} speak' must hold"),
    ("empty-target", "rome", [edit(target_new="")], {}, EditRequestError,
     r"edit 'e0': target_new must be a non-empty string, got ''"),
    ("blank-target", "steam", [edit(target_new="  ")], {"fact_base": FACTS}, EditRequestError,
     r"target_new must be a non-empty string"),
    ("blank-target-lora", "lora", [edit(target_new=" \n")], {}, EditRequestError, r"target_new must be a non-empty"),
    ("empty-subject", "memit", [edit(subject="")], {}, EditRequestError, r"subject must be a non-empty string"),
    ("no-requests", "rome", [], {}, EditRequestError, r"give a non-empty list of Edit requests"),
    ("not-an-edit", "lora", [{"subject": "x"}], {}, EditRequestError, r"must be hf_kedit.Edit objects, got dict"),
    ("repeated-id", "memit", [GOOD, edit(target_new="German")], {}, EditRequestError,
     r"edit ids repeat: \['e0'\]; give each edit its own id"),
    ("bad-id", "lora", [edit(id="e 0")], {}, EditRequestError, r"edit ids must match"),
    ("rome-layer-99", "rome", [GOOD], {"layer": 99}, EditRequestError,
     r"layer=99 gives layers \[99\], out of range: the model has 3 layers \(0 to 2\)"),
    ("rome-layer-minus-1", "rome", [GOOD], {"layer": -1}, EditRequestError, r"layer=-1 gives layers \[-1\]"),
    ("rome-layer-depth-1", "rome", [GOOD], {"layer": 1.0}, EditRequestError, r"layer=1.0 gives layers \[3\]"),
    ("rome-layer-word", "rome", [GOOD], {"layer": "middle"}, EditRequestError,
     r"layer='middle': give a layer index, a relative depth in \[0, 1\) or \"auto\""),
    ("memit-layers-0-99", "memit", [GOOD], {"layers": (0, 99)}, EditRequestError,
     r"layers=\(0, 99\) gives layers \[99\], out of range"),
    ("memit-layers-one-int", "memit", [GOOD], {"layers": 5}, EditRequestError,
     r"layers=5: give layer indices or a \(start, end\) pair"),
    ("rome-solve-at-unknown", "rome", [GOOD], {"solve_at": "average"}, EditRequestError,
     r"solve_at='average': give one of 'prompt', 'templates'"),
    ("rome-templates-not-pairs", "rome", [GOOD], {"context_templates": [5, 10]}, EditRequestError,
     r"context_templates=\[5, 10\]: give \(count, tokens\) pairs, e\.g\. \(\(5, 5\), \(5, 10\)\)"),
    ("memit-templates-negative", "memit", [GOOD], {"context_templates": [[5, -1]]}, EditRequestError,
     r"context_templates=\[\[5, -1\]\]: give \(count, tokens\) pairs"),
    ("memit-update-weight-0", "memit", [GOOD], {"update_weight": 0}, EditRequestError,
     r"update_weight=0: give a positive number \(λ\), or None"),
    ("memit-update-weight-text", "memit", [GOOD], {"update_weight": "15000"}, EditRequestError,
     r"update_weight='15000': give a positive number"),
    ("alphaedit-share-1", "alphaedit", [GOOD], {"nullspace_share": 1}, EditRequestError,
     r"nullspace_share=1: give a number between 0 and 1"),
    ("alphaedit-ridge-text", "alphaedit", [GOOD], {"ridge": "10"}, EditRequestError, r"ridge='10': give a positive"),
    ("alphaedit-no-covariance", "alphaedit", [GOOD], {"covariance": False}, EditRequestError,
     r"covariance=False: AlphaEdit's null space comes from the key statistics"),
    ("alphaedit-layers-0-99", "alphaedit", [GOOD], {"layers": (0, 99)}, EditRequestError,
     r"layers=\(0, 99\) gives layers \[99\], out of range"),
    ("ultraedit-lr-0", "ultraedit", [GOOD], {"lr": 0}, EditRequestError, r"lr=0: give a positive number"),
    ("ultraedit-positions", "ultraedit", [GOOD], {"positions": "mask"}, EditRequestError,
     r"positions='mask': give one of 'all', 'target'"),
    ("ultraedit-chunk-0", "ultraedit", [GOOD], {"chunk": 0}, EditRequestError, r"chunk=0: give a positive int"),
    ("ultraedit-no-projections", "ultraedit", [GOOD], {"projections": ()}, EditRequestError,
     r"projections=\(\): give module names inside a decoder layer"),
    ("ultraedit-missing-projection", "ultraedit", [GOOD], {"layers": (1,), "projections": ("mlp.w1",)},
     EditRequestError, r"LlamaForCausalLM has no model.layers.1.mlp.w1: give projections that every decoder layer"),
    ("ultraedit-layers-0-99", "ultraedit", [GOOD], {"layers": (0, 99)}, EditRequestError,
     r"layers=\(0, 99\) gives layers \[99\], out of range"),
    ("value-batch-size-0", "memit", [GOOD], {"batch_size": 0}, EditRequestError,
     r"batch_size=0: give a positive int"),
    ("lora-layer-99", "lora", [GOOD], {"layer": 99}, EditRequestError, r"layer=99 gives layers \[99\]"),
    ("steam-missing-file", "steam", [GOOD], {"fact_base": "missing.json"}, FileNotFoundError,
     r"no such fact base file: missing.json \(fact_base is a JSON file holding a list"),
    ("steam-broken-json", "steam", [GOOD], {"fact_base": "broken.json"}, EditRequestError,
     r"the fact base broken.json is not valid JSON"),
    ("steam-json-object", "steam", [GOOD], {"fact_base": "object.json"}, EditRequestError,
     r"must be a list of \{subject, prompt, object\} facts, got dict"),
    ("steam-fact-without-object", "steam", [GOOD], {"fact_base": [{"subject": "Worf", "prompt": "Worf speaks"}]},
     EditRequestError, r"fact base entry 0 needs non-empty strings subject, prompt and object"),
    ("steam-mid-layers", "steam", [GOOD], {"fact_base": FACTS, "mid_layers": (0, 99)}, EditRequestError,
     r"mid_layers=\(0, 99\) gives layers \[99\]"),
    ("steam-strict-no-fact", "steam", [edit(target_new="Klingon")],
     {"fact_base": FACTS, "strict": True, "layer": 0, "mid_layers": (2,)}, EditRequestError,
     r"no fact .* has the object 'Klingon' \(strict=True\): pass a fact base with facts .* or set strict=False"),
    ("grace-layer-99", "grace", [GOOD], {"layer": 99}, EditRequestError, r"layer=99 gives layers \[99\]"),
    ("grace-radius-negative", "grace", [GOOD], {"radius": -1.0}, EditRequestError,
     r"radius=-1.0: give a positive distance"),
    ("grace-blank-target", "grace", [edit(target_new=" ")], {}, EditRequestError, r"target_new must be a non-empty"),
    ("distill-layers-99", "distill", [GOOD], {"layers": [1, 99]}, EditRequestError, r"layer=99 gives layers \[99\]"),
    ("distill-layers-number", "distill", [GOOD], {"layers": 1}, EditRequestError, r"layers=1: give a list"),
    ("distill-blank-target", "distill", [edit(target_new=" ")], {}, EditRequestError,
     r"target_new must be a non-empty"),
    ("unknown-method", "romeo", [GOOD], {}, EditRequestError, r"unknown method 'romeo'"),
    ("unknown-setting", "rome", [GOOD], {"layers": 3}, EditRequestError, r"rome has no setting \['layers'\]"),
]


@pytest.mark.parametrize("method, requests, settings, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_fails_before_any_work(model, tokenizer, nothing_expensive, fact_files, tmp_path, method,
                                           requests, settings, exc, match):
    before = sorted(tmp_path.iterdir())
    with untouched(model), raises_exactly(exc, match):
        make_pack(method, model, tokenizer, requests, settings, progress=False)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_lora_needs_no_subject_slot(model, tokenizer):
    """LoRA reads only the filled-in prompt: a prompt without "{}" (a few zsRE records) is fine."""
    pack = make_pack("lora", model, tokenizer, [edit(prompt="Danielle Darrieux speaks")], {"steps": 1},
                     progress=False)
    assert pack.edits[0].prompt == "Danielle Darrieux speaks"


def test_cli_edit_with_a_bad_layer_writes_nothing(model, tokenizer, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "counterfact.json").write_text(json.dumps([COUNTERFACT_RECORD]))
    assert kedit(["edit", "--method", "rome", "--model", str(tmp_path / "model"), "--data",
                  f"counterfact:{tmp_path / 'counterfact.json'}", "--set", "layer=99", "--out",
                  str(tmp_path / "pack")]) == 2
    assert "kedit edit: EditRequestError: layer=99 gives layers [99], out of range" in capsys.readouterr().err
    assert not (tmp_path / "pack").exists()


@pytest.mark.parametrize("config, settings, match", [
    (BaFTConfig, {"gate_steps": -1}, "gate_steps=-1"),
    (BaFTConfig, {"contrast_subjects": "Paris"}, "contrast_subjects='Paris'"),
    (SAKEConfig, {"metric": "manhattan"}, "metric='manhattan'"),
    (ActAddConfig, {"router_layer": "x"}, "router_layer='x'"),
    (MEMITConfig, {"update_weight": 0}, "update_weight=0"),
], ids=["baft-gate-steps", "baft-contrasts-text", "sake-metric", "actadd-router-layer", "memit-update-weight"])
def test_a_config_refuses_bad_settings_when_it_is_made(config, settings, match):
    """Settings that need no model are checked by the config itself, before any method or model runs."""
    with raises_exactly(EditRequestError, match):
        config(**settings)
