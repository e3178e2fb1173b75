"""Bad input gets a clear, typed error that names the problem, and loses nothing.

Every failing call below is checked twice:
- `raises_exactly` asserts the exact error type (not a subclass, not a stray
  AttributeError) and that the message names what is wrong;
- `untouched` asserts the model is exactly as before the call: logits on fixed
  inputs `torch.equal`, the same forward hooks (so none added), the same
  parameters and the same packs in its edit stack.

Broken packs are made from one good pack (`good_folder`) by small functions
that each break one thing; the same broken folders must also fail
`EditPack.from_pretrained`, with no model involved.
"""
from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_kedit import EditPack, load_edits, remove_edits, stack_of
from hf_kedit.errors import EditConflictError, IncompatiblePackError, KeditError, PackFormatError
from hf_kedit.pack import CONFIG_NAME, WEIGHTS_NAME
from packs import random_pack
from tiny_models import tiny_inputs, tiny_model

A0 = "e0.model.layers.0.mlp.down_proj.lora_A"  # [1, 64]
B0 = "e0.model.layers.0.mlp.down_proj.lora_B"  # [32, 1]
A1_LAYER2 = "e1.model.layers.2.mlp.down_proj.lora_A"
MODULE0 = "model.layers.0.mlp.down_proj"


# ----- the model-is-untouched check, used by every failing call ------------------------

def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_inputs()).logits


def _hooks(model) -> dict[str, list]:
    """Every module's forward hooks and pre-hooks (the hooked kinds read each call with a pre-hook)."""
    return {name: list(m._forward_hooks.items()) + list(m._forward_pre_hooks.items())
            for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}


@contextmanager
def untouched(model):
    """The block leaves `model` exactly as it was: logits, hooks, weights, edit stack."""
    logits, hooks = _logits(model), _hooks(model)
    params = {n: p.detach().clone() for n, p in model.state_dict().items()}
    stack = stack_of(model)
    n_packs, edits = len(stack), [(name, e.id, e.target_new) for name, e in stack.edits()]
    had_no_hooks = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    yield
    assert torch.equal(_logits(model), logits), "a failed call changed the model's logits"
    if had_no_hooks:
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()), \
            "a failed call left a forward hook"
    assert _hooks(model) == hooks, "a failed call added or removed forward hooks"
    state = model.state_dict()
    assert state.keys() == params.keys() and all(torch.equal(state[n], p) for n, p in params.items())
    assert len(stack_of(model)) == n_packs
    assert [(name, e.id, e.target_new) for name, e in stack_of(model).edits()] == edits


@contextmanager
def raises_exactly(exc: type[BaseException], match: str):
    """`pytest.raises`, but the error must be `exc` itself, not a subclass or a parent."""
    with pytest.raises(BaseException) as info:
        yield info
    assert info.type is exc, f"expected {exc.__name__}, got {info.type.__name__}: {info.value}"
    assert re.search(match, str(info.value)), f"{str(info.value)!r} does not match {match!r}"


# ----- fixtures and file helpers ------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def good_folder(llama, tmp_path) -> Path:
    """A good pack for `llama` (2 edits on layers 0 and 2), saved to tmp_path/pack."""
    return random_pack(llama, layers=(0, 2), n_edits=2).save_pretrained(tmp_path / "pack")


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / CONFIG_NAME).read_text())


def write_manifest(folder: Path, manifest) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(manifest, indent=2))


def edit_manifest(change):
    """A breaker that applies `change(manifest)` to the manifest."""
    def breaker(folder):
        manifest = read_manifest(folder)
        change(manifest)
        write_manifest(folder, manifest)
    return breaker


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite_tensors(change, manifest_too: bool = False, manifest_change=None):
    """A breaker that rewrites the safetensors file with `change(tensors)`.

    The new file's sha256 goes into the manifest, so the integrity check does
    not mask the problem. With `manifest_too`, the manifest's `tensors` entry is rewritten to
    describe the new file (file and manifest agree); otherwise it still describes
    the original file."""
    def breaker(folder):
        path = folder / WEIGHTS_NAME
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})
        manifest = read_manifest(folder)
        if manifest_too:
            manifest["tensors"] = {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                                   for n, t in tensors.items()}
        if manifest_change:
            manifest_change(manifest)
        manifest["files"][WEIGHTS_NAME]["sha256"] = sha256(path)
        write_manifest(folder, manifest)
    return breaker


