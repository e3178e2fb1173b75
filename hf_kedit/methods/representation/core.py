"""Training basis interventions: the loop ReFT and BaFT share.

Per edit, one rank-r intervention at one layer's output is trained on the
target tokens' teacher-forced cross-entropy given the prompt, with the model
frozen; it acts at the prompt positions of the config, as at inference. R is
kept orthonormal by `torch.nn.utils.parametrizations.orthogonal`, as pyreft
does. W starts equal to R and b at 0, so Φ starts as the identity and the
edit grows from the unedited model (pyreft starts W at random). BaFT's gates
are fitted first, on their own loss (`baft.py`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from ...anatomy import anatomy_of, hidden_states, input_device
from ...errors import EditRequestError
from ...kinds.basis_intervention import BasisInterventionConfig, gate_logits, intervention_delta, parse_positions
from ...batching import pad_id, padded
from ...kinds.prompt_calls import hidden_size, prompt_lengths, select_positions
from ...pack import Edit, EditPack
from ...progress import StepBar
from ...partial_forward import run_until
from ..builders import basis_intervention_pack
from ..setting import NOT_TUNED, setting
from ..teacher_forcing import Kept, fit_target, frozen, teacher_forced
from ..requests import check_requests, resolve_layer, subject_last_index


@dataclass
class InterventionConfig:
    """Settings ReFT and BaFT share: where the intervention acts and how it is trained."""

    layer: float | int | str = setting(0.4, "the intervened layer's output: an index, a relative depth in [0, 1) "
                                       "(rounded) or \"auto\" (causal tracing)", NOT_TUNED)
    rank: int = setting(4, "r of each edit's intervention (at most the hidden size)", NOT_TUNED)
    positions: str = setting("l1", "the intervened prompt positions, pyreft's \"f{n}+l{m}\" (first n, last m), or "
                             "\"all\"", "chosen here: the last prompt token predicts the first target token and "
                             "leaves the positions every prompt shares, such as the first, alone")
    steps: int = setting(100, "most Adam steps per edit", NOT_TUNED)
    lr: float = setting(1e-2, "Adam's step size", NOT_TUNED)
    stop_loss: float = setting(0.05, "stop once the target's cross-entropy is below this", NOT_TUNED)
    seed: int = setting(0, "seeds the intervention's random start", "any: a fixed seed makes packs reproducible")


class Intervention(nn.Module):
    """One edit's trainable intervention: `rotation` (R [r, d], orthonormal rows),
    `source` (W, b) and, gated, `gate` (G, c), which acts as 0 below `floor`.
    R is kept orthonormal by a parametrization, or with `orthogonal_rows=False` is a
    plain parameter that starts orthonormal and whose trainer keeps it so
    (shared bases, which train some rows and hold the others)."""

    def __init__(self, hidden: int, rank: int, gated: bool, floor: float = 0.0, orthogonal_rows: bool = True):
        super().__init__()
        self.floor = floor
        self.rotation = nn.Linear(hidden, rank, bias=False)
        if orthogonal_rows:
            self.rotation = orthogonal(self.rotation)
        else:
            with torch.no_grad():
                self.rotation.weight.copy_(torch.linalg.qr(self.rotation.weight.T).Q.T)
        self.source = nn.Linear(hidden, rank)
        self.gate = nn.Linear(hidden, rank) if gated else None
        with torch.no_grad():
            self.source.weight.copy_(self.rotation.weight)
            self.source.bias.zero_()

    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The gate before its sigmoid [..., r] (what the gate is fitted on)."""
        return gate_logits(h, self.gate.weight, self.gate.bias)

    def gates(self, h: torch.Tensor) -> torch.Tensor:
        """w(h) [..., r] before the floor; ones without a gate."""
        if self.gate is None:
            return h.new_ones(*h.shape[:-1], self.source.out_features)
        return torch.sigmoid(self.gate_logits(h))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        gate = None if self.gate is None else (
            self.gate.weight, self.gate.bias, torch.ones_like(self.gate.bias, dtype=torch.bool),
            torch.full_like(self.gate.bias, self.floor))
        return intervention_delta(h, self.rotation.weight, self.source.weight, self.source.bias, gate)

    def load(self, parts: dict[str, torch.Tensor]) -> None:
        """Take the pack's tensors `parts` (by part name, as `tensors` gives them)."""
        with torch.no_grad():
            if parametrize.is_parametrized(self.rotation):
                self.rotation.weight = parts["rotation"].to(self.source.weight)  # through the map's inverse
            else:
                self.rotation.weight.copy_(parts["rotation"])
            self.source.weight.copy_(parts["source.weight"])
            self.source.bias.copy_(parts["source.bias"])
            if self.gate is not None:
                self.gate.weight.copy_(parts["gate.weight"])
                self.gate.bias.copy_(parts["gate.bias"])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The pack's tensors of this intervention, by part name."""
        parts = {"rotation": self.rotation.weight, "source.weight": self.source.weight,
                 "source.bias": self.source.bias}
        if self.gate is not None:
            parts.update({"gate.weight": self.gate.weight, "gate.bias": self.gate.bias})
        return {k: v.detach().clone() for k, v in parts.items()}


