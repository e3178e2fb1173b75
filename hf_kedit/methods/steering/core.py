"""Activation steering edits: what SAKE and ActAdd share (SAKE's reference code,
`SAKE/distributions.py`; docs/methods.md).

Per edit, with P its prompt and paraphrases (the prompt first), o the true
object and o* the new one, the last-token states after the final norm of
- sources: each p in P, and its forced variant "Repeat this sentence: '{p} {o}'. {p}";
- targets: "Do not mention '{o}'. Repeat this sentence: '{p} {o*}'. {p}"
  (without the "Do not mention" clause, and without forced sources, when the
  request has no true object).
A method turns the two sets into a map (SAKE: the linear optimal-transport
map; ActAdd: the mean difference). The scope centroid is the mean router
representation of P; the threshold is given, or per edit `threshold_margin`
times the distance of the farthest prompt of P from the centroid. The router
measures the final norm's output, a decoder layer's output, or the prompt's
sentence embedding (`embedding_model`), behind the subject gate when
`subject_gate` is on (`hf_kedit.kinds.steering_map`). With `site` K the pack
is uniform: its states are read at decoder layer K's output and its maps act
there on every prompt at every position, as a llama.cpp control vector does.

Paraphrases come from `paraphrases`: None (the templates below, which frame
the prompt with prefixes so that it still ends right before the object), a
dict from edit id to a list (a dataset's own paraphrases), or a callable
`edit -> list[str]` (a local model, an OpenAI-compatible endpoint). The pack
records which (`paraphrase_source`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...anatomy import anatomy_of, hidden_states, input_device
from ...batching import by_length, pad_id, padded
from ...errors import EditRequestError
from ...kinds.prompt_calls import hidden_size
from ...kinds.sentence_embedding import EMBEDDING_MODELS, check_installed, embed
from ...kinds.steering_map import DISTANCES, APPLY, SteeringMapConfig, scope_distances
from ...pack import Edit, EditPack
from ...partial_forward import run_until
from ..builders import steering_map_pack
from ..requests import check_layers, check_requests
from ..setting import NOT_TUNED, setting
from .transport import FactoredMap

TEMPLATES = ("{}", "Fact: {}", "Here is a fact. {}", "Complete the sentence. {}", "Trivia. {}",
             "Encyclopedia entry. {}", "I learned this at school. {}", "Everyone knows this. {}",
             "True statement: {}", "Answer from memory. {}")
FORCED = "Repeat this sentence: '{p} {old}'. {p}"
TARGET = "Do not mention '{old}'. Repeat this sentence: '{p} {new}'. {p}"
TARGET_WITHOUT_OLD = "Repeat this sentence: '{p} {new}'. {p}"
STEERING = "docs/steering.md"
MIN_THRESHOLD = 1e-6  # a scope no prompt can be exactly inside is still a valid threshold

Paraphrases = dict[str, list[str]] | Callable[[Edit], list[str]] | None


@dataclass
class SteeringConfig:
    """Settings SAKE and ActAdd share: the prompts a map is fitted on, and the
    scope router that decides where it acts."""

    paraphrases: Paraphrases = setting(None, "None (templates), {edit id: [texts]} or a callable edit -> [texts]: "
                                       "filled-in prompts that end right before the object (the edit's own prompt "
                                       "is added first if missing)", "chosen here: templates need no data")
    min_paraphrases: int = setting(2, "the fewest distinct prompts, the edit's own counted, an edit needs",
                                   NOT_TUNED)
    router_layer: int | None = setting(None, "the decoder layer whose last-token state the router reads (None: "
                                       "the final norm's output)", "SAKE's reference code (the last hidden state)")
    embedding_model: str | None = setting(None, "a sentence-embedding model the router measures prompts with "
                                          "instead (hf_kedit.kinds.sentence_embedding.EMBEDDING_MODELS)",
                                          "measured here: no better than the hidden state once the subject gate "
                                          f"decides ({STEERING})")
    subject_gate: bool = setting(True, "only prompts that name the edit's subject are in its scope", "measured "
                                 f"here on held-apart cases 100-139: locality at the unedited model's ({STEERING})")
    metric: str = setting("cosine", "the router's distance: \"cosine\" or \"euclidean\"", NOT_TUNED)
    threshold: float | None = setting(2.0, "the scope distance (2.0 is the whole cosine range: the subject gate "
                                      "alone decides), or None for threshold_margin × the farthest of the edit's "
                                      "own prompts", f"measured here on held-apart cases 100-139 ({STEERING})")
    threshold_margin: float = setting(1.1, "with threshold=None, the scope is this times the farthest of the "
                                      "edit's own prompts", NOT_TUNED)
    apply: str = setting("first", "when the map acts in generation: \"first\" (the prompt's last token) or "
                         "\"every\" (every generated token too)", f"measured here: \"every\" costs fluency "
                         f"({STEERING})")
    site: int | None = setting(None, "None, or the decoder layer whose output the maps act on at every position "
                               "of every prompt (a uniform pack, exportable as a llama.cpp control vector; needs "
                               "subject_gate=False and apply=\"every\")", "chosen here: today's steering unless asked")
    batch_size: int = setting(16, "prompts per forward pass while fitting", "chosen here: speed only")

    def __post_init__(self):
        """`EditRequestError` for settings no steering method can use (checks that need no model)."""
        if self.metric not in DISTANCES or self.apply not in APPLY:
            raise EditRequestError(f"metric={self.metric!r}, apply={self.apply!r}: use a metric of {DISTANCES} and "
                                   f"an apply mode of {APPLY}")
        if type(self.min_paraphrases) is not int or self.min_paraphrases < 1:
            raise EditRequestError(f"min_paraphrases={self.min_paraphrases!r}: give a positive number of prompts")
        top = 2.0 if self.metric == "cosine" else float("inf")
        if self.threshold is not None and not 0 < self.threshold <= top:
            raise EditRequestError(f"threshold={self.threshold!r} is out of range for the {self.metric} metric: "
                                   f"give a distance in (0, {top:g}], or None to derive one per edit")
        if not self.threshold_margin > 0 or type(self.batch_size) is not int or self.batch_size < 1:
            raise EditRequestError(f"threshold_margin={self.threshold_margin!r} and batch_size={self.batch_size!r} "
                                   "must be positive")
        if self.embedding_model is not None and (self.embedding_model not in EMBEDDING_MODELS
                                                 or self.router_layer is not None):
            raise EditRequestError(f"embedding_model={self.embedding_model!r} with router_layer="
                                   f"{self.router_layer!r}: give one of {sorted(EMBEDDING_MODELS)} and no "
                                   "router_layer, or embedding_model=None for a hidden-state router")
        if type(self.subject_gate) is not bool:
            raise EditRequestError(f"subject_gate={self.subject_gate!r}: give True or False")
        if self.router_layer is not None and type(self.router_layer) is not int:
            raise EditRequestError(f"router_layer={self.router_layer!r}: give a decoder layer index, or None for "
                                   "the final norm's output")
        if self.site is not None and (type(self.site) is not int or self.subject_gate or self.apply != "every"
                                      or self.metric != "cosine" or self.threshold != 2.0
                                      or self.embedding_model is not None or self.router_layer is not None):
            raise EditRequestError(f"site={self.site!r} makes a uniform pack that steers every prompt at every "
                                   "position, with no router: give a decoder layer index with subject_gate=False, "
                                   "apply=\"every\" and the router settings at their defaults (metric \"cosine\", "
                                   "threshold 2.0, no embedding_model or router_layer)")


Fit = Callable[[torch.Tensor, torch.Tensor], FactoredMap]


def steering_edit(model, tokenizer, requests: list[Edit], config: SteeringConfig, method: str, fit: Fit,
                  progress: bool = True) -> EditPack:
    """Per request, the source and target states, `fit(sources, targets)` [n, d] float64
    -> its map, and its scope; a `steering_map` pack. Every request and setting is
    checked, and every paraphrase set gathered, before the model runs."""
    check_requests(requests, subject_slot=False)
    anatomy = anatomy_of(model)
    _check_settings(config, anatomy.num_layers)
    prompts = {edit.id: paraphrase_set(edit, config) for edit in requests}
    sets = {edit.id: steering_sets(edit, prompts[edit.id]) for edit in requests}
    texts = [t for edit in requests for t in (*sets[edit.id][0], *sets[edit.id][1])]
    kind_config = SteeringMapConfig(
        hidden_size=hidden_size(model), representation="sentence_embedding" if config.embedding_model else
        "final_norm" if config.router_layer is None else "layer", layer=config.router_layer,
        embedding_model=config.embedding_model, metric=config.metric, apply=config.apply,
        subject_gate=config.subject_gate, site=config.site)
    kind_config.scope_size = (EMBEDDING_MODELS[config.embedding_model][2] if config.embedding_model
                              else kind_config.hidden_size)
    # A uniform pack's maps are fitted where they act; its centroids stay final-norm states, as the format says.
    fitted_at = anatomy.final_norm if config.site is None else anatomy.layer(config.site)
    states = last_token_states(model, tokenizer, texts, list(dict.fromkeys([fitted_at, anatomy.final_norm])),
                               config.batch_size, progress)
    fitted, final = states[fitted_at], states[anatomy.final_norm]
    # A final-norm router measures the prompts, which lead each edit's sources: no second pass.
    router = None if kind_config.representation == "final_norm" else router_representations(
        model, tokenizer, kind_config, [p for e in requests for p in prompts[e.id]], config.batch_size)

    parts, offset, start = {}, 0, 0
    for edit in requests:
        n_source, n_target = map(len, sets[edit.id])
        xs, xt = fitted[offset:offset + n_source], fitted[offset + n_source:offset + n_source + n_target]
        n_prompts = len(prompts[edit.id])
        own = final[offset:offset + n_prompts] if router is None else router[start:start + n_prompts]
        offset += n_source + n_target
        edit_map = fit(xs.double(), xt.double())
        start += n_prompts
        centroid = own.mean(0)
        threshold = config.threshold
        if threshold is None:
            farthest = scope_distances(own, centroid[None], config.metric).max().item()
            threshold = max(config.threshold_margin * farthest, MIN_THRESHOLD)
        parts[edit.id] = {"map.basis": edit_map.basis, "map.core": edit_map.core, "map.bias": edit_map.bias,
                          "scope.centroid": centroid, "scope.threshold": torch.tensor([threshold])}
    hyperparameters = {**asdict(config), "paraphrases": None, "paraphrase_source": _source_name(config.paraphrases)}
    return steering_map_pack(model, method, hyperparameters, requests, kind_config, parts)


def paraphrase_set(edit: Edit, config: SteeringConfig) -> list[str]:
    """The edit's prompt followed by its distinct paraphrases, from `config.paraphrases`;
    `EditRequestError` when there are fewer than `config.min_paraphrases`.

    Example:
        >>> paraphrase_set(Edit("e0", "Paris", "{} is the capital of", "Italy", "France"), SteeringConfig())[:2]
        ['Paris is the capital of', 'Fact: Paris is the capital of']
    """
    source = config.paraphrases
    if source is None:
        texts = [template.format(edit.text) for template in TEMPLATES]
    elif isinstance(source, dict):
        if edit.id not in source:
            raise EditRequestError(f"paraphrases has no entry for edit {edit.id!r}: give a list for every edit "
                                   "(its dataset's paraphrases), or paraphrases=None for templates")
        texts = source[edit.id]
    else:
        texts = source(edit)
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or \
            not all(isinstance(t, str) for t in texts):
        raise EditRequestError(f"the paraphrases of edit {edit.id!r} must be a list of strings, got {texts!r}")
    distinct = list(dict.fromkeys(t.strip() for t in [edit.text, *texts] if t.strip()))
    if len(distinct) < config.min_paraphrases:
        raise EditRequestError(f"edit {edit.id!r} has {len(distinct) - 1} distinct paraphrase(s) besides its "
                               f"prompt; fitting its map needs at least min_paraphrases={config.min_paraphrases} "
                               "distinct prompts in all: supply more paraphrases or use the templates "
                               "(paraphrases=None)")
    return distinct


def steering_sets(edit: Edit, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(source texts, target texts) of an edit whose prompt and paraphrases are `prompts`.

    Example:
        >>> edit = Edit("e0", "Paris", "{} is the capital of", "Italy", "France")
        >>> steering_sets(edit, ["Paris is the capital of"])[1]
        ["Do not mention 'France'. Repeat this sentence: 'Paris is the capital of Italy'. Paris is the capital of"]
    """
    old, new = (edit.target_true or "").strip(), edit.target_new.strip()
    if not old:
        return list(prompts), [TARGET_WITHOUT_OLD.format(p=p, new=new) for p in prompts]
    return ([*prompts, *(FORCED.format(p=p, old=old) for p in prompts)],
            [TARGET.format(p=p, old=old, new=new) for p in prompts])


