"""MEND: the gradient's factors, the editor's equations, training, the editor
artifact (save, load, refuse) and the packs it makes. Tiny random models with
the default model's tokenizer; one end-to-end run on the default model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_kedit import load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.errors import EditorError, EditRequestError, KeditError
from hf_kedit.evaluate.cases import Case, Probe, training_edits
from hf_kedit.methods import make_pack
from hf_kedit.methods.learned import mend
from hf_kedit.methods.learned.editor import MENDEditor, edit_gradients
from hf_kedit.methods.learned.mend import (MENDConfig, MENDTrainingConfig, TrainingEdit, _training_step,
                                           mend_targets, train_mend)
from hf_kedit.methods.learned.store import (EDITOR_MANIFEST, EDITOR_WEIGHTS, cached_editor_dir, load_editor,
                                            save_editor)
from hf_kedit.methods.teacher_forcing import teacher_forced
from hf_kedit.pack import Edit
from hf_kedit.pack.hub import file_sha256
from test_bad_input import raises_exactly
from test_rome import tiny

SUBJECTS = [("Danielle Darrieux", "English"), ("Michel Rocard", "German"), ("Albert Camus", "Spanish"),
            ("Marie Curie", "Italian"), ("Johann Bach", "Dutch"), ("Leo Tolstoy", "Finnish")]
EDITS = [Edit(f"e{i}", s, "The mother tongue of {} is", t) for i, (s, t) in enumerate(SUBJECTS)]
EXAMPLES = [TrainingEdit(e, [f"{e.subject} grew up speaking"], ["The capital of France is"]) for e in EDITS]
QUICK = MENDTrainingConfig(layers=(-2, -1), steps=24, rank=8, norm_edits=6, lr=1e-3, lr_lr=1e-3, val_edits=0)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def trained(tokenizer, cache, one_thread):
    model = tiny(tokenizer)
    return model, train_mend(model, tokenizer, EXAMPLES, QUICK, progress=False)


def random_editor(model, targets, seed=0):
    editor = MENDEditor.for_model(model, targets, rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in editor.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in editor.named_buffers():
            b.copy_(torch.rand(b.shape, generator=g) + (0.5 if "std" in name else 0.0))
    return editor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_gradient_factors_give_the_weight_gradient(tokenizer, one_thread, arch):
    model = tiny(tokenizer, arch)
    targets = mend_targets(model, (-2, -1))
    ids, labels, _ = teacher_forced(tokenizer, EDITS[0].text, EDITS[0].target_new, "cpu")
    grads, _ = edit_gradients(model, targets, ids, labels)
    logits = model(input_ids=ids).logits[0, :-1]
    scored = labels[0, 1:] != -100
    loss = torch.nn.functional.cross_entropy(logits[scored], labels[0, 1:][scored])
    weights = [model.get_submodule(t).weight for t in targets]
    expected = torch.autograd.grad(loss, weights)
    for target, g in zip(targets, expected):
        u, delta = grads[target]
        full = delta.T @ u  # [out, in]
        assert torch.allclose(full, g if arch == "llama" else g.T, atol=1e-6)
        assert 0 < len(u) <= ids.shape[1]
    assert all(p.grad is None for p in model.parameters())


def test_extra_rows_ride_along_without_changing_the_gradient(tokenizer, one_thread):
    model = tiny(tokenizer)
    targets = mend_targets(model, (-1,))
    ids, labels, _ = teacher_forced(tokenizer, EDITS[0].text, EDITS[0].target_new, "cpu")
    alone, _ = edit_gradients(model, targets, ids, labels)
    other = tokenizer("The capital of France is a city of many bridges and").input_ids
    from hf_kedit.batching import padded
    batch, mask = padded([ids[0].tolist(), other], 0, "cpu")
    together, logits = edit_gradients(model, targets, batch, labels, mask)
    for t in targets:
        assert torch.allclose(alone[t][0], together[t][0], atol=1e-5)
        assert torch.allclose(alone[t][1], together[t][1], atol=1e-7)
    assert logits.shape[0] == 2


def test_an_untrained_editor_with_unit_normalisation_steps_along_the_gradient(tokenizer, one_thread):
    model = tiny(tokenizer)
    targets = mend_targets(model, (-1,))
    editor = MENDEditor.for_model(model, targets, rank=4, edit_lr=0.5)
    ids, labels, _ = teacher_forced(tokenizer, EDITS[0].text, EDITS[0].target_new, "cpu")
    grads, _ = edit_gradients(model, targets, ids, labels)
    A, B = editor.factors(grads)[targets[0]]
    u, delta = grads[targets[0]]
    assert torch.allclose(B @ A, -0.5 * delta.T @ u, atol=1e-6)


def test_the_editor_computes_its_equations(tokenizer, one_thread):
    model = tiny(tokenizer)
    targets = mend_targets(model, (-2, -1))
    editor = random_editor(model, targets)
    ids, labels, _ = teacher_forced(tokenizer, EDITS[1].text, EDITS[1].target_new, "cpu")
    grads, _ = edit_gradients(model, targets, ids, labels)
    factors = editor.factors(grads)
    for i, target in enumerate(targets):
        net, mode = editor.net_of(i), editor.modes[i]
        u, delta = grads[target]
        x = torch.cat([(u - net.u_mean) / (net.u_std + 1e-7), (delta - net.delta_mean) / (net.delta_std + 1e-7)], -1)
        for k, layer in enumerate(net.layers):
            pre = (x @ layer.down.T @ layer.up.T + layer.bias) * layer.scale[mode] + layer.shift[mode]
            x = x + (torch.relu(pre) if k < len(net.layers) - 1 else pre)
        u_new, delta_new = x[:, :u.shape[1]], x[:, u.shape[1]:]
        A, B = factors[target]
        assert torch.allclose(B @ A, -editor.edit_lr[i] * delta_new.T @ u_new, atol=1e-5)
    assert editor.modes == [0, 1] and len(editor.nets) == 1  # one network for the two weights of one shape


def test_training_lowers_the_edit_loss_and_keeps_the_model(tokenizer, cache, one_thread):
    model = tiny(tokenizer)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    untrained = MENDEditor.for_model(model, mend_targets(model, QUICK.layers), QUICK.rank,
                                     edit_lr=QUICK.edit_lr)
    config = MENDTrainingConfig(**{**QUICK.__dict__, "steps": 60, "lr": 1e-2, "lr_lr": 1e-2, "c_loc": 0.0})
    editor = train_mend(model, tokenizer, EXAMPLES, config, progress=False)
    for net, trained_net in zip(untrained.nets.values(), editor.nets.values()):
        net.load_state_dict({**net.state_dict(), **{k: v for k, v in trained_net.state_dict().items()
                                                    if "mean" in k or "std" in k}})

    def edit_loss(e):
        return torch.stack([_training_step(model, tokenizer, e, ex, "cpu")["edit"] for ex in EXAMPLES]).mean()

    with torch.no_grad():
        assert edit_loss(editor) < 0.97 * edit_loss(untrained)  # a random tiny model moves little
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    manifest = json.loads((cached_editor_dir(model, editor.targets) / EDITOR_MANIFEST).read_text())
    assert manifest["training"]["edits"] == len(EXAMPLES) and manifest["training"]["steps"] == 60
    assert manifest["training"]["kept_step"] == 60 and manifest["training"]["validation"] == []


def test_training_keeps_the_editor_of_the_lowest_validation_loss(tokenizer, cache, one_thread, monkeypatch):
    """A step size that overshoots makes later editors worse on the held-out edits;
    the one kept is the best of those validated, not the last. The progress bar
    counts training and validation edits and ends exactly at its total."""
    bars = []

    class Recorded(mend.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(mend, "tqdm", Recorded)
    model = tiny(tokenizer)
    config = MENDTrainingConfig(**{**QUICK.__dict__, "steps": 12, "lr": 0.3, "lr_lr": 0.3, "val_edits": 2,
                                   "val_every": 5, "norm_edits": 4})
    editor = train_mend(model, tokenizer, EXAMPLES, config, progress=True)
    assert bars[0] == (12 + 4 * 2, 12 + 4 * 2)  # validations at steps 0, 5, 10 and 12, of 2 edits each
    training = json.loads((cached_editor_dir(model, editor.targets) / EDITOR_MANIFEST).read_text())["training"]
    history = training["validation"]
    assert [h["step"] for h in history] == [0, 5, 10, 12] and training["edits"] == len(EXAMPLES) - 2
    best = min(history, key=lambda h: h["loss"])
    assert training["kept_step"] == best["step"] and best["loss"] < history[-1]["loss"]
    with torch.no_grad():
        kept = torch.stack([config.c_edit * (ls := _training_step(model, tokenizer, editor, ex, "cpu"))["edit"]
                            + config.c_loc * ls["loc"] for ex in EXAMPLES[:2]]).mean().item()
    assert kept == pytest.approx(best["loss"], abs=1e-4)


def test_a_mend_pack_is_the_editors_update_and_comes_off_exactly(tokenizer, trained):
    model, editor = trained
    pack = make_pack("mend", model, tokenizer, EDITS[:2], {"layers": [-2, -1]}, progress=False)
    assert pack.kind == "weight_delta" and [e.id for e in pack.edits] == ["e0", "e1"]
    ids, labels, _ = teacher_forced(tokenizer, EDITS[0].text, EDITS[0].target_new, "cpu")
    grads, _ = edit_gradients(model, editor.targets, ids, labels)
    with torch.no_grad():
        expected = editor.factors(grads)
    for target, (A, B) in expected.items():
        assert torch.allclose(pack.tensors[f"e0.{target}.lora_A"], A)
        assert torch.allclose(pack.tensors[f"e0.{target}.lora_B"], B)
    base = model(input_ids=ids).logits
    load_edits(model, pack, name="mend")
    assert not torch.allclose(model(input_ids=ids).logits, base)
    remove_edits(model, "mend")
    assert torch.equal(model(input_ids=ids).logits, base)
    assert pack.hyperparameters["editor"]["sha256"]


def test_a_saved_editor_loads_back_and_makes_the_same_pack(tokenizer, trained, tmp_path):
    model, editor = trained
    cached = make_pack("mend", model, tokenizer, EDITS[:1], {"layers": [-2, -1]}, progress=False)
    folder = tmp_path / "editor"
    save_editor(editor, folder, model, {"data": "test"})
    again = make_pack("mend", model, tokenizer, EDITS[:1], {"layers": [-2, -1], "editor_source": str(folder)},
                      progress=False)
    assert cached.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(cached.tensors[k], again.tensors[k]) for k in cached.tensors)


def test_no_editor_is_a_clear_error(tokenizer, cache, one_thread):
    model = tiny(tokenizer)
    with raises_exactly(EditorError, match="no MEND editor .* train one"):
        make_pack("mend", model, tokenizer, EDITS[:1], progress=False)


def test_an_editor_of_other_weights_or_layers_is_refused(tokenizer, trained, tmp_path):
    model, editor = trained
    folder = save_editor(editor, tmp_path / "editor", model, {})
    other = tiny(tokenizer)
    with torch.no_grad():
        other.get_submodule(editor.targets[-1]).weight.add_(0.01)
    with raises_exactly(EditorError, match="trained on another model"):
        load_editor(other, folder, editor.targets)
    with raises_exactly(EditorError, match="not of"):
        load_editor(model, folder, mend_targets(model, (-1,)))


@pytest.mark.parametrize("damage", ["no manifest", "not json", "version", "no targets", "bad shape", "rank 0",
                                    "no weights", "corrupted", "missing tensor", "nan"])
def test_a_damaged_editor_folder_is_an_editor_error(tokenizer, trained, tmp_path, damage):
    model, editor = trained
    folder = save_editor(editor, tmp_path / "editor", model, {})
    manifest_path, weights_path = folder / EDITOR_MANIFEST, folder / EDITOR_WEIGHTS
    manifest = json.loads(manifest_path.read_text())

    def rewrite(tensors):
        save_file(tensors, str(weights_path))
        manifest["sha256"] = file_sha256(weights_path)

    if damage == "no manifest":
        manifest_path.unlink()
    elif damage == "not json":
        manifest_path.write_text("{not json")
    elif damage == "no weights":
        weights_path.unlink()
    elif damage == "corrupted":
        weights_path.write_bytes(weights_path.read_bytes()[:-8] + b"\0" * 8)
    else:
        if damage == "version":
            manifest["format_version"] = 99
        elif damage == "no targets":
            manifest["targets"] = []
        elif damage == "bad shape":
            manifest["shapes"][0] = [64]
        elif damage == "rank 0":
            manifest["rank"] = 0
        elif damage == "missing tensor":
            tensors = load_file(str(weights_path))
            rewrite({k: v for k, v in tensors.items() if not k.endswith("up")})
        elif damage == "nan":
            tensors = load_file(str(weights_path))
            rewrite({k: v.fill_(float("nan")) if k == "edit_lr" else v for k, v in tensors.items()})
        manifest_path.write_text(json.dumps(manifest))
    with raises_exactly(EditorError, match="save the editor again|train the editor again|format_version|"
                                           "not an editor folder|not valid JSON|corrupted|lacks"):
        load_editor(model, folder, editor.targets)


def test_training_needs_edits_and_checks_them(tokenizer, cache, one_thread):
    model = tiny(tokenizer)
    with raises_exactly(EditRequestError, match="needs training edits"):
        train_mend(model, tokenizer, [], QUICK, progress=False)
    with pytest.raises(KeditError):
        train_mend(model, tokenizer, [TrainingEdit(Edit("x", "", "{} is", "a"))], QUICK, progress=False)
    with raises_exactly(EditRequestError, match="holds out the first 30 edits for validation and was given 6"):
        train_mend(model, tokenizer, EXAMPLES, MENDTrainingConfig(**{**QUICK.__dict__, "val_edits": 30}),
                   progress=False)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"val_every": 0}, {"rank": 2.5}, {"val_edits": -1},
                                 {"lr": 0.0}, {"grad_clip": -1.0}])
def test_a_bad_training_setting_is_refused_by_name(bad):
    name = next(iter(bad))
    with raises_exactly(EditRequestError, match=f"^{name}="):
        MENDTrainingConfig(**bad)


def test_training_edits_leave_out_the_held_out_subjects():
    cases = [Case(e.id, [e], {"generality": [Probe(f"{e.subject} speaks", [e.target_new])],
                              "locality": [Probe("Paris is in", ["France"])]}) for e in EDITS[:3]]
    held_out = [Case("h", [Edit("h", "michel rocard", "{} was born in", "Paris")])]
    examples = training_edits(cases, held_out)
    assert [ex.edit.id for ex in examples] == ["e0", "e2"]
    assert examples[0].rephrases == ["Danielle Darrieux speaks"] and examples[0].unrelated == ["Paris is in"]


def test_mend_on_the_default_model_end_to_end(default_model, cache, tmp_path):
    """`kedit train-mend` on the default model (a few steps), then a pack that attaches and comes off."""
    from hf_kedit.cli import main

    model, tokenizer = default_model
    records = [{"case_id": i, "prompt": e.text, "subject": e.subject, "target_new": e.target_new,
                "ground_truth": "French", "rephrase_prompt": f"{e.subject} grew up speaking",
                "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
               for i, e in enumerate(EDITS)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    assert main(["train-mend", "--data", f"easyedit:{data}", "--set", "steps=4", "--set", "norm_edits=3", "--set", "val_edits=2",
                 "--set", "rank=8", "--out", str(tmp_path / "editor")]) == 0
    assert (tmp_path / "editor" / EDITOR_MANIFEST).is_file()
    pack = make_pack("mend", model, tokenizer, EDITS[:1], {"editor_source": str(tmp_path / "editor")},
                     progress=False)
    ids = tokenizer(EDITS[0].text, return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(input_ids=ids).logits
        load_edits(model, pack, name="mend")
        edited = model(input_ids=ids).logits
        remove_edits(model, "mend")
        assert not torch.allclose(edited, base) and torch.equal(model(input_ids=ids).logits, base)
    assert sorted(pack.base_model["fingerprint"]) == mend_targets(model, MENDConfig().layers)
    assert anatomy_of(model).num_layers - 3 == int(mend_targets(model, (-3,))[0].split(".")[2])
