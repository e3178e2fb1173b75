"""STEAM: ROME whose value optimisation also pulls the edited fact's hidden states
at mid layers towards "semantic anchors": the mean hidden states of facts the
model already knows about the new object (from a fact base the user passes).
The pack is ROME's (`weight_delta`, rank one per edit)."""
from __future__ import annotations

import json
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..anatomy import anatomy_of, hidden_states
from ..pack import Edit, EditPack
from .locate import Alignment
from .memit import edit_layers
from .rome import ROMEConfig, rank_one_edits, resolve_layer


@dataclass
class STEAMConfig(ROMEConfig):
    """`fact_base`: a JSON file or a list of {"subject", "prompt", "object"} facts
    (the prompt holds the subject and ends before the object). `alignment_weight`
    (λ), `mid_layers` (indices or a (start, end) pair of relative depths, after
    the edit layer) and `anchor_facts` (how many known facts, sampled evenly
    across relations) are not given by the paper: defaults measured here, see
    docs/locate-and-edit.md. With no usable fact for a target, the edit falls
    back to ROME's loss with a warning, or fails if `strict`."""

    fact_base: object = None
    alignment_weight: float = 0.5
    mid_layers: tuple = (0.33, 0.67)
    anchor_facts: int = 16
    strict: bool = False


def steam_edit(model, tokenizer, requests: list[Edit], config: STEAMConfig | None = None,
               progress: bool = True) -> EditPack:
    """One rank-one STEAM update per request.

    Example:
        >>> config = STEAMConfig(fact_base="factbase.json")
        >>> pack = steam_edit(model, tokenizer, [edit], config)
    """
    config = config or STEAMConfig()
    if config.fact_base is None:
        raise ValueError("STEAM needs a fact base: set fact_base to a JSON file or a list of "
                         "{subject, prompt, object} facts")
    facts = read_fact_base(config.fact_base)
    anatomy = anatomy_of(model)
    mid_layers = edit_layers(config.mid_layers, anatomy.num_layers)
    # The edit layer is settled before the first alignment is needed ("auto" traces).
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    mid = [l for l in mid_layers if l > layer]
    if not mid:
        raise ValueError(f"mid_layers {config.mid_layers} has no layer after the edit layer {layer}")
    blocks = [model.get_submodule(anatomy.layer(l)) for l in mid]

    def alignment_for(edit: Edit, _layer: int) -> Alignment | None:
        anchors = semantic_anchors(model, tokenizer, blocks, facts, edit.target_new, config.anchor_facts)
        if anchors is None:
            message = f"no fact in the fact base that the model knows has the object {edit.target_new!r}"
            if config.strict:
                raise ValueError(message + " (strict=True)")
            warnings.warn(message + f": edit {edit.id!r} uses ROME's loss only", stacklevel=3)
            return None
        return Alignment(blocks, anchors, config.alignment_weight)

    fixed = replace(config, layer=layer)
    recorded = {"mid_layers": mid, "fact_base": config.fact_base if isinstance(config.fact_base, str) else "list"}
    return rank_one_edits(model, tokenizer, requests, fixed, "steam", alignment_for, recorded, progress)


def read_fact_base(source) -> list[dict]:
    """Facts as dicts with non-empty string subject, prompt and object."""
    facts = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else list(source)
    for i, fact in enumerate(facts):
        if not all(isinstance(fact.get(k), str) and fact[k].strip() for k in ("subject", "prompt", "object")):
            raise ValueError(f"fact base entry {i} needs non-empty strings subject, prompt and object: {fact!r}")
    return facts


@torch.no_grad()
def semantic_anchors(model, tokenizer, blocks, facts: list[dict], target: str, count: int,
                     seed: int = 0) -> torch.Tensor | None:
    """φ^ℓ: the mean hidden state, at the position predicting the object, of up to
    `count` facts whose object is `target` and that the model recalls (every
    object token is the argmax), sampled evenly across relations."""
    matching = [f for f in facts if f["object"].strip().lower() == target.strip().lower()]
    by_relation = defaultdict(list)
    for fact in matching:
        by_relation[fact["prompt"].replace(fact["subject"], "{}")].append(fact)
    rng = random.Random(seed)
    for group in by_relation.values():
        rng.shuffle(group)
    # Round-robin over relations: a balanced sample, not the most frequent relation's.
    ordered = [g[i] for i in range(max(map(len, by_relation.values()), default=0)) for g in by_relation.values()
               if i < len(g)]
    known, states = 0, []
    for fact in ordered:
        recalled, hidden = _recall(model, tokenizer, blocks, fact)
        if recalled:
            states.append(hidden)
            known += 1
            if known == count:
                break
    return torch.stack(states).mean(0) if states else None


def _recall(model, tokenizer, blocks, fact) -> tuple[bool, torch.Tensor]:
    prompt = tokenizer(fact["prompt"]).input_ids
    target = tokenizer(" " + fact["object"].strip(), add_special_tokens=False).input_ids
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(hidden_states(out)[0, len(prompt) - 1]))
               for b in blocks]
    try:
        logits = model(torch.tensor([prompt + target], device=model.device)).logits[0]
    finally:
        for h in handles:
            h.remove()
    predicted = logits[len(prompt) - 1:len(prompt) + len(target) - 1].argmax(-1).tolist()
    return predicted == target, torch.stack(seen).float()
