"""Mutated packs of every kind, and what loading one did to a model: the engine of
the fuzz test (`test_fuzz_packs.py`) and of `benchmarks/fuzz_packs.py`.

A case starts from a good pack folder, changes its manifest (values replaced,
keys dropped or added, subtrees copied elsewhere, numbers and strings bent) or
its safetensors header (the same on the header's JSON, or raw bytes flipped),
and keeps the manifest's sha256 true to the weights file (mostly), so that the
checks behind the integrity check are what is reached. `run_case` then loads
it onto a model and says what happened.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_kedit import load_edits, remove_edits, stack_of
from hf_kedit.errors import KeditError
from hf_kedit.kinds import KINDS as KIND_REGISTRY
from hf_kedit.pack import CONFIG_NAME, WEIGHTS_NAME
from packs import random_basis_pack, random_codebook_pack, random_pack, random_steering_pack, random_svf_pack

KINDS = tuple(KIND_REGISTRY)  # every kind the library knows, in its order
TYPED = (KeditError, FileNotFoundError)  # what a bad pack may raise: hf_kedit's errors, or "no such pack"
# Values a mutation puts in: every JSON type, edge numbers, strings that look like ids, positions or paths.
VALUES = [None, True, False, 0, 1, -1, 2, 7, 1.5, -0.0, 2 ** 31, 2 ** 70, -(2 ** 70), 3e38, 1e308, float("nan"),
          float("inf"), "", "x", "e0", "e0\n", "l1", "l1\n", "f1+l1", "all", "float32", "float16", "int8", "../x",
          "model.layers.0.mlp", "model.embed_tokens", "lm_head", "final_norm", "layer", "sentence_embedding",
          "cosine", "every", "BAFT", "LOREFT", "sigmoid_rms", [], {}, [[1]], [1, 2], [0, 0], ["a"], {"a": 1},
          {"shape": [1], "dtype": "float32"}, "0" * 64]


@dataclass
class Outcome:
    """What loading one mutated pack did: `result` is "loaded", "typed" (an hf_kedit
    error), "untyped" (any other error) or "hang"; `broken` says the model was not
    exactly as before after a failed load, or after a loaded pack was removed, or
    that a loaded pack's forward raised."""

    result: str
    broken: bool
    error: str = ""


def good_folders(model, root: Path) -> dict[str, Path]:
    """One good pack of each kind for `model` (a tiny llama), saved under `root`."""
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        last = model(ids, output_hidden_states=True).hidden_states[-1][:, -1]
    packs = {"weight_delta": random_pack(model, layers=(0, 2), n_edits=2),
             "basis_intervention": random_basis_pack(model, layers=(0, 1), n_edits=2, positions="f1+l1", gated=True,
                                                     gate_floor=0.25),
             "steering_map": random_steering_pack(model, last[:2], threshold=0.5),
             "singular_scale": random_svf_pack(model, layers=(0, 2), n_edits=2),
             "codebook": random_codebook_pack(model, ids[:2], layer=1, radius=0.5)}
    return {kind: pack.save_pretrained(root / kind) for kind, pack in packs.items()}