def opened_bases(edit_logits: torch.Tensor, earlier: torch.Tensor, rank: int, floor: float) -> torch.Tensor:
    """[P, r] bool: the `rank` bases an edit opens at its positions, given its gates'
    logits there [P, r] and where earlier edits of a shared intervention act [N, r]:
    those fewest earlier edits opened, the most open already among them (all of an
    edit's own bases). Logits, not gates, order them: gates shut hard all read 0."""
    uses = (earlier.detach().sigmoid() >= floor).sum(0)
    by_logit = torch.argsort(edit_logits.detach(), dim=-1, descending=True, stable=True)
    order = by_logit.gather(-1, torch.argsort(uses[by_logit], dim=-1, stable=True))
    return torch.zeros_like(edit_logits, dtype=torch.bool).scatter_(
        -1, order[..., :min(rank, edit_logits.shape[-1])], True)


GateLoss = Callable[[Edit, Intervention, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, bool]]


@dataclass
class GateFit:
    """How gated interventions fit their gates: `loss_for(layer)` (called after every
    setting is checked) gives the `GateLoss`, a function of the edit, its
    intervention, its gates at the edit prompt's intervened positions [P, r]
    split in two (where the edit acts, and the rest) and the gates where earlier
    edits of a shared intervention act [N, r] (none for an edit's own), that
    returns the loss and whether its goal is reached; at most `steps` steps;
    gates below `floor` act as 0. The gates come as logits (before the sigmoid),
    so that a loss on them can be computed without saturating: a gate shut hard
    where it must now open still has a gradient."""

    loss_for: Callable[[int], GateLoss]
    steps: int
    floor: float