def rewrite_bytes(change, keep_sha: bool = True):
    """A breaker that changes the safetensors file's raw bytes (`change(bytes) -> bytes`);
    without `keep_sha` the manifest gets the damaged file's sha256, so that the
    file's own checks are what must catch it."""
    def breaker(folder):
        path = folder / WEIGHTS_NAME
        path.write_bytes(change(path.read_bytes()))
        if not keep_sha:
            edit_manifest(lambda m: m["files"][WEIGHTS_NAME].update(sha256=sha256(path)))(folder)
    return breaker


def flip(offsets):
    def change(data: bytes) -> bytes:
        out = bytearray(data)
        for i in offsets:
            out[i] ^= 0xFF
        return bytes(out)
    return change


def header_offsets(data: bytes) -> range:
    """Byte offsets of the JSON header (after its 8-byte length)."""
    return range(8, 8 + int.from_bytes(data[:8], "little"))


def flip_header(data: bytes) -> bytes:
    return flip(header_offsets(data)[10:20])(data)


def remove(name):
    return lambda folder: (folder / name).unlink()


def only_pickle(*names, keep_pack_files=False):
    """A breaker leaving pickle-named files (arbitrary bytes; nothing is unpickled)."""
    def breaker(folder):
        if not keep_pack_files:
            for p in folder.iterdir():
                p.unlink()
        else:
            (folder / WEIGHTS_NAME).unlink()
        for name in names:
            (folder / name).write_bytes(b"{}" if name.endswith(".json") else b"\x80\x04not really a pickle")
    return breaker


def set_tensor(name, value):
    def change(tensors):
        tensors[name] = value(tensors[name]) if callable(value) else value
    return change


def drop_tensor(name):
    return lambda tensors: tensors.pop(name)


