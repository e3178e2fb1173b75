"""The locate-and-edit core ROME, MEMIT, AlphaEdit and STEAM share: the
subject's last token, context templates, the key k*, the values v* (optimised
in batches), ROME's rank-one closed form, and the layer loop MEMIT and
AlphaEdit spread a batch over. It reads the model and never leaves it changed."""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...anatomy import anatomy_of, hidden_states, input_device, weight_present
from ...batching import pad_id, padded
from ...errors import EditRequestError
from ...kinds.weight_delta import deltas_applied
from ..requests import subject_last_index
from .head_loss import head_cross_entropy
from ...pack import Edit
from ...partial_forward import layers_before, lm_head_at, replayed, run_until
from ...progress import StepBar
from ...sampling import per_model, sample_texts, seeded
from ..setting import setting
from ..teacher_forcing import frozen
from .stats import StatisticsConfig

LOCATE = "docs/locate-and-edit.md"


@dataclass
class ValueConfig:
    """The v* optimisation (ROME's compute_v): Adam on δ, NLL on the target,
    KL on "{subject} is a", weight decay, and a norm clamp."""

    steps: int = setting(20, "most Adam steps on δ", "ROME's reference code (GPT-2 XL: v_num_grad_steps 20; EasyEdit's "
                         "Llama settings: 25)")
    lr: float = setting(0.5, "Adam's step size on δ", "ROME's reference code and EasyEdit (v_lr 0.5); 0.75 and 1.0 "
                        f"measured here: faster, less locality ({LOCATE})")
    kl_factor: float = setting(0.0625, "weight of the KL term that keeps \"{subject} is a\"'s next-token "
                               "distribution", "ROME's reference code (kl_factor)")
    weight_decay: float = setting(1e-3, "weight of ‖δ‖ / ‖v‖² in the loss", "EasyEdit's Llama settings "
                                  "(v_weight_decay 1e-3; ROME's GPT-2 XL settings: 0.5)")
    clamp_norm_factor: float = setting(4.0, "δ's norm is kept at most this times v's", "ROME's reference code "
                                       "(clamp_norm_factor)")
    stop_nll: float = setting(5e-2, "stop once the target's mean NLL over the templates is below this (the target "
                              "at 95 % on average)", "ROME's reference code stops at a loss of 5e-2 (its whole "
                              "loss; here the NLL alone, chosen here)")
    batch_size: int = setting(8, "requests whose v* are optimised together, in one forward and backward per step "
                              "(each its own δ, Adam state and stopping point: the same v* as alone, up to rounding)",
                              f"measured here: 8 faster than 1 and 32 ({LOCATE}#batched-values)")
    head_loss: bool = setting(True, "the NLL and KL through the LM head in one chunked pass over its weight, where "
                              "the logits are the head's plain affine map (False: the log-softmax of the logits, as "
                              "ROME's code)", f"measured here: the same v* up to rounding, 0.90× the time ({LOCATE})")

    def __post_init__(self):
        """`EditRequestError` for a `batch_size` that is not a positive int."""
        if type(self.batch_size) is not int or self.batch_size < 1:
            raise EditRequestError(f"batch_size={self.batch_size!r}: give a positive int, the requests whose v* are "
                                   "optimised together (1: one at a time)")


@dataclass
class SpreadConfig(ValueConfig, StatisticsConfig):
    """The settings MEMIT and AlphaEdit share: the key statistics'
    (`StatisticsConfig`), the value optimisation's at the last edited layer
    (`ValueConfig`), and the layers the update spreads over."""

    layers: tuple = setting((0.13, 0.27), "the edited layers: indices, or a (start, end) pair of relative depths",
                            "EasyEdit's layers 4-8 for Llama-family models (0.13-0.27 is 4-8 of 30)")
    context_templates: tuple = setting(((5, 10),), "(how many, tokens) pairs of texts the model samples to put "
                                       "before the prompt", "MEMIT's code in EasyEdit (five of 10 tokens)")


def context_templates(model, tokenizer, counts) -> list[str]:
    """["{}"] plus short texts the model writes itself ("<text>. {}"), as ROME
    uses to make an edit hold in context: `counts` (how many, tokens) pairs;
    cached per model."""
    def sample():
        templates = ["{}"]
        with seeded(0):
            for n, length in counts:
                for text in sample_texts(model, tokenizer, n, length, top_k=5):
                    templates.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
        return templates
    return per_model(model, ("context_templates", template_counts(counts)), sample)


