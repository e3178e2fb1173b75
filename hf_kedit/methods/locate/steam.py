"""STEAM: ROME whose value optimisation also pulls the edited fact's hidden states
at mid layers towards "semantic anchors": the mean hidden states of facts the
model already knows about the new object, from a fact base the user passes or,
without one, from text the model itself writes about the new object.
The pack is ROME's (`weight_delta`, rank one per edit)."""
from __future__ import annotations

import json
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...anatomy import anatomy_of, hidden_states, input_device
from ...batching import pad_id, padded
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...pack.hub import is_repo_id, resolve_source
from ...partial_forward import lm_head_at
from ...sampling import lead_ups, seeded, sibling_names
from ..requests import check_requests, edit_layers, resolve_layer
from ..setting import setting
from .core import LOCATE, Alignment, template_counts
from .rome import ROMEConfig, rank_one_edits

RECALL_BATCH = 32  # facts per forward while looking for anchors


@dataclass
class STEAMConfig(ROMEConfig):
    """STEAM's settings: ROME's, plus the alignment to anchors from a fact base.
    The paper leaves λ, the mid layers, the sample size and the recall filter
    open. With no usable fact for a target, the edit falls back to ROME's loss
    with a warning, or fails if `strict`."""

    fact_base: object = setting(None, "a JSON file or a list of {\"subject\", \"prompt\", \"object\"} facts "
                                "(the prompt holds the subject and ends before the object), or a Hub dataset repo "
                                "id whose facts.json holds them; None: facts from the model itself (`model_facts`)", "none: the model's own facts, so STEAM runs "
                                "without a fact base")
    model_fact_texts: int = setting(12, "with no fact base: texts the model writes about the new target per frame "
                                    "(two frames), and names it writes with the subject", "chosen here on "
                                    "counterfact.json cases 0-11, not tuned")
    alignment_weight: float = setting(2.0, "λ, the weight of the alignment term", "measured here on 20 cases: λ 0.5, "
                                      f"2 and 8 within 0.05 of each other, 2 the best generality ({LOCATE})")
    mid_layers: tuple = setting((0.33, 0.67), "the layers whose states are aligned, after the edited one: indices "
                                "or a (start, end) pair of relative depths", "chosen here, not tuned (the paper "
                                "leaves it open)")
    anchor_facts: int = setting(16, "how many known facts with the new target as object, sampled evenly across "
                                "relations", "chosen here, not tuned (the paper leaves it open)")
    recall_top_k: int = setting(5, "a fact is known when its object's first token is among the model's top k",
                                f"measured here: 27 of 40 targets found an anchor, 19 with greedy recall ({LOCATE})")
    centre_anchors: bool = setting(True, "compare h − μ with φ − μ (μ: the mean state over facts of any object)",
                                   "measured here: raw cosines of unrelated states are 0.75-0.98 on the default "
                                   f"model, so without centring STEAM gave ROME's scores ({LOCATE})")
    strict: bool = setting(False, "fail, instead of falling back to ROME's loss, when a target has no anchor",
                           "chosen here: a fact base rarely covers every target")


def steam_edit(model, tokenizer, requests: list[Edit], config: STEAMConfig | None = None,
               progress: bool = True) -> EditPack:
    """One rank-one STEAM update per request.

    Example:
        >>> config = STEAMConfig(fact_base="factbase.json")
        >>> pack = steam_edit(model, tokenizer, [edit], config)
    """
    check_requests(requests)
    config = config or STEAMConfig()
    template_counts(config.context_templates)
    given = None if config.fact_base is None else read_fact_base(config.fact_base)
    anatomy = anatomy_of(model)
    mid_layers = edit_layers(config.mid_layers, anatomy.num_layers, "mid_layers")
    # The edit layer is settled before the anchors, which are read after it ("auto" traces).
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    mid = [l for l in mid_layers if l > layer]
    if not mid:
        raise EditRequestError(f"mid_layers {config.mid_layers} has no layer after the edit layer {layer}: "
                               "give mid layers deeper than the edit layer")
    blocks = [model.get_submodule(anatomy.layer(l)) for l in mid]
    facts, reference = (model_facts(model, tokenizer, requests, config.model_fact_texts) if given is None
                        else (given, given))
    # Anchors come before the statistics and the optimisation, so that strict=True fails fast.
    anchors = {target: semantic_anchors(model, tokenizer, blocks, facts, target, config.anchor_facts,
                                       config.recall_top_k)
               for target in {edit.target_new for edit in requests}}
    for edit in requests:
        if anchors[edit.target_new] is None:
            _no_anchor(edit, config.strict)

    anchored = any(found is not None for found in anchors.values())
    centre = mean_fact_state(model, tokenizer, blocks, reference or facts) if config.centre_anchors and anchored \
        else 0.0

    def alignment_for(edit: Edit, _layer: int) -> Alignment | None:
        found = anchors[edit.target_new]
        return None if found is None else Alignment(blocks, found, config.alignment_weight, centre)

    fixed = replace(config, layer=layer)
    source = "model" if config.fact_base is None else config.fact_base if isinstance(config.fact_base, str) else "list"
    recorded = {"mid_layers": mid, "fact_base": source}
    return rank_one_edits(model, tokenizer, requests, fixed, "steam", alignment_for, recorded, progress)


def _no_anchor(edit: Edit, strict: bool) -> None:
    message = f"no fact in the fact base that the model knows has the object {edit.target_new!r}"
    if strict:
        raise EditRequestError(f"{message} (strict=True): pass a fact base with facts of that object which the "
                               "model completes correctly, or set strict=False to fall back to ROME's loss for "
                               "this edit")
    warnings.warn(f"{message}: edit {edit.id!r} uses ROME's loss only", stacklevel=3)


