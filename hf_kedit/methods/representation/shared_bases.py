"""BaFT's continual setting: every edit of a sequence trains one gated
intervention of K bases, each edit opening `rank` of them, so the parameters
per edit fall as edits accumulate (K bases for n edits) instead of staying at
one intervention per edit.

With one intervention for all edits, a new edit must not undo the earlier
ones. The states where they act (each one's subject's last token at the
intervened layer) are kept as keys, and what each earlier edit added there
is held exactly, the way AlphaEdit holds its keys' outputs: after every step,
the change of each source row (W, b) is projected onto the null space of the
keys at which that basis is open; the gates of bases in use are restored,
except those the new edit opens, whose change is projected the same way; the
rows of R of bases in use are restored, and only the bases no earlier edit
opened learn their direction (kept orthonormal to the rest). A gate that was
shut at a key must stay below the floor: that is a loss (`retention_weight`),
the edit's own shutting loss applied to the keys. A new edit opens the
`rank` bases fewest earlier edits opened (the load balancing).

The sequence's state lives in a `SharedBases` history: the intervention as it
stands, the keys and the edits made so far. Each batch's pack holds every
edit of the sequence and the one intervention they share; it takes the place
of the previous batch's pack, which is attached while the batch trains (the
batch trains the difference between the two).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ...errors import EditRequestError
from ...kinds.basis_intervention import RMS_EPS, SHARED_OWNER
from ...pack import Edit
from ..history import History
from .core import Intervention, opened_bases


class SharedBases(History):
    """A sequence of shared-basis BaFT batches (`BaFTConfig(shared_bases=K)`): the
    intervention ("layers.{layer}.{part}"), the keys where the edits so far act
    ("keys" [N, d]) and those edits. `baft_edit(..., history=bases)` continues
    and extends it; its pack replaces the previous batch's.

    Example:
        >>> bases, config = SharedBases(), BaFTConfig(shared_bases=64)
        >>> first = baft_edit(model, tokenizer, batch_1, config, history=bases)
        >>> load_edits(model, first, name="facts")
        >>> second = baft_edit(model, tokenizer, batch_2, config, history=bases)  # holds batch_1's edits too
        >>> remove_edits(model, "facts"); load_edits(model, second, name="facts")
        >>> bases.save("facts-bases.safetensors")
    """

    kind = "baft-shared-bases"

    @property
    def replaces_packs(self) -> bool:
        return bool(self.tensors)

    def layer(self) -> int | None:
        """The intervened layer of the sequence, None before its first batch."""
        names = [n for n in self.tensors if n.startswith("layers.")]
        return int(names[0].split(".")[1]) if names else None


class Continual:
    """One batch of a shared-basis sequence: the intervention it trains (`intervention`),
    the one the attached pack applies (`replaced`, None on the first batch), and
    the keys whose updates are held in place."""

    def __init__(self, history: SharedBases, bases: int, rank: int, hidden: int, layer: int, floor: float,
                 seed: int, retention_weight: float, requests: list[Edit], device):
        if history.layer() not in (None, layer):
            raise EditRequestError(f"this SharedBases history intervenes at layer {history.layer()}, not {layer}: "
                                   f"set layer={history.layer()} to continue it, or start an empty SharedBases()")
        clash = sorted({e.id for e in requests} & {e.id for e in history.edits})
        if clash:
            raise EditRequestError(f"edits {clash[:5]} are in the sequence already: give new edits new ids")
        torch.manual_seed(seed)
        self.intervention = Intervention(hidden, bases, True, floor, orthogonal_rows=False).to(device)
        self.replaced = None
        if history.tensors:
            prefix = f"layers.{layer}."
            parts = {n[len(prefix):]: t for n, t in history.tensors.items() if n.startswith(prefix)}
            if parts["rotation"].shape != (bases, hidden):
                raise EditRequestError(f"this SharedBases history holds {parts['rotation'].shape[0]} bases of size "
                                       f"{parts['rotation'].shape[1]}: set shared_bases={parts['rotation'].shape[0]} "
                                       "to continue it, or start an empty SharedBases()")
            self.intervention.load(parts)
            self.replaced = copy.deepcopy(self.intervention).requires_grad_(False)
        self.history, self.layer, self.weight, self.floor = history, layer, retention_weight, floor
        self.rank = rank
        keys = history.tensors.get("keys")
        self.keys = (keys if keys is not None else torch.zeros(0, hidden)).to(device)

    def hold(self) -> None:
        """Take the intervention as it stands, before the next edit trains: which
        gates are open at which keys, and the null spaces the changes must stay in."""
        i = self.intervention
        with torch.no_grad():
            self.start = {name: p.detach().clone() for name, p in i.named_parameters()}
            self.kept_gates = i.gates(self.keys)
            opened = self.kept_gates >= self.floor  # [N, K]
            self.in_use = opened.any(0)
            ones = self.keys.new_ones(len(self.keys), 1)
            normed = self.keys * torch.rsqrt(self.keys.pow(2).mean(-1, keepdim=True) + RMS_EPS)
            self.value_spans = _spans(torch.cat([self.keys, ones], 1), opened)  # W h + b, at the keys
            self.gate_spans = _spans(torch.cat([normed, ones], 1), opened)     # G ĥ + c, at the keys

    def gate_logits(self) -> torch.Tensor:
        """The keys' gates now [N, K], as logits (the base choice and the balancing term read them)."""
        return self.intervention.gate_logits(self.keys)

    def gate_drift(self, logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(The loss that keeps the keys' gates (`logits` [N, K]) shut where they were
        shut, weighted; whether every one still is, and every open one still open).
        It is the new edit's own shutting loss, worst gate included, so that holding
        an earlier edit weighs as much as making the new one."""
        shut = logits[self.kept_gates < self.floor]
        if not len(shut):
            return logits.sum() * 0, True
        bce = F.softplus(shut)  # -log(1 - sigmoid), exact at any logit
        opened = logits[self.kept_gates >= self.floor].sigmoid()
        kept = bool(shut.max().sigmoid() < self.floor and (not len(opened) or opened.min() >= self.floor))
        return self.weight * (bce.mean() + bce.max()), kept

    def after_gate_step(self, edit_logits: torch.Tensor, earlier: torch.Tensor) -> None:
        """Keep the gates of bases in use where they were, except those the edit opens
        (`opened_bases` of its gates' logits `edit_logits` [P, K] and the keys' `earlier`), whose
        change is projected off the keys where they are open; free bases' gates
        train (to shut: they are open about half the time from their random
        start). A gate in use left free to move drifted under Adam's steps where
        its loss was nearly flat, and opened on unrelated text (docs/reft-baft.md)."""
        gate, start = self.intervention.gate, self.start
        opened = opened_bases(edit_logits, earlier, self.rank, self.floor).any(0)
        held = self.in_use & ~opened
        with torch.no_grad():
            gate.weight[held] = start["gate.weight"][held]
            gate.bias[held] = start["gate.bias"][held]
        _project(gate.weight, gate.bias, start["gate.weight"], start["gate.bias"],
                 {j: q for j, q in self.gate_spans.items() if opened[j]})

    def after_target_step(self, step: int) -> None:
        """Hold the updates at the keys: project the source's change, restore the rows
        of R in use, and keep the rows still free orthonormal to them and to each other."""
        i = self.intervention
        _project(i.source.weight, i.source.bias, self.start["source.weight"], self.start["source.bias"],
                 self.value_spans)
        with torch.no_grad():
            R, used = i.rotation.weight, self.in_use
            R[used] = self.start["rotation.weight"][used]
            if (~used).any():
                free = R[~used]
                if used.any():
                    free = free - (free @ R[used].T) @ R[used]
                q, r = torch.linalg.qr(free.T.double())
                R[~used] = (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)).T.to(R.dtype)

    def add(self, acting_states: torch.Tensor) -> None:
        """Keep an edit's acting states [A, d] as keys for the edits after it."""
        self.keys = torch.cat([self.keys, acting_states.detach().to(self.keys.dtype)])

    def finish(self, requests: list[Edit]) -> tuple[list[Edit], dict]:
        """(every edit of the sequence, the pack's parts) after the batch; the history is extended."""
        tensors = self.intervention.tensors()
        self.history.tensors = {**{f"layers.{self.layer}.{part}": t.cpu() for part, t in tensors.items()},
                                "keys": self.keys.float().cpu()}
        self.history.edits = [*self.history.edits, *requests]
        self.history.n_edits += len(requests)
        return self.history.edits, {SHARED_OWNER: {self.layer: tensors}}


def _spans(rows: torch.Tensor, opened: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per basis j open at some key: an orthonormal basis [D, m] (float64) of the
    rows [N, D] of the keys where it is open."""
    spans = {}
    for j in opened.any(0).nonzero().flatten().tolist():
        q, r = torch.linalg.qr(rows[opened[:, j]].double().T)
        spans[j] = q[:, torch.diagonal(r).abs() > 1e-9 * torch.diagonal(r).abs().max()]
    return spans


def _project(weight: torch.Tensor, bias: torch.Tensor, weight0: torch.Tensor, bias0: torch.Tensor,
             spans: dict[int, torch.Tensor]) -> None:
    """Remove from each row j's change of [weight | bias] its part in `spans[j]`."""
    with torch.no_grad():
        for j, q in spans.items():
            change = torch.cat([weight[j] - weight0[j], (bias[j] - bias0[j])[None]]).double()
            change = change - q @ (q.T @ change)
            weight[j] = weight0[j] + change[:-1].to(weight.dtype)
            bias[j] = bias0[j] + change[-1].to(bias.dtype)