def template_counts(counts) -> tuple[tuple[int, int], ...]:
    """The context templates' (how many, tokens) pairs as a tuple, from any sequence
    of pairs (JSON gives lists); `EditRequestError` if `counts` is not one."""
    if not (isinstance(counts, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(type(x) is int and x >= 0 for x in p)
            for p in counts)):
        raise EditRequestError(f"context_templates={counts!r}: give (count, tokens) pairs, e.g. ((5, 5), (5, 10)) "
                               "for 5 texts of 5 tokens and 5 of 10")
    return tuple(tuple(p) for p in counts)


@contextmanager
def _capture(module, inputs: bool):
    """Record the module's input (or output hidden states) of each forward."""
    seen = []
    if inputs:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(hidden_states(out).detach()))
    try:
        yield seen
    finally:
        handle.remove()


def _batch(tokenizer, texts: list[str], device):
    rows = [tokenizer(t).input_ids for t in texts]
    ids, mask = padded(rows, pad_id(tokenizer), device)
    return ids, mask, [len(r) for r in rows]


@torch.no_grad()
def key_at_subject(model, tokenizer, module, edit: Edit, templates: list[str]) -> torch.Tensor:
    """k̄: the module's input at the subject's last token, averaged over templates."""
    texts = [t.format(edit.prompt).replace("{}", edit.subject) for t in templates]
    ids, mask, _ = _batch(tokenizer, texts, input_device(model))
    index = torch.tensor([subject_last_index(tokenizer, t, edit.subject) for t in texts], device=ids.device)
    with _capture(module, inputs=True) as seen:
        run_until(model, [module], input_ids=ids, attention_mask=mask)
    return seen[0][torch.arange(len(texts)), index].float().mean(0)


@torch.no_grad()
def io_at_subject(model, tokenizer, module, edit: Edit) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the module at the subject's last token of the bare prompt."""
    ids, mask, _ = _batch(tokenizer, [edit.text], input_device(model))
    index = subject_last_index(tokenizer, edit.text, edit.subject)
    with _capture(module, inputs=True) as k, _capture(module, inputs=False) as v:
        run_until(model, [module], input_ids=ids, attention_mask=mask)
    return k[0][0, index].float(), v[0][0, index].float()


@dataclass
class Alignment:
    """STEAM's latent alignment term: `weight` × the mean over rewriting prompts and
    `layers` (decoder layer modules) of 1 − cos(h − centre, anchor − centre) at
    the position that predicts the target's first token."""

    layers: list
    anchors: torch.Tensor  # [len(layers), d]
    weight: float
    centre: torch.Tensor | float = 0.0  # subtracted from both sides before the cosine


@dataclass
class Solved:
    """What one value optimisation reads at the subject's last token: v* (`value`),
    the module's input averaged over the templates (k̄, `key`), and its input and
    output in the bare prompt (`current_key`, `current_value`)."""

    value: torch.Tensor
    key: torch.Tensor
    current_key: torch.Tensor
    current_value: torch.Tensor


def optimise_value(model, tokenizer, module, edit: Edit, templates: list[str], config: ValueConfig,
                   alignment: Alignment | None = None, on_step: Callable[[], object] | None = None) -> Solved:
    """`optimise_values` for one request."""
    return optimise_values(model, tokenizer, module, [edit], templates, config, [alignment], on_step)[0]


