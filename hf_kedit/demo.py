"""`kedit demo`: the whole life of an edit on the default model, printed step by step."""
from __future__ import annotations

from pathlib import Path

import torch

from .anatomy import input_device
from .attach import load_edits, remove_edits
from .batching import pad_id
from .methods.locate.rome import rome_edit
from .models import load_model
from .pack import Edit

DEMO_EDIT = Edit("darrieux", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
NEIGHBOUR = "The mother tongue of Jacques Chirac is"


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of `prompt`."""
    ids = tokenizer(prompt, return_tensors="pt").to(input_device(model))
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_id(tokenizer))
    return tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(out_dir: str | Path = "demo-pack", model_name: str = "default", edit: Edit = DEMO_EDIT,
             overwrite: bool = False, device_map=None, offload_folder=None) -> bool:
    """Edit a fact, save the pack, reload it on a fresh model, remove it; True if
    every step behaved (the edit holds, the original answer comes back exactly).
    A pack already in `out_dir` is replaced only with `overwrite`; the model is
    loaded with `device_map` and `offload_folder` (as `load_model` takes them)."""
    print(f"1. loading {model_name!r}")
    model, tokenizer = load_model(model_name, device_map=device_map, offload_folder=offload_folder)
    before = greedy_answer(model, tokenizer, edit.text)
    print(f"   {edit.text} -> {before!r}")
    print(f"2. editing: {edit.text} {edit.target_true} => {edit.target_new} "
          "(rank-one ROME update of one MLP projection)")
    pack = rome_edit(model, tokenizer, [edit])
    pack.save_pretrained(out_dir, overwrite=overwrite)
    print(f"   saved the pack to {out_dir}/ ({pack.nbytes} bytes of tensors)")

    print("3. loading the pack onto a freshly loaded model")
    fresh, _ = load_model(model_name, device_map=device_map, offload_folder=offload_folder)
    ids = tokenizer(edit.text, return_tensors="pt").input_ids.to(input_device(fresh))
    with torch.no_grad():
        base_logits = fresh(ids).logits
    load_edits(fresh, out_dir, name="demo")
    after = greedy_answer(fresh, tokenizer, edit.text)
    neighbour = greedy_answer(fresh, tokenizer, NEIGHBOUR)
    print(f"   {edit.text} -> {after!r}")
    print(f"   (unrelated) {NEIGHBOUR} -> {neighbour!r}")

    print("4. removing the pack")
    remove_edits(fresh, "demo")
    restored = greedy_answer(fresh, tokenizer, edit.text)
    with torch.no_grad():
        exact = torch.equal(fresh(ids).logits, base_logits)
    print(f"   {edit.text} -> {restored!r}; logits bit-identical to the untouched model: {exact}")
    ok = after.lower().startswith(edit.target_new.lower()) and restored == before and exact
    print("demo " + ("passed" if ok else "FAILED"))
    return ok