def mutated_folder(good: Path, out: Path, rng: random.Random) -> Path:
    """A copy of `good` at `out` with 1-3 mutations of its manifest or its safetensors header."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(good, out)
    manifest = json.loads((out / CONFIG_NAME).read_text())
    if rng.random() < 0.7:
        for _ in range(rng.randint(1, 3)):
            mutate_json(manifest, rng)
    else:
        (out / WEIGHTS_NAME).write_bytes(mutate_safetensors((out / WEIGHTS_NAME).read_bytes(), rng))
    if rng.random() < 0.9 and isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        manifest["files"][WEIGHTS_NAME] = {"sha256": hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest()}
    (out / CONFIG_NAME).write_text(json.dumps(manifest))
    return out


def mutate_json(tree, rng: random.Random):
    """Change one node of the JSON value `tree` in place (the root is a dict or list)."""
    parent, key, value = _walk(tree, rng)
    action = rng.choice(("replace", "replace", "drop", "add", "copy", "bend"))
    if action == "drop" and parent is not None:
        del parent[key]
    elif action == "add" and isinstance(value, (dict, list)):
        new = copy.deepcopy(rng.choice(VALUES))
        value.append(new) if isinstance(value, list) else value.__setitem__(rng.choice(["x", "layer", "id", ""]), new)
    elif action == "copy" and parent is not None:
        parent[key] = copy.deepcopy(_walk(tree, rng)[2])
    elif action == "bend" and parent is not None:
        parent[key] = _bent(value, rng)
    elif parent is not None:
        parent[key] = copy.deepcopy(rng.choice(VALUES))
    return tree


def _walk(tree, rng: random.Random):
    """(parent, key, node) of a node reached by a random walk down from the root: each
    level's entries are equally likely, so a long list (a fingerprint's sample)
    draws no more mutations than a short field beside it."""
    parent, key, node = None, None, tree
    while isinstance(node, (dict, list)) and node and (parent is None or rng.random() < 0.8):
        keys = list(node) if isinstance(node, dict) else range(len(node))
        parent, key = node, rng.choice(keys)
        node = node[key]
    return parent, key, node


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """The file with its header's JSON mutated (keeping a consistent length prefix), or raw bytes flipped."""
    if rng.random() < 0.25 or len(data) < 8:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(out), 8 + rng.choice((8, 64, 1 << 12)))) if out else 0
            if out:
                out[i] ^= 1 << rng.randrange(8)
        return bytes(out)
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    for _ in range(rng.randint(1, 3)):
        mutate_json(header, rng)
    text = json.dumps(header).encode()
    if rng.random() < 0.5:  # safetensors pads headers to 8 bytes with spaces
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _bent(value, rng: random.Random):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, -value, value * 2 ** rng.randint(1, 80), 0))
    if isinstance(value, float):
        return rng.choice((value * 1e30, -value, value + 0.5, math.nextafter(value, math.inf)))
    if isinstance(value, str):
        return rng.choice((value + "\n", value[:-1], value.upper(), value * 2, "", value + " "))
    if isinstance(value, list):
        return value[::-1] if rng.random() < 0.5 else value + value[:1]
    return value


def model_state(model):
    """What a failed load must leave as it was: logits on fixed inputs, weights, hooks, packs."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return logits, {n: p.clone() for n, p in model.state_dict().items()}, hooks, len(stack_of(model))


def unchanged(model, reference) -> bool:
    """Whether `model` is in the state `reference` (a forward that raises is a change too)."""
    try:
        a = model_state(model)
    except Exception:  # noqa: BLE001 (a failed load that breaks the next forward broke the model)
        return False
    b = reference
    return (torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1])
            and a[2:] == b[2:])


def run_case(model, folder: Path, reference) -> Outcome:
    """Load `folder` onto `model` (in the state `reference` = `model_state(model)`), use it,
    remove it, and say what happened."""
    try:
        load_edits(model, folder, name="fuzz")
    except TYPED as e:
        return Outcome("typed", not unchanged(model, reference), f"{type(e).__name__}: {e}"[:200])
    except Exception as e:  # noqa: BLE001 (the point is to count them)
        return Outcome("untyped", not unchanged(model, reference), f"{type(e).__name__}: {e}"[:200])
    try:
        ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            model(ids)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
        broken, error = False, ""
    except Exception as e:  # noqa: BLE001
        broken, error = True, f"after a load: {type(e).__name__}: {e}"[:200]
    try:
        remove_edits(model, "fuzz")
    except Exception as e:  # noqa: BLE001
        return Outcome("loaded", True, f"removal: {type(e).__name__}: {e}"[:200])
    return Outcome("loaded", broken or not unchanged(model, reference), error)