def with_nonfinite(value):
    def fill(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t
    return fill


def _module0_in_63(manifest):
    """kind_config says module 0 is [32, 63]: factors and manifest agree, the model does not."""
    manifest["kind_config"]["modules"][MODULE0]["shape"] = [32, 63]


def _shrink_module0_a(tensors):
    for name in list(tensors):
        if name.endswith(f"{MODULE0}.lora_A"):
            tensors[name] = tensors[name][:, :63].contiguous()


def _dup_id(m):
    m["edits"][1]["id"] = m["edits"][0]["id"]


# ----- the broken folders -------------------------------------------------------------
# (id, breaker, error type, regex the message must match)

BROKEN = [
    # 1. missing files
    ("no-config", remove(CONFIG_NAME), PackFormatError, re.escape(f"{CONFIG_NAME} is missing")),
    ("no-weights", remove(WEIGHTS_NAME), PackFormatError, re.escape(f"{WEIGHTS_NAME} is missing")),
    # 2. damaged safetensors file; the manifest's sha256 catches each
    ("truncated", rewrite_bytes(lambda d: d[: len(d) // 2]), PackFormatError, "corrupted.*sha256"),
    ("data-bytes-flipped", rewrite_bytes(lambda d: flip(range(len(d) - 12, len(d) - 4))(d)),
     PackFormatError, "corrupted.*sha256"),
    ("header-bytes-flipped", rewrite_bytes(flip_header), PackFormatError, "corrupted.*sha256"),
    # ... and with the damaged file's sha256 in the manifest, safetensors' own checks do
    ("truncated-no-sha", rewrite_bytes(lambda d: d[: len(d) // 2], keep_sha=False),
     PackFormatError, "not a readable safetensors file"),
    ("header-bytes-flipped-no-sha", rewrite_bytes(flip_header, keep_sha=False),
     PackFormatError, "not a readable safetensors file"),
    ("header-length-flipped-no-sha", rewrite_bytes(flip(range(0, 8)), keep_sha=False),
     PackFormatError, "not a readable safetensors file"),
    ("empty-weights-no-sha", rewrite_bytes(lambda d: b"", keep_sha=False),
     PackFormatError, "not a readable safetensors file"),
    # 4. manifest
    ("format-version-2", edit_manifest(lambda m: m.update(format_version=2)), PackFormatError, "format_version 2"),
    ("format-version-missing", edit_manifest(lambda m: m.pop("format_version")), PackFormatError,
     "has no format_version"),
    ("unknown-kind", edit_manifest(lambda m: m.update(kind="lora_magic")), PackFormatError,
     "unknown pack kind 'lora_magic'"),
    ("invalid-json", lambda f: (f / CONFIG_NAME).write_text('{"format_version": 1,'), PackFormatError,
     "not valid JSON"),
    ("json-list", lambda f: write_manifest(f, [read_manifest(f)]), PackFormatError, "must hold a JSON object"),
    ("edit-unknown-key", edit_manifest(lambda m: m["edits"][0].update(colour="red")), PackFormatError,
     "edit entry is malformed.*colour"),
    ("duplicate-edit-ids", edit_manifest(_dup_id), PackFormatError, r"edit ids repeat: \['e0'\]"),
    ("empty-target-new", edit_manifest(lambda m: m["edits"][1].update(target_new="")), PackFormatError,
     "'e1': target_new must be a non-empty string"),
    # 7. pickle files instead of safetensors
    ("pytorch-model-bin", only_pickle("pytorch_model.bin"), PackFormatError, "pytorch_model.bin.*pickle"),
    ("adapter-model-bin", only_pickle("adapter_model.bin", "adapter_config.json"), PackFormatError,
     "adapter_model.bin.*pickle"),
    ("bin-beside-manifest", only_pickle("pytorch_model.bin", keep_pack_files=True), PackFormatError,
     f"{re.escape(WEIGHTS_NAME)} is missing.*pickle"),
]
# 3. tensors: the file disagrees with the manifest (sha256 updated)
BROKEN += [
    ("tensor-missing", rewrite_tensors(drop_tensor(A0)), PackFormatError, f"lacks tensors.*{re.escape(A0)}"),
    ("tensor-extra", rewrite_tensors(set_tensor("e9.stowaway", torch.zeros(2))), PackFormatError,
     "does not declare.*e9.stowaway"),
    ("tensor-shape", rewrite_tensors(set_tensor(A0, torch.zeros(1, 63))), PackFormatError,
     f"{re.escape(A0)}.*shape \\[1, 63\\]"),
    ("tensor-dtype", rewrite_tensors(set_tensor(A0, lambda t: t.half())), PackFormatError,
     f"{re.escape(A0)}.*dtype F16"),
    ("tensor-nan", rewrite_tensors(set_tensor(A0, with_nonfinite(float("nan")))), PackFormatError,
     f"{re.escape(A0)}.*NaN"),
    ("tensor-inf", rewrite_tensors(set_tensor(B0, with_nonfinite(float("inf")))), PackFormatError,
     f"{re.escape(B0)}.*inf"),
]
# 3. tensors: file and manifest agree, but the pack is not a well-formed weight_delta pack
BROKEN += [
    ("agreed-tensor-missing", rewrite_tensors(drop_tensor(A0), manifest_too=True), PackFormatError,
     f"edits name tensors the pack does not hold.*{re.escape(A0)}"),
    ("agreed-tensor-extra", rewrite_tensors(set_tensor("e9.stowaway", torch.zeros(2)), manifest_too=True),
     PackFormatError, "tensors no edit owns.*e9.stowaway"),
    ("agreed-tensor-extra-owned",
     rewrite_tensors(set_tensor("e0.stowaway", torch.zeros(2)), manifest_too=True,
                     manifest_change=lambda m: m["edits"][0]["tensors"].append("e0.stowaway")),
     PackFormatError, "'e0' owns tensors that are no weight_delta factors.*e0.stowaway"),
    ("agreed-shape-not-factors", rewrite_tensors(set_tensor(A0, torch.zeros(1, 63)), manifest_too=True),
     PackFormatError, f"'e0' on {re.escape(MODULE0)}.*not factors"),
    ("agreed-rank-mismatch", rewrite_tensors(set_tensor(A0, torch.zeros(2, 64)), manifest_too=True),
     PackFormatError, f"'e0' on {re.escape(MODULE0)}.*not factors"),
    ("agreed-dtype-int32", rewrite_tensors(set_tensor(A0, lambda t: t.int()), manifest_too=True),
     PackFormatError, f"{re.escape(A0)}.*dtype"),
]

BROKEN_PARAMS = [pytest.param(breaker, exc, match, id=case) for case, breaker, exc, match in BROKEN]


@pytest.mark.parametrize("breaker, exc, match", BROKEN_PARAMS)
def test_broken_pack_fails_cleanly(llama, good_folder, breaker, exc, match):
    breaker(good_folder)
    with untouched(llama), raises_exactly(exc, match):
        load_edits(llama, good_folder)


@pytest.mark.parametrize("breaker, exc, match", BROKEN_PARAMS)
def test_broken_pack_fails_from_pretrained(good_folder, breaker, exc, match):
    breaker(good_folder)
    with raises_exactly(exc, match):
        EditPack.from_pretrained(good_folder)


@pytest.mark.parametrize("collecting", [True, False])
@pytest.mark.parametrize("breaker, exc, match", BROKEN_PARAMS[:3] + BROKEN_PARAMS[-3:])
def test_reading_and_attaching_leave_the_garbage_collector_as_they_found_it(llama, good_folder, breaker, exc,
                                                                            match, collecting):
    """Reading and attaching pause Python's cyclic collector; a read that fails must not leave it off,
    nor turn on a collector the caller had turned off."""
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if collecting else gc.disable)()
        load_edits(llama, good_folder, name="good")
        assert gc.isenabled() == collecting
        remove_edits(llama, "good")
        breaker(good_folder)
        with raises_exactly(exc, match):
            load_edits(llama, good_folder)
        assert gc.isenabled() == collecting
    finally:
        (gc.enable if was else gc.disable)()


def test_good_pack_loads_and_removes(llama, good_folder):
    """The control: the unbroken folder attaches, changes the logits, and removes bit-exactly."""
    base = _logits(llama)
    load_edits(llama, good_folder, name="good")
    assert not torch.equal(_logits(llama), base)
    remove_edits(llama, "good")
    assert torch.equal(_logits(llama), base)
    assert all(not m._forward_hooks for m in llama.modules())


def test_file_with_nonfinite_bf16_values(llama, good_folder):
    """NaN also caught in a pack stored in bfloat16 (file and manifest agree on the dtype)."""
    def to_bf16_with_nan(tensors):
        for n in tensors:
            tensors[n] = tensors[n].bfloat16()
        tensors[A1_LAYER2] = with_nonfinite(float("nan"))(tensors[A1_LAYER2])
    rewrite_tensors(to_bf16_with_nan, manifest_too=True)(good_folder)
    with untouched(llama), raises_exactly(PackFormatError, f"{re.escape(A1_LAYER2)}.*NaN"):
        load_edits(llama, good_folder)


# ----- 3./5. well-formed packs that do not fit the model ------------------------------

def test_factors_do_not_fit_the_module(llama, good_folder):
    """File, manifest and kind_config agree on in=63; the model's module has in=64."""
    rewrite_tensors(_shrink_module0_a, manifest_too=True, manifest_change=_module0_in_63)(good_folder)
    EditPack.from_pretrained(good_folder)  # a well-formed pack ...
    with untouched(llama), raises_exactly(IncompatiblePackError, f"{re.escape(MODULE0)}.*\\[32, 64\\].*\\[32, 63\\]"):
        load_edits(llama, good_folder)  # ... that does not fit this model


def test_pack_for_another_architecture(llama, tmp_path):
    gpt2 = tiny_model("gpt2")
    folder = random_pack(gpt2, layers=(0, 2), n_edits=2).save_pretrained(tmp_path / "gpt2-pack")
    with untouched(llama), raises_exactly(IncompatiblePackError, r"transformer\.h\.\d\.mlp\.c_proj"):
        load_edits(llama, folder)


def test_pack_for_other_weights(good_folder):
    other = tiny_model("llama", seed=1)
    with untouched(other), raises_exactly(IncompatiblePackError, "weights of model.layers.0.mlp.down_proj differ"):
        load_edits(other, good_folder)


def test_other_weights_accepted_with_verify_shapes(good_folder):
    other = tiny_model("llama", seed=1)
    base = _logits(other)
    load_edits(other, good_folder, name="sibling", verify="shapes")
    assert [p.name for p in stack_of(other).list()] == ["sibling"]
    assert not torch.equal(_logits(other), base)
    remove_edits(other, "sibling")
    assert torch.equal(_logits(other), base)
    assert all(not m._forward_hooks for m in other.modules())
    assert len(stack_of(other)) == 0


# ----- 6. paths that are not pack folders ---------------------------------------------

MISSING_PATHS = [
    pytest.param("./no/such/pack", id="relative-dot"),
    pytest.param("/tmp/definitely-missing-xyz", id="absolute"),
    pytest.param("no/such/pack", id="relative-no-dot"),
    pytest.param(Path("no/such/pack"), id="pathlib-relative"),
    pytest.param(Path("/tmp/definitely-missing-xyz"), id="pathlib-absolute"),
]


@pytest.mark.parametrize("source", MISSING_PATHS)
def test_missing_path(llama, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)  # the relative paths surely do not exist here
    with untouched(llama), raises_exactly(FileNotFoundError, re.escape(str(source))):
        load_edits(llama, source)
    with raises_exactly(FileNotFoundError, re.escape(str(source))):
        EditPack.from_pretrained(source)


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "pathlib"])
def test_path_to_a_file(llama, good_folder, as_path):
    source = good_folder / CONFIG_NAME
    source = source if as_path else str(source)
    with untouched(llama), raises_exactly(FileNotFoundError, "is a file"):
        load_edits(llama, source)
    with raises_exactly(FileNotFoundError, "is a file"):
        EditPack.from_pretrained(source)


# ----- 8. conflicting edits -----------------------------------------------------------

@pytest.fixture
def second_folder(llama, tmp_path) -> Path:
    """One edit on subject S0 (as the good pack's e0), with another target (seed 1)."""
    return random_pack(llama, layers=(0, 2), n_edits=1, seed=1).save_pretrained(tmp_path / "second")


def test_conflicting_edit_is_refused(llama, good_folder, second_folder):
    load_edits(llama, good_folder, name="first")
    with untouched(llama), raises_exactly(EditConflictError, "'The capital of S0 is': 'T0-0' .*first.* vs 'T1-0'"):
        load_edits(llama, second_folder, name="second")
    assert [p.name for p in stack_of(llama).list()] == ["first"]


def test_conflict_last_wins(llama, good_folder, second_folder):
    load_edits(llama, good_folder, name="first")
    with pytest.warns(UserWarning, match="newest edit wins"):
        load_edits(llama, second_folder, name="second", on_conflict="last")
    assert [(name, e.id, e.target_new) for name, e in stack_of(llama).edits()] == [
        ("first", "e1", "T0-1"), ("second", "e0", "T1-0")]
    # the same as attaching only the surviving edits to a fresh copy of the model
    fresh = tiny_model("llama")
    load_edits(fresh, EditPack.from_pretrained(good_folder).select(["e1"]), name="first")
    load_edits(fresh, second_folder, name="second")
    assert torch.equal(_logits(llama), _logits(fresh))


def test_conflict_last_wins_removes_a_fully_superseded_pack(llama, good_folder, tmp_path):
    load_edits(llama, good_folder, name="first")
    newer = random_pack(llama, layers=(0, 2), n_edits=2, seed=1).save_pretrained(tmp_path / "newer")
    with pytest.warns(UserWarning, match="newest edit wins"):
        load_edits(llama, newer, name="newer", on_conflict="last")
    assert [p.name for p in stack_of(llama).list()] == ["newer"]
    fresh = tiny_model("llama")
    load_edits(fresh, newer, name="newer")
    assert torch.equal(_logits(llama), _logits(fresh))


def test_conflict_inside_one_pack(llama, good_folder):
    """Two edits of one pack on the same subject and prompt with different targets."""
    edit_manifest(lambda m: m["edits"][1].update(subject="S0"))(good_folder)
    with untouched(llama), raises_exactly(EditConflictError, "'The capital of S0 is'.*'T0-0'.*'T0-1'"):
        load_edits(llama, good_folder)


# ----- 9. misuse of load_edits ---------------------------------------------------------

@pytest.mark.parametrize("name", ["mine", None], ids=["named", "default-name"])
def test_same_name_twice(llama, good_folder, name):
    load_edits(llama, good_folder, name=name)
    with untouched(llama), raises_exactly(KeditError, "attached already"):
        load_edits(llama, good_folder, name=name)
    assert len(stack_of(llama)) == 1


def test_bogus_verify(llama, good_folder):
    with untouched(llama), raises_exactly(ValueError, "verify='bogus'"):
        load_edits(llama, good_folder, verify="bogus")


def test_bogus_on_conflict(llama, good_folder):
    with untouched(llama), raises_exactly(ValueError, "on_conflict='bogus'"):
        load_edits(llama, good_folder, on_conflict="bogus")


# ----- beyond the brief: manifest fields of the wrong JSON type -------------------------
# Each is a PackFormatError naming the field, never an AttributeError or TypeError from deep inside.

WRONG_TYPES = [
    pytest.param(edit_manifest(lambda m: m.update(files=[])), "files", id="files-is-a-list"),
    pytest.param(edit_manifest(lambda m: m["tensors"].update({A0: [1, 64]})), "tensors", id="tensor-spec-is-a-list"),
    pytest.param(edit_manifest(lambda m: m["kind_config"]["modules"].update({MODULE0: [32, 64]})), "modules",
                 id="module-entry-is-a-list"),
    pytest.param(edit_manifest(lambda m: m["edits"][0].update(tensors=None)), "tensors", id="edit-tensors-null"),
    pytest.param(edit_manifest(lambda m: m["edits"][0].update(subject=["S0"])), "subject", id="subject-is-a-list"),
    pytest.param(edit_manifest(lambda m: m["base_model"].pop("fingerprint")), "fingerprint",
                 id="fingerprint-missing"),
    pytest.param(edit_manifest(lambda m: m["edits"][0].update(prompt=None)), "prompt", id="prompt-null"),
]


@pytest.mark.parametrize("breaker, field", WRONG_TYPES)
def test_manifest_field_of_wrong_type(llama, good_folder, breaker, field):
    breaker(good_folder)
    with untouched(llama), raises_exactly(PackFormatError, field):
        load_edits(llama, good_folder)


# ----- manifests that once loaded silently, or failed with an untyped error --------------

def write_raw_manifest(transform):
    """A breaker that rewrites the manifest's text with `transform(text) -> text`."""
    def breaker(folder):
        (folder / CONFIG_NAME).write_text(transform((folder / CONFIG_NAME).read_text()))
    return breaker


def _fingerprint_entry(change):
    return edit_manifest(lambda m: change(m["base_model"]["fingerprint"][MODULE0]))


MALFORMED = [
    pytest.param(edit_manifest(lambda m: m.update(colour="red")), r"unknown keys \['colour'\]", id="unknown-key"),
    pytest.param(edit_manifest(lambda m: m["files"].update({WEIGHTS_NAME: {}})), "'files' must be", id="files-no-sha"),
    pytest.param(edit_manifest(lambda m: m["files"][WEIGHTS_NAME].update(sha256="abc")), "'files' must be",
                 id="files-short-sha"),
    pytest.param(edit_manifest(lambda m: m.pop("files")), "'files' must be a JSON object", id="files-missing"),
    pytest.param(edit_manifest(lambda m: m["method"].update(name=3)), "'method' must be", id="method-name-int"),
    pytest.param(edit_manifest(lambda m: m["method"].update(steps=3)), "'method' must be", id="method-unknown-key"),
    pytest.param(edit_manifest(lambda m: m.update(method="rome")), "'method' must be a JSON object", id="method-text"),
    pytest.param(edit_manifest(lambda m: m["method"].update(hyperparameters=[1])), "'method' must be",
                 id="hyperparameters-list"),
    pytest.param(write_raw_manifest(lambda t: t.replace('"metrics": {}', '"metrics": {"deep": ' + "[" * 3000
                                                        + "]" * 3000 + "}", 1)), "nested deeper", id="nested-3000-deep"),
    pytest.param(write_raw_manifest(lambda t: t.replace('"metrics": {}', '"metrics": {"deep": ' + "[" * 70
                                                        + "]" * 70 + "}", 1)), "nested deeper", id="nested-70-deep"),
    pytest.param(write_raw_manifest(lambda t: t.replace('"format_version": 1', '"format_version": 1' + "0" * 100_000)),
                 "does not parse", id="100000-digit-integer"),
    pytest.param(edit_manifest(lambda m: m["tensors"][A0].update(dtype=["float32"])), "tensors.*must be",
                 id="dtype-is-a-list"),
    pytest.param(edit_manifest(lambda m: m["tensors"][A0].update(dtype={"a": 1})), "tensors.*must be",
                 id="dtype-is-a-dict"),
    pytest.param(edit_manifest(lambda m: m["tensors"][A0].update(offsets=[0, 1])), "tensors.*must be",
                 id="tensor-spec-extra-key"),
    pytest.param(_fingerprint_entry(lambda e: e.update(sample=e["sample"][:10])), "fingerprint.*64 finite numbers",
                 id="fingerprint-sample-short"),
    pytest.param(_fingerprint_entry(lambda e: e.update(sample=["a"] * 64)), "fingerprint.*64 finite numbers",
                 id="fingerprint-sample-text"),
    pytest.param(_fingerprint_entry(lambda e: e.update(sha256_bf16=7)), "fingerprint.*64 hex digits",
                 id="fingerprint-hash-int"),
    pytest.param(_fingerprint_entry(lambda e: e.update(shape=[[32], 64])), r"fingerprint.*\[ints\]",
                 id="fingerprint-shape-nested"),
    pytest.param(edit_manifest(lambda m: m["base_model"].update(secret="x")), r"base_model has fields.*'secret'",
                 id="base-model-unknown-key"),
    pytest.param(edit_manifest(lambda m: m["base_model"].update(hidden_size="32")), "hidden_size must be an integer",
                 id="base-model-hidden-size-text"),
    pytest.param(edit_manifest(lambda m: m["edits"][0].update(id="e0\n")), "edit ids must match",
                 id="edit-id-trailing-newline"),
]


@pytest.mark.parametrize("breaker, match", MALFORMED)
def test_malformed_manifest_is_a_pack_format_error(llama, good_folder, breaker, match):
    breaker(good_folder)
    with raises_exactly(PackFormatError, match):
        EditPack.from_pretrained(good_folder)
    with untouched(llama), raises_exactly(PackFormatError, match):
        load_edits(llama, good_folder)


def test_a_manifest_over_the_size_cap_is_refused_before_it_is_parsed(llama, good_folder, monkeypatch):
    import hf_kedit.pack.format as pack_module

    monkeypatch.setattr(pack_module, "MAX_MANIFEST_BYTES", 1000)
    monkeypatch.setattr(pack_module.json, "loads", lambda *a, **k: pytest.fail("the manifest was parsed"))
    with untouched(llama), raises_exactly(PackFormatError, "more than a manifest may be"):
        load_edits(llama, good_folder)


UNCHECKABLE = [  # well-formed packs that strict verification cannot check, or that do not fit
    pytest.param(edit_manifest(lambda m: m["base_model"].update(fingerprint={})), r"does not cover \[",
                 id="fingerprint-empty"),
    pytest.param(edit_manifest(lambda m: m["base_model"]["fingerprint"].pop(MODULE0)),
                 rf"does not cover \['{re.escape(MODULE0)}'\]", id="fingerprint-partial"),
    pytest.param(edit_manifest(lambda m: m["base_model"]["fingerprint"].update(
        {"model.layers.0.mlp": m["base_model"]["fingerprint"][MODULE0]})), "'model.layers.0.mlp', a LlamaMLP without",
        id="fingerprint-module-without-weight"),
]


@pytest.mark.parametrize("breaker, match", UNCHECKABLE)
def test_strict_verification_needs_a_fingerprint_of_every_module(llama, good_folder, breaker, match):
    breaker(good_folder)
    EditPack.from_pretrained(good_folder)  # well formed ...
    with untouched(llama), raises_exactly(IncompatiblePackError, match):
        load_edits(llama, good_folder)  # ... but not checkable against this model


def test_an_uncovered_pack_attaches_with_verify_shapes(llama, good_folder):
    edit_manifest(lambda m: m["base_model"].update(fingerprint={}))(good_folder)
    base = _logits(llama)
    load_edits(llama, good_folder, name="p", verify="shapes")
    assert not torch.equal(_logits(llama), base)


@pytest.mark.parametrize("source", [None, 3, ["a/b"]], ids=["none", "int", "list"])
def test_a_source_of_the_wrong_type(llama, source):
    with untouched(llama), raises_exactly(TypeError, "expected a folder or a Hub repo id"):
        load_edits(llama, source)


@pytest.mark.parametrize("source", ["user/..", "user/a--b", "user/na me", "a/b/c/d", "user/name\n"])
def test_a_source_that_is_no_folder_and_no_repo_id(llama, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with untouched(llama), raises_exactly(FileNotFoundError, "nor is it a Hub repo id"):
        load_edits(llama, source)


def test_factors_whose_merge_would_overflow_are_refused(llama, good_folder):
    """Finite factors (1e20 each) whose product is not: the load fails, not a later merge or forward."""
    rewrite_tensors(lambda ts: ts.update({n: t * 1e20 for n, t in ts.items()}))(good_folder)
    EditPack.from_pretrained(good_folder)
    with untouched(llama), raises_exactly(IncompatiblePackError, "would not stay finite"):
        load_edits(llama, good_folder)


def test_a_change_beyond_float16_is_refused_on_a_float16_model(tmp_path):
    """The same pack fits the fp32 model and not its fp16 copy, whose weights cannot hold the change."""
    model = tiny_model("llama")
    pack = random_pack(model, layers=(0,), scale=400.0)  # |ΔW| reaches about 1e5 > 65504
    half = tiny_model("llama", dtype=torch.float16)
    with untouched(half), raises_exactly(IncompatiblePackError, r"float16 weights it would not stay finite"):
        load_edits(half, pack, verify="shapes")
    load_edits(model, pack)