def train_interventions(model, tokenizer, requests: list[Edit], config: InterventionConfig, method: str,
                        peft_type: str, gate: GateFit | None = None, progress: bool = True,
                        continual_at: Callable[[int], object] | None = None,
                        kept_for: Callable[[Edit], Kept] | None = None, recorded: dict | None = None) -> EditPack:
    """One intervention per request at `config.layer`; a `basis_intervention` pack.
    With `continual_at(layer)` (a `shared_bases.Continual`), every request trains
    that one shared intervention instead, and the pack holds it and every edit
    of its sequence. With `kept_for(edit)`, the rows whose distributions the
    training also matches (`teacher_forcing.Kept`), each read as a prompt whole,
    so the intervention acts on them as on any prompt. `recorded`: settings the
    pack records beside `config`'s.

    With `gate` the interventions are gated, and each gate is fitted first on
    its own loss. The gate reads the layer's unedited output, which nothing
    trained here changes, so fitting it needs no forward pass per step. Then R,
    W and b are trained through the frozen gate (its floor applied, as at
    inference) on the target's cross-entropy until it is below `stop_loss`, as
    for ReFT.

    The edit acts at the subject's last token when the positions include it
    (the token whose state names the subject, as in ROME), else at every
    intervened position."""
    # Interventions read the prompt as a whole: no subject slot needed.
    check_requests(requests, subject_slot=False)
    anatomy = anatomy_of(model)
    hidden = hidden_size(model)
    if type(config.rank) is not int or not 1 <= config.rank <= hidden:
        raise EditRequestError(f"rank={config.rank!r}: give an integer from 1 to the hidden size {hidden}, the most "
                               "orthonormal directions R can hold")
    positions = parse_positions(config.positions, EditRequestError)
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    continual = continual_at(layer) if continual_at else None  # checks the history before any sampling
    gate_loss = gate.loss_for(layer) if gate else None
    layer_module = model.get_submodule(anatomy.layer(layer))
    device = input_device(model)
    parts = {}
    with frozen(model):
        bar = StepBar(requests, config.steps, f"{method}: training", disable=not progress)
        for edit in bar:
            if continual is None:
                torch.manual_seed(config.seed)
                intervention = Intervention(hidden, config.rank, gate is not None,
                                            gate.floor if gate else 0.0).to(device)
            else:
                intervention = continual.intervention
                continual.hold()
            ids, labels, prompt = teacher_forced(tokenizer, edit.text, edit.target_new, device)
            kept = kept_for(edit) if kept_for else None
            lengths = [ids.shape[1]] + ([len(row) for row in kept.rows] if kept else [])  # fit_target's batch
            real = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]
            prompts = [prompt] + lengths[1:]
            where = select_positions(real, *positions, torch.tensor(prompts))
            if gate_loss is not None:
                texts = [edit.text] + (_texts_of(tokenizer, kept.rows) if kept else [])
                states, acting = gate_states(model, tokenizer, anatomy.layer(layer), edit, texts, positions)
                fit_gate(intervention, gate_loss, edit, states, acting, gate.steps, config.lr, continual)
            optimizer = torch.optim.Adam([p for p in intervention.parameters() if p.requires_grad], lr=config.lr)
            with applied(layer_module, intervention, where, continual and continual.replaced), \
                    prompt_lengths(model, prompts):
                fit_target(model, ids, labels, optimizer, config.steps, config.stop_loss, bar.step,
                           after_step=continual and continual.after_target_step, kept=kept, pad=pad_id(tokenizer),
                           trained=[layer_module])
            if continual is None:
                parts[edit.id] = {layer: intervention.tensors()}
            else:
                continual.add(states[acting])
    rank, edits = config.rank, requests
    if continual is not None:
        edits, parts = continual.finish(requests)
        rank = continual.intervention.source.out_features
    kind_config = BasisInterventionConfig(peft_type=peft_type, gate="sigmoid_rms" if gate else "none",
                                          r=rank, layers=[layer], positions=config.positions,
                                          hidden_size=hidden, gate_floor=gate.floor if gate else 0.0,
                                          shared_bases=continual is not None)
    return basis_intervention_pack(model, method, {**asdict(config), "layer": layer, **(recorded or {})}, edits,
                                   kind_config, parts)