def optimise_values(model, tokenizer, module, edits: list[Edit], templates: list[str], config: ValueConfig,
                    alignments: list[Alignment | None] | None = None,
                    on_step: Callable[[], object] | None = None) -> list[Solved]:
    """Per request, v* = the module's output (an MLP projection's for ROME, a
    decoder layer's hidden state for MEMIT) at the subject's last token plus the
    δ that makes the model say `edit.target_new` in every template (ROME's
    compute_v), optionally pulled towards STEAM's anchors (`alignments`, one per
    request or None). The requests run in one forward and backward per step, each
    with its own δ on its own rows, its own Adam state and its own stopping point,
    so each gets the v* it gets alone (up to rounding); once half of a batch has
    stopped, the rest run on in a batch of their own. The keys come from the
    same unedited pass: the target's tokens follow the subject, so they do not
    change them. `on_step()` once per request and step (`progress.StepBar.step`)."""
    alignments = alignments or [None] * len(edits)
    prompts = [_ValuePrompts.make(tokenizer, edit, templates) for edit in edits]
    n_templates, device = len(templates), input_device(model)
    deltas, optimizers, first = [], [], {}  # first: what the first (unedited) pass reads
    active, step, fused = list(range(len(edits))), 0, False
    with frozen(model), _head_parameters(model) as (head_weight, head_bias):
        while active:
            members = active
            rows = [row for i in members for row in prompts[i].rows]
            batch = SplitBatch.cut(rows, [c for i in members for c in prompts[i].cuts], pad_id(tokenizer), device)
            cache = batch.prefix_cache(model)
            plan = _LossPlan.make([prompts[i].target for i in members], n_templates, device)
            # δ sits at each row's first suffix column, the subject's last token.
            all_rows, starts = torch.arange(len(rows), device=device), batch.suffix_ids.shape[1] - batch.suffix_lengths
            owner = torch.tensor(members, device=device).repeat_interleave(n_templates + 1)
            head = _HeadTargets.make(plan, first["kl"][members], head_weight, head_bias) if fused else None

            def add_delta(m, args, out):
                h = hidden_states(out)
                # On a model spread over devices the edited layer may compute on another than the inputs.
                rows, columns = all_rows.to(h.device), starts.to(h.device)
                if not deltas:  # the first pass reads k and v unedited and starts each δ at zero
                    first["keys"] = args[0][rows, columns].detach().float().unflatten(0, (len(edits), -1))
                    bare = (plan.kl_rows - n_templates).to(h.device)  # template 0 is "{}": the bare prompt
                    first["value"] = h[bare, columns[bare]].detach().float()
                    deltas.extend(torch.zeros_like(v, requires_grad=True) for v in first["value"])
                h = h.index_put((rows, columns), h[rows, columns] + torch.stack(deltas)[owner.to(h.device)].to(h.dtype))
                return (h, *out[1:]) if isinstance(out, tuple) else h

            aligned = [j for j, i in enumerate(members) if alignments[i] is not None]
            mid_layers = alignments[members[aligned[0]]].layers if aligned else []
            mid_states = [[] for _ in mid_layers]
            handles = [module.register_forward_hook(add_delta)] + [
                layer.register_forward_hook(lambda m, args, out, seen=seen: seen.append(hidden_states(out)))
                for layer, seen in zip(mid_layers, mid_states)]

            def alignment_term(j):
                a, own = alignments[members[j]], slice(plan.kl_rows[j] - n_templates, plan.kl_rows[j])
                column = batch.suffix_ids.shape[1] - plan.lengths[j]  # predicts the target's first token
                states = torch.stack([seen[-1][own, column] for seen in mid_states])  # [layers, templates, d]
                centre = a.centre[:, None, :] if torch.is_tensor(a.centre) else 0.0
                cosine = F.cosine_similarity(states.float() - centre, a.anchors[:, None, :] - centre, dim=-1)
                return a.weight * (1 - cosine).mean()

            try:
                with replayed(layers_before(model, [module])):
                    while active:
                        # Suffixes end in one column: the last `plan.last` columns predict the
                        # targets (a KL prompt's last column its next token), so only those get logits.
                        heads, logits = batch.suffix_pass(model, cache, plan.last, logits=not fused)
                        if step == 0:
                            first["kl"] = F.log_softmax(logits[plan.kl_rows, -1].detach().float(), -1)
                            optimizers = [torch.optim.Adam([d], lr=config.lr) for d in deltas]
                            fused = config.head_loss and _HeadTargets.applies(model, heads, logits, plan,
                                                                              head_weight, head_bias)
                            head = _HeadTargets.make(plan, first["kl"], head_weight, head_bias) if fused else None
                        nll, kl = (head.losses(heads) if head is not None and step > 0
                                   else plan.losses(logits, first["kl"][members]))
                        own = torch.stack([deltas[i] for i in members])
                        decay = own.norm(dim=1) / first["value"][members].norm(dim=1) ** 2
                        loss = nll + config.kl_factor * kl + config.weight_decay * decay.to(nll.device)
                        if aligned:
                            loss = loss + torch.stack([alignment_term(j) if j in aligned else loss.new_zeros(())
                                                       for j in range(len(members))])
                        for seen in mid_states:
                            seen.clear()
                        nlls = dict(zip(members, nll.tolist()))
                        for _ in active:
                            if on_step:
                                on_step()
                        active = [i for i in active if nlls[i] >= config.stop_nll and step < config.steps - 1]
                        if not active:
                            break
                        for d in deltas:
                            d.grad = None
                        loss[[members.index(i) for i in active]].sum().backward()
                        with torch.no_grad():
                            for i in active:
                                optimizers[i].step()
                                limit = config.clamp_norm_factor * first["value"][i].norm()
                                if deltas[i].norm() > limit:
                                    deltas[i].mul_(limit / deltas[i].norm())
                        step += 1
                        if len(active) <= len(members) // 2:
                            break  # the stopped rows would be half the work: cut a batch of the rest
            finally:
                for handle in handles:
                    handle.remove()
    keys, values = first["keys"][:, :n_templates], first["value"]
    return [Solved(values[i] + deltas[i].detach(), keys[i].mean(0), keys[i, 0], values[i]) for i in range(len(edits))]