@torch.no_grad()
def model_facts(model, tokenizer, requests: list[Edit], texts: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A fact base from the model itself, for STEAM without one: (facts about the
    new targets, facts of other objects).
    - About each new target: the sentence starts that lead up to it in `texts`
      texts per frame the model writes about it (`sampling.lead_ups`), each as a
      fact whose prompt is that start ("The capital of England is" → London).
      `semantic_anchors` keeps those the model completes with the target
      without the text around them.
    - Of other objects: the request's own prompt with names the model writes
      beside its subject ("The mother tongue of Jean Gabin is"), for the mean
      state μ that the anchors are centred on.
    Each target and subject is sampled with the same fixed seed, so its facts do
    not depend on the rest of the batch.

    Example:
        >>> about, other = model_facts(model, tokenizer, [edit], texts=12)
    """
    about, other = [], []
    for target in dict.fromkeys(edit.target_new for edit in requests):
        with seeded(seed):
            about += [{"subject": lead, "prompt": lead, "object": target}
                      for lead in lead_ups(model, tokenizer, target, texts)]
    for edit in requests:
        with seeded(seed):
            names = sibling_names(model, tokenizer, edit.subject, texts)
        other += [{"subject": name, "prompt": edit.prompt.replace("{}", name), "object": edit.target_new}
                  for name in names]
    return about, other


FACT_BASE_FILE = "facts.json"  # in a Hub dataset repo that holds a fact base


def read_fact_base(source) -> list[dict]:
    """Facts as dicts with non-empty string subject, prompt and object, from a JSON
    file holding a list of them, from a Hub dataset repo ("user/facts") whose
    facts.json does, or from such a list (`hf_kedit.evaluate.benchmark_facts`
    makes one from a benchmark file).

    Example:
        >>> read_fact_base([{"subject": "Worf", "prompt": "Worf speaks", "object": "Klingon"}])
    """
    if isinstance(source, str) and _is_dataset_id(source):
        folder, _ = resolve_source(str(source), allow_patterns=[FACT_BASE_FILE], repo_type="dataset")
        source = folder / FACT_BASE_FILE
    facts = _read_json_facts(Path(source)) if isinstance(source, (str, Path)) else source
    if not isinstance(facts, (list, tuple)):
        raise EditRequestError(f"the fact base must be a list of {{subject, prompt, object}} facts, got "
                               f"{type(facts).__name__}")
    for i, fact in enumerate(facts):
        if not (isinstance(fact, dict)
                and all(isinstance(fact.get(k), str) and fact[k].strip() for k in ("subject", "prompt", "object"))):
            raise EditRequestError(f"fact base entry {i} needs non-empty strings subject, prompt and object: "
                                   f"{fact!r}")
    return list(facts)


def _is_dataset_id(text: str) -> bool:
    """"user/name" and not a path here: a JSON file's name ("facts.json") is never taken for a repo."""
    return text.count("/") == 1 and is_repo_id(text) and not text.endswith(".json") and not Path(text).exists()


def _read_json_facts(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no such fact base file: {path} (fact_base is a JSON file holding a list of "
                                "{subject, prompt, object} facts, a Hub dataset repo id whose facts.json holds "
                                "them, or such a list)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EditRequestError(f"the fact base {path} is not valid JSON ({e}): it must hold a list of "
                               "{subject, prompt, object} facts") from None


@torch.no_grad()
def semantic_anchors(model, tokenizer, blocks, facts: list[dict], target: str, count: int, top_k: int = 5,
                     seed: int = 0) -> torch.Tensor | None:
    """φ^ℓ: the mean hidden state, at the position predicting the object, of up to
    `count` facts whose object is `target` and that the model recalls (the
    object's first token among its `top_k` predictions), sampled evenly across
    relations."""
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
    states = []
    for start in range(0, len(ordered), RECALL_BATCH):  # in order, so the sample stays balanced
        recalled, hidden = _recall(model, tokenizer, blocks, ordered[start:start + RECALL_BATCH], top_k)
        states += [h for known, h in zip(recalled, hidden) if known]
        if len(states) >= count:
            break
    return torch.stack(states[:count]).mean(0) if states else None


@torch.no_grad()
def mean_fact_state(model, tokenizer, blocks, facts: list[dict], count: int = 64, seed: int = 0) -> torch.Tensor:
    """μ^ℓ: the mean hidden state at the position predicting the object, over
    `count` facts drawn from the whole fact base (any object)."""
    sample = random.Random(seed).sample(facts, min(count, len(facts)))
    return _recall(model, tokenizer, blocks, sample, 1)[1].mean(0)


def _recall(model, tokenizer, blocks, facts: list[dict], top_k: int) -> tuple[list[bool], torch.Tensor]:
    """Per fact, whether the object's first token is among the model's `top_k`
    predictions after the prompt, and the blocks' hidden states there [n, L, d]."""
    rows = [tokenizer(f["prompt"]).input_ids for f in facts]
    firsts = [tokenizer(" " + f["object"].strip(), add_special_tokens=False).input_ids[0] for f in facts]
    ids, mask = padded(rows, pad_id(tokenizer), input_device(model))
    last = torch.tensor([len(r) - 1 for r in rows], device=ids.device)
    at_last = torch.arange(len(rows), device=ids.device), last
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(hidden_states(out)[at_last])) for b in blocks]
    try:
        with lm_head_at(model, at_last):
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    top = logits.topk(top_k).indices.tolist()
    return [first in t for first, t in zip(firsts, top)], torch.stack(seen, 1).float()