def fit_gate(intervention: Intervention, gate_loss: GateLoss, edit: Edit, states: torch.Tensor,
             acting: torch.Tensor, steps: int, lr: float, continual=None) -> None:
    """Train the intervention's gate alone on `gate_loss` from the edit prompt's
    states at the intervened positions [P, d] (`acting` [P]: where the edit
    acts), until the loss says its goal is reached; then freeze it. With
    `continual` (a shared intervention) the earlier edits' gates are held too."""
    intervention.gate.requires_grad_(True)
    optimizer = torch.optim.Adam(intervention.gate.parameters(), lr=lr)
    for _ in range(steps):
        logits = intervention.gate_logits(states)
        earlier = continual.gate_logits() if continual is not None else logits[:0]
        loss, settled = gate_loss(edit, intervention, logits[acting], logits[~acting], earlier)
        if continual is not None:
            drift, kept = continual.gate_drift(earlier)
            loss, settled = loss + drift, settled and kept
        if settled:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if continual is not None:
            continual.after_gate_step(logits[acting].detach(), earlier.detach())
    intervention.gate.requires_grad_(False)


def gate_states(model, tokenizer, layer: str, edit: Edit, texts: list[str],
                positions: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a gate is fitted on: the states [P, d] at the intervened positions of
    `texts` (the edit prompt first, then any text the edit should reach) and
    where the edit acts [P] (`acting_positions`; in texts other than the prompt,
    nowhere if they do not name the subject)."""
    states = layer_states(model, tokenizer, layer, texts, positions)  # one pass, row by row
    acting = [acting_positions(tokenizer, edit, text, select_positions(
        torch.ones(1, len(tokenizer(text).input_ids), dtype=torch.bool), *positions), fallback=i == 0)
        for i, text in enumerate(texts)]
    return states, torch.cat(acting).to(states.device)


def acting_positions(tokenizer, edit: Edit, text: str, where: torch.Tensor, fallback: bool = True) -> torch.Tensor:
    """[P] bool over the intervened positions `where` [1, T] of `text`: where the
    edit should act, its subject's last token; if the positions miss it, all of
    them (`fallback`) or none."""
    if edit.subject and edit.subject in text:
        subject = subject_last_index(tokenizer, text, edit.subject)
        if subject < where.shape[1] and where[0, subject]:
            return (torch.arange(where.shape[1], device=where.device) == subject)[where[0]]
    return torch.full((int(where.sum()),), fallback, dtype=torch.bool, device=where.device)


def _texts_of(tokenizer, rows: list[list[int]]) -> list[str]:
    """The texts of token rows, those that tokenize back to the same row."""
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return [t for t, row in zip(texts, rows) if tokenizer(t).input_ids == row]


@torch.no_grad()
def layer_states(model, tokenizer, layer: str, texts: list[str],
                 positions: tuple[int, int] | None = None) -> torch.Tensor:
    """[N, d] float32: the output of the decoder layer named `layer` at every real
    token of `texts` (or at the (first n, last m) `positions`), before any
    attached intervention."""
    rows = [ids for ids in (tokenizer(t).input_ids for t in texts) if ids]
    ids, mask = padded(rows, pad_id(tokenizer), input_device(model))
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, args, out: captured.append(hidden_states(out)), prepend=True)
    try:
        run_until(model, [model.get_submodule(layer)], input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    where = mask.bool() if positions is None else select_positions(mask.bool(), *positions)
    return captured[0][where].float()


@contextmanager
def applied(layer_module: nn.Module, intervention: Intervention, where: torch.Tensor,
            replaced: Intervention | None = None):
    """Add the intervention's update to the layer's output at `where` [1, T] for the
    block, less `replaced`'s (an attached intervention it will take the place of).
    The update is computed from the output *before* attached packs'
    interventions (read by a hook that runs first), because that is the sum the
    stack computes at inference: sequential edits train on what they will see."""
    seen = []

    def read(module, args, out):
        seen.append(hidden_states(out))

    def add(module, args, out):
        h, current = seen.pop().float(), hidden_states(out)
        delta = intervention.delta(h) if replaced is None else intervention.delta(h) - replaced.delta(h)
        edited = torch.where(where[..., None], (current.float() + delta).to(current.dtype), current)
        return (edited, *out[1:]) if isinstance(out, (tuple, list)) else edited

    handles = [layer_module.register_forward_hook(read, prepend=True), layer_module.register_forward_hook(add)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