@contextmanager
def _head_parameters(model):
    """(weight, bias) of the LM head, where the value optimisation reads them
    outside the head's forward: an offloaded head's are brought to the device
    the head computes on for the block."""
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        yield None, None
        return
    with weight_present(head, device=None) as weight:
        bias = getattr(head, "bias", None)
        yield weight, (bias.detach() if bias is not None else None)


@dataclass
class _ValuePrompts:
    """One request's rows in the value optimisation: its rewriting prompts (each
    template around the prompt, followed by all but the last target token), then
    its KL prompt "{subject} is a"; where each is cut (the subject's last token),
    and the target's tokens."""

    rows: list[list[int]]
    cuts: list[int]
    target: list[int]

    @classmethod
    def make(cls, tokenizer, edit: Edit, templates: list[str]) -> "_ValuePrompts":
        target = tokenizer(" " + edit.target_new.strip(), add_special_tokens=False).input_ids
        prefix = tokenizer.decode(target[:-1])
        prompts = [t.format(edit.prompt).replace("{}", edit.subject) for t in templates] + [f"{edit.subject} is a"]
        texts = [p + prefix for p in prompts[:-1]] + prompts[-1:]
        # The subject is found in the prompt: a target that names it ("Vueling" -> "Vueling Holdings") must not move
        # the cut, and the update, into the target.
        return cls([tokenizer(t).input_ids for t in texts],
                   [subject_last_index(tokenizer, p, edit.subject) for p in prompts], target)