@torch.no_grad()
def last_token_states(model, tokenizer, texts: list[str], modules: list[str], batch_size: int = 16,
                      progress: bool = False) -> dict[str, torch.Tensor]:
    """Per module name, [N, d] float32: its output at the last token of each text, read
    before any attached pack's hook on that module acts (the state a router sees)."""
    device = input_device(model)
    rows = [tokenizer(t).input_ids for t in texts]
    batches = by_length(rows, batch_size)
    out = {m: [None] * len(rows) for m in modules}
    captured = {}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda module, args, output, m=m: captured.__setitem__(m, hidden_states(output)), prepend=True)
        for m in modules]
    try:
        # the bar counts texts: batches of long texts hold fewer of them
        with tqdm(total=len(rows), desc="steering states", disable=not progress) as bar:
            for batch in batches:
                ids, mask = padded([rows[i] for i in batch], pad_id(tokenizer), device)
                run_until(model, [model.get_submodule(m) for m in modules], input_ids=ids, attention_mask=mask)
                last = mask.sum(1) - 1
                for m in modules:
                    states = captured[m][torch.arange(len(ids), device=device), last].float().cpu()
                    for i, state in zip(batch, states):
                        out[m][i] = state
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return {m: torch.stack(states) for m, states in out.items()}


def router_representations(model, tokenizer, config: SteeringMapConfig, prompts: list[str],
                           batch_size: int = 16) -> torch.Tensor:
    """[N, scope_size] float32: what a router of kind config `config` measures of each prompt."""
    if config.representation == "sentence_embedding":
        return embed(config.embedding_model, prompts)
    anatomy = anatomy_of(model)
    module = anatomy.final_norm if config.layer is None else anatomy.layer(config.layer)
    return last_token_states(model, tokenizer, prompts, [module], batch_size)[module]


def _source_name(paraphrases: Paraphrases) -> str:
    """How the pack records where its paraphrases came from."""
    if paraphrases is None:
        return "templates"
    if isinstance(paraphrases, dict):
        return "supplied"
    return f"callable:{getattr(paraphrases, '__qualname__', type(paraphrases).__name__)}"


def _check_settings(config: SteeringConfig, num_layers: int) -> None:
    """What the config's own checks cannot know: the installed router model and the model's depth."""
    if config.embedding_model is not None:
        check_installed(config.embedding_model)
    for name in ("router_layer", "site"):
        if getattr(config, name) is not None:
            check_layers([getattr(config, name)], num_layers, name)