@dataclass
class _LossPlan:
    """Where each request's losses are read in a batch whose rows are, per request,
    its rewriting prompts (one per template) and then its KL prompt, and whose
    head is read at the last `last` columns (the longest target's length)."""

    last: int
    kl_rows: torch.Tensor  # [n]: each request's KL row
    target_rows: torch.Tensor  # [S]: the row of each target token's prediction
    target_cols: torch.Tensor  # [S]: its column among the last `last`
    target_ids: torch.Tensor  # [S]: the token
    target_owner: torch.Tensor  # [S]: its request
    counts: torch.Tensor  # [n]: target predictions per request
    lengths: list[int]  # each request's target length in tokens

    @classmethod
    def make(cls, targets: list[list[int]], n_templates: int, device) -> "_LossPlan":
        last = max(map(len, targets))
        rows, cols, ids, owner = [], [], [], []
        for i, target in enumerate(targets):
            for t in range(n_templates):
                rows += [i * (n_templates + 1) + t] * len(target)
                cols += range(last - len(target), last)
                ids += target
                owner += [i] * len(target)
        kl_rows = torch.arange(len(targets), device=device) * (n_templates + 1) + n_templates
        as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
        counts = torch.tensor([n_templates * len(t) for t in targets], device=device)
        return cls(last, kl_rows, as_tensor(rows), as_tensor(cols), as_tensor(ids), as_tensor(owner), counts,
                   list(map(len, targets)))

    def per_request(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over each request's target predictions of `values` [S]."""
        total = torch.zeros(len(self.counts), device=values.device, dtype=values.dtype)
        return total.index_add(0, self.target_owner, values) / self.counts

    def losses(self, logits: torch.Tensor, kl_initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per request: mean NLL of its target tokens, KL(p₀‖p) of its KL prompt) from the logits."""
        log_probs = F.log_softmax(logits[self.target_rows, self.target_cols].float(), -1)
        nll = self.per_request(-log_probs.gather(-1, self.target_ids[:, None])[:, 0])
        kl_log_probs = F.log_softmax(logits[self.kl_rows, -1].float(), -1)
        return nll, (kl_initial.exp() * (kl_initial - kl_log_probs)).sum(-1)


def spread_update(model, tokenizer, requests: list[Edit], config: SpreadConfig, layers: list[int], method: str,
                  progress: bool, solve) -> tuple[dict, dict]:
    """MEMIT's loop, shared with AlphaEdit: the v* of every request at the last
    layer's output, then layer by layer the keys and residuals on the model with
    the layers before updated, and `solve(layer, keys [d_ff, n], residual [d, n])`'s
    factors (A [n, d_ff], B [d, n]; column j edit j's share). Returns (per edit, per
    module, its factors; per module, the batch's factors)."""
    template_counts(config.context_templates)
    anatomy = anatomy_of(model)
    names = {layer: anatomy.mlp_out(layer) for layer in layers}
    last_block = model.get_submodule(anatomy.layer(layers[-1]))
    templates = context_templates(model, tokenizer, config.context_templates)
    bar = StepBar(requests, config.steps, f"{method}: optimising targets", disable=not progress)
    targets = torch.stack([solved.value for batch in bar.batches(config.batch_size)
                           for solved in optimise_values(model, tokenizer, last_block, batch, templates, config,
                                                         on_step=bar.step)], 1)
    applied, factors = {}, {e.id: {} for e in requests}
    for i, layer in enumerate(tqdm(layers, desc=f"{method}: solving layers", unit="layer", disable=not progress)):
        module = model.get_submodule(names[layer])
        with deltas_applied(model, applied):  # keys and residuals see the layers updated so far
            keys = torch.stack([key_at_subject(model, tokenizer, module, e, templates) for e in requests], 1)
            current = torch.stack([io_at_subject(model, tokenizer, last_block, e)[1] for e in requests], 1)
        A, B = solve(layer, keys, (targets - current) / (len(layers) - i))
        applied[names[layer]] = (A, B)
        for j, edit in enumerate(requests):
            factors[edit.id][names[layer]] = (A[j:j + 1], B[:, j:j + 1])
    return factors, applied


@dataclass
class SplitBatch:
    """Prompts cut just before the subject's last token. Nothing before that token
    depends on an edit at the subject, so the prefixes run once into a KV cache,
    and each optimisation step runs only the suffixes on top of it. Both parts are
    left-padded: the prefixes end in one column, and so do the suffixes."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    suffix_lengths: torch.Tensor

    @classmethod
    def cut(cls, rows: list[list[int]], cuts: list[int], pad: int, device) -> "SplitBatch":
        """Token rows, each cut before index `cuts[i]`."""
        prefix_ids, prefix_mask = padded([r[:c] or [pad] for r, c in zip(rows, cuts)], pad, device, left=True)
        # A prompt whose subject starts it has no prefix: its one pad column stays masked.
        prefix_mask[[i for i, c in enumerate(cuts) if c == 0], -1] = 0
        suffix_ids, suffix_mask = padded([r[c:] for r, c in zip(rows, cuts)], pad, device, left=True)
        return cls(prefix_ids, prefix_mask, suffix_ids, suffix_mask, suffix_mask.sum(1))

    def _positions(self, mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
        return (mask.cumsum(1) - 1).clamp(min=0) + offset

    @torch.no_grad()
    def prefix_cache(self, model):
        with lm_head_at(model, (slice(None), -1)):  # the pass is for the cache: skip the head's work
            out = model(input_ids=self.prefix_ids, attention_mask=self.prefix_mask,
                        position_ids=self._positions(self.prefix_mask), use_cache=True)
        return out[cache_argument(model)]

    def suffix_pass(self, model, cache, last: int, logits: bool = True):
        """(the LM head's input at the suffix's `last` columns [batch, last, hidden],
        the logits there [batch, last, vocab], or None if not `logits`); `cache`
        is copied because a forward appends to it."""
        offset = self.prefix_mask.sum(1, keepdim=True)
        with lm_head_at(model, (slice(None), slice(-last, None)), compute=logits) as read:
            out = model(input_ids=self.suffix_ids,
                        attention_mask=torch.cat([self.prefix_mask, self.suffix_mask], 1),
                        position_ids=self._positions(self.suffix_mask, offset),
                        **{cache_argument(model): copy.deepcopy(cache)}, use_cache=True).logits
        return read[0], (out if logits else None)


def cache_argument(model) -> str:
    """The name under which `model` takes and returns its KV cache: "cache" from
    transformers 5 on, "past_key_values" before (5.x still reads the old name,
    with a warning, until it drops it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class _HeadTargets:
    """The value optimisation's NLLs (the target tokens) and KLs (each KL prompt's
    next-token distribution against the first step's, p₀) as `head_cross_entropy`
    terms, which read the LM head's weight once per step instead of twice."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    plan: _LossPlan
    rows: torch.Tensor  # [S + n, hidden]: the targets' head rows, then each p₀ @ W
    row_bias: torch.Tensor
    entropy: torch.Tensor  # [n] H(p₀): KL(p₀‖p) = cross-entropy − H(p₀)

    @staticmethod
    @torch.no_grad()
    def applies(model, heads, logits, plan: _LossPlan, weight, bias) -> bool:
        """Whether the model's logits are its head's plain affine map (`weight`,
        `bias`) of the head's input: a model that scales or caps its logits, or
        whose head weight cannot be read (still on `meta`), keeps the plain loss."""
        if not isinstance(model.get_output_embeddings(), torch.nn.Linear) or weight.device.type == "meta":
            return False
        probe = plan.kl_rows[:1]
        expected = F.linear(heads[probe, -1], weight, bias).float()
        return torch.allclose(logits[probe, -1].float(), expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())

    @classmethod
    @torch.no_grad()
    def make(cls, plan: _LossPlan, kl_initial: torch.Tensor, weight, bias) -> "_HeadTargets":
        """The terms of the requests `plan` reads, whose p₀ are `kl_initial`
        (log-probabilities), for the head `weight` and `bias`."""
        p0 = kl_initial.exp()
        rows = torch.cat([weight[plan.target_ids].float(), p0 @ weight.float()])
        row_bias = (torch.cat([bias[plan.target_ids].float(), p0 @ bias.float()]) if bias is not None
                    else torch.zeros(len(rows), device=rows.device))
        return cls(weight, bias, plan, rows, row_bias, -(p0 * kl_initial).sum(-1))

    def losses(self, heads) -> tuple[torch.Tensor, torch.Tensor]:
        """(per request: mean NLL of its target tokens, KL(p₀‖p) of its KL prompt) from the head's input."""
        plan = self.plan
        states = torch.cat([heads[plan.target_rows, plan.target_cols], heads[plan.kl_rows, -1]])
        cross_entropy = head_cross_entropy(states, self.weight, self.bias, self.rows, self.row_bias)
        n = len(plan.kl_rows)
        return plan.per_request(cross_entropy[:-n]), cross_entropy[-n:] - self.entropy


def rank_one_update(key: torch.Tensor, value: torch.Tensor, current_key: torch.Tensor,
                    current_value: torch.Tensor, second_moment: torch.Tensor | None = None,
                    ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's closed form: ΔW = w uᵀ with u = C⁻¹k̄ / ‖C⁻¹k̄‖ (k̄ / ‖k̄‖ without C)
    and w = (v* − v) / (k·u), so that the update adds exactly v* − v to the
    module's output at the key k given as `current_key`: the bare prompt's key in
    ROME's code (the edited module then maps it to v*), k̄ itself in r-ROME's.
    Returns the weight_delta factors (A = uᵀ [1, in], B = w [out, 1])."""
    u = key.double()
    if second_moment is not None:
        C = second_moment.to(torch.float64, copy=True)  # the ridge is added in place
        # A small ridge keeps C invertible when the statistics saw few tokens.
        C.diagonal().add_(ridge * C.diagonal().mean())
        u = torch.linalg.solve(C, u)
    u = u / u.norm()
    w = (value.double() - current_value.double()) / (current_key.double() @ u)
    return u.float()[None, :], w.float()[:, None]
