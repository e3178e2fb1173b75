"""BaFT (Liu et al., ICLR 2025): LoReFT whose update is weighted per basis
direction by the input, Φ(h) = h + Rᵀ[w(h) ⊙ (W h + b − R h)], so that an edit
can switch itself off on unrelated inputs.

The paper's gate equation, loss formulas and coefficients were not found
(docs/methods.md). Chosen here:
- gate w(h) = sigmoid(G h / RMS(h) + c), one weight in [0, 1] per basis
  direction (a sigmoid gate on the normalised state: see
  `kinds/basis_intervention.py`);
- training in two parts: the gate first, on its own loss (below), which reads
  only the layer's unedited output and so needs no forward pass per step;
  then R, W and b through the frozen gate on the target's cross-entropy, as
  ReFT (trained jointly, the gates settle only over many forward and backward
  passes of the model: docs/reft-baft.md);
- locality: binary cross-entropy that shuts the gates on every token of
  unrelated texts and on the intervened positions of contrast prompts (the
  edit's own prompt about other subjects), and opens them on the edit's own
  positions (the gates read the layer's unedited output). Without the
  opening term the gates stayed near 0.5 everywhere while W and b grew to
  make the edit (docs/reft-baft.md); with
  unrelated text alone a gate learns the relation's wording, which the
  prompts of other subjects share: on CounterFact those neighbours are the
  locality test;
- load balancing: the squared coefficient of variation of the edit's bases'
  mean gates on its own prompt positions (zero when all are used alike), as
  mixture-of-experts balancing losses do, so an edit does not collapse onto
  one direction. By default each edit has its own bases, and sequential
  edits are new packs (or new edits) that leave the old ones as they were;
  with `shared_bases` the edits of a sequence share one intervention, each
  opening `rank` of its bases, and the balancing term reads every edit's gates
  (`shared_bases.py`).
The unrelated texts are `locality_texts`, or text the model samples itself;
the contrast subjects are `contrast_subjects`, a fixed list of well-known
entities of several kinds, and optionally (`sibling_contrasts`) names the
model itself writes next to the edit's subject: the nearest kind of neighbour.
By default (`positions="all"`) an edit acts at its subject's last token (the
gates open there and shut at the prompt's other tokens), the position where
ROME edits, so that paraphrases naming the subject get the edit too; and
gates below `gate_floor` act as 0: small gates on many tokens of a
neighbour's prompt, each letting a little of the update through, moved its
answer (measured on 40 held-apart cases: locality `cmp` 0.21 without the
floor, 0.69 with it, unedited 0.70; docs/reft-baft.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...anatomy import anatomy_of, input_device
from ...kinds.prompt_calls import hidden_size
from ...pack.fingerprint import base_model_record
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...sampling import per_model, sample_texts, seeded, sibling_names
from ...kinds.basis_intervention import parse_positions
from ..setting import NOT_TUNED, setting
from .core import GateFit, Intervention, InterventionConfig, layer_states, opened_bases, train_interventions
from .shared_bases import Continual, SharedBases

RB = "docs/reft-baft.md"
CONTRAST_SUBJECTS = ("Barack Obama", "Marie Curie", "Pablo Picasso", "William Shakespeare", "Serena Williams",
                     "Toyota", "Microsoft", "the BBC", "Tokyo", "Brazil", "the Nile", "Mount Everest", "the Louvre",
                     "Harvard University", "the Beatles", "Christianity")


@dataclass
class BaFTConfig(InterventionConfig):
    """BaFT's settings: those of `InterventionConfig`, plus the gate's. The gate is
    fitted first, on its own loss: it shuts on unrelated texts and on contrast
    prompts (the edit's prompt about other subjects) and opens on the edit's own
    positions. The paper's gate and loss coefficients were not found: these are
    this project's (docs/reft-baft.md)."""

    positions: str = setting("all", "as InterventionConfig's; at every prompt token the gates open only at the "
                             "subject's last token", f"measured here: generality twice the last token's at equal "
                             f"locality, once the gate has a floor ({RB}#a-floor-under-the-gate)")
    gate_steps: int = setting(500, "most Adam steps of the gate's own fit", NOT_TUNED)
    balance_weight: float = setting(0.1, "weight of the load-balancing term (the squared coefficient of variation of "
                                    "the edit's bases' mean gates)", NOT_TUNED)
    contrast_subjects: tuple[str, ...] = setting(CONTRAST_SUBJECTS, "subjects put in place of the edit's in its "
                                                 "prompt, where the gates must shut (empty: none)", "measured here on "
                                                 "six held-apart cases: neighbours that flipped fell from 15 of 60 to "
                                                 f"1 ({RB})")
    sibling_contrasts: int = setting(0, "names the model writes next to the edit's subject, added as contrast "
                                     "subjects (sampling.sibling_names)", "measured here: no help once the gate has "
                                     f"a floor, and slower ({RB}#a-floor-under-the-gate)")
    worst_gate: bool = setting(True, "add the most open of the gates that should shut to the gate's loss (with "
                               "positions=\"all\" one open token can change the answer)", "measured here with "
                               f"positions=\"all\" ({RB})")
    gate_margin: float = setting(0.1, "the gate's fit stops once every gate is within this of 0 or 1 as it should "
                                 "be", f"measured here: 0.03 changed no score by more than 0.01 ({RB})")
    gate_floor: float = setting(0.5, "gates below this act as 0, in training and at inference", "measured here "
                                f"against no floor; 0.5 itself not swept ({RB}#a-floor-under-the-gate)")
    locality_texts: tuple[str, ...] | None = setting(None, "unrelated texts on which the gates must shut (None: "
                                                     "texts the model samples itself)", "chosen here: nothing to "
                                                     "download")
    locality_samples: int = setting(16, "how many texts the model samples for locality_texts=None", NOT_TUNED)
    locality_tokens: int = setting(32, "tokens per sampled text", NOT_TUNED)
    shared_bases: int = setting(0, "0: each edit trains its own intervention of `rank` bases; K > 0: the edits of a "
                                "sequence share one intervention of K bases, each edit opening `rank` of them "
                                "(BaFT's continual setting), continued batch after batch from a SharedBases history",
                                NOT_TUNED)
    retention_weight: float = setting(1.0, "shared bases: weight of keeping the gates shut at the earlier edits' "
                                      "keys where they were shut (their open gates and their updates are held "
                                      "exactly, by projection)", NOT_TUNED)

    def __post_init__(self):
        """`EditRequestError` for settings BaFT cannot use (checks that need no model)."""
        subjects = self.contrast_subjects
        if isinstance(subjects, str) or not all(isinstance(s, str) and s.strip() for s in subjects):
            raise EditRequestError(f"contrast_subjects={subjects!r}: give a list of non-blank subjects, or () for none")
        if type(self.sibling_contrasts) is not int or self.sibling_contrasts < 0:
            raise EditRequestError(f"sibling_contrasts={self.sibling_contrasts!r}: give a number of names to sample "
                                   "per edit (0 for none)")
        if type(self.gate_steps) is not int or self.gate_steps < 0:
            raise EditRequestError(f"gate_steps={self.gate_steps!r}: give a number of steps (0 leaves the gate as "
                                   "initialised)")
        if not isinstance(self.gate_margin, (int, float)) or not 0 < self.gate_margin <= 0.5:
            raise EditRequestError(f"gate_margin={self.gate_margin!r}: give a number in (0, 0.5], how far from 0 and "
                                   "1 the gates may stay when training stops")
        if type(self.shared_bases) is not int or not (self.shared_bases == 0 or self.shared_bases >= self.rank):
            raise EditRequestError(f"shared_bases={self.shared_bases!r}: give 0 (an intervention per edit) or a "
                                   f"number of shared bases of at least rank={self.rank!r}, the bases one edit opens")
        if not isinstance(self.retention_weight, (int, float)) or not self.retention_weight >= 0:
            raise EditRequestError(f"retention_weight={self.retention_weight!r}: give a weight of at least 0")
        if not isinstance(self.gate_floor, (int, float)) or not 0 <= self.gate_floor < 1:
            raise EditRequestError(f"gate_floor={self.gate_floor!r}: give a number in [0, 1), the gate below which "
                                   "an edit does not act (0: it acts wherever its gate is above 0)")


def baft_edit(model, tokenizer, requests: list[Edit], config: BaFTConfig | None = None,
              progress: bool = True, history: SharedBases | None = None) -> EditPack:
    """Train one gated BaFT intervention per request; returns a `basis_intervention` pack.
    With `config.shared_bases` the requests train one shared intervention instead,
    continuing `history` (a `SharedBases`, whose latest pack is attached to
    `model`; a new one starts a sequence), and the pack holds every edit so far.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = baft_edit(model, tokenizer, [edit], BaFTConfig(locality_texts=("The sky is blue.",)))
    """
    config = config or BaFTConfig()
    continual_at = None
    if config.shared_bases:
        history = SharedBases() if history is None else history

        def shared(layer: int) -> Continual:
            continual = Continual(history, config.shared_bases, config.rank, hidden_size(model), layer,
                                  config.gate_floor, config.seed, config.retention_weight, requests,
                                  input_device(model))
            history.check(base_model_record(model, [anatomy_of(model).mlp_out(layer)]))
            return continual
        continual_at = shared
    elif history is not None and history.tensors:
        raise EditRequestError("this SharedBases history holds shared bases: set shared_bases to continue it")
    return train_interventions(model, tokenizer, requests, config, "baft", "BAFT",
                               gate_fit(model, tokenizer, requests, config), progress, continual_at)


def gate_fit(model, tokenizer, requests: list[Edit], config: BaFTConfig) -> GateFit:
    """BaFT's gate fit for `requests`: each edit's gates open at its subject's
    acting tokens and shut on unrelated text, on its prompt with contrast
    subjects, and at its other positions, with the load-balancing term; used by
    every method that trains BaFT's gated interventions."""
    def gate_loss_for(layer: int):
        name = anatomy_of(model).layer(layer)
        unrelated = layer_states(model, tokenizer, name, _locality_texts(model, tokenizer, config))
        positions = parse_positions(config.positions, EditRequestError)
        contrasts = {}
        for edit in requests:
            with seeded(config.seed):
                siblings = sibling_names(model, tokenizer, edit.subject, config.sibling_contrasts) \
                    if config.sibling_contrasts else []
            others = [edit.prompt.format(s) for s in (*config.contrast_subjects, *siblings)
                      if s.lower() != edit.subject.strip().lower()]
            contrasts[edit.id] = layer_states(model, tokenizer, name, others, positions) if others else None

        margin = math.log(config.gate_margin / (1 - config.gate_margin))  # gate_margin as a logit

        def gate_loss(edit: Edit, intervention: Intervention, edit_logits: torch.Tensor,
                      other_logits: torch.Tensor, earlier: torch.Tensor) -> tuple[torch.Tensor, bool]:
            closed = [intervention.gate_logits(unrelated)]
            if contrasts[edit.id] is not None:
                closed.append(intervention.gate_logits(contrasts[edit.id]))
            if len(other_logits):
                closed.append(other_logits)
            # binary cross-entropy from the logits (softplus(z) = -log(1 - sigmoid(z))), which never
            # saturates: gates shut on unrelated and contrast positions, open on the edit's own
            shut = [F.softplus(z) for z in closed]
            locality = sum(bce.mean() for bce in shut) / len(shut)
            if config.worst_gate:  # with every position intervened, one open token (say, the attention sink) is enough
                locality = locality + max(bce.max() for bce in shut)
            chosen = opened_bases(edit_logits, earlier, config.rank, config.gate_floor)  # the others it shuts
            opening = F.softplus(-edit_logits[chosen]).mean()
            others = edit_logits[~chosen]
            if len(others):
                opening = opening + F.softplus(others).mean()
            usage = torch.cat([earlier, edit_logits]).sigmoid().mean(0)  # over the edits sharing the bases, if any
            balance = usage.var(unbiased=False) / usage.mean().pow(2).clamp_min(1e-6)
            settled = bool(max(z.max() for z in closed) < margin
                           and edit_logits[chosen].min() > -margin
                           and (not len(others) or others.max() < margin))
            return locality + opening + config.balance_weight * balance, settled
        return gate_loss

    return GateFit(gate_loss_for, config.gate_steps, config.gate_floor)


def _locality_texts(model, tokenizer, config: BaFTConfig) -> list[str]:
    if config.locality_texts is not None:
        texts = config.locality_texts
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise EditRequestError(f"locality_texts={texts!r}: give a non-empty list of non-blank texts, or None "
                                   "for text the model samples itself")
        return list(texts)
    if type(config.locality_samples) is not int or config.locality_samples < 1:
        raise EditRequestError(f"locality_samples={config.locality_samples!r}: give a positive number of texts")
    def sample():
        with seeded(config.seed):
            return sample_texts(model, tokenizer, config.locality_samples, config.locality_tokens, top_k=50)
    return per_model(model, ("unrelated_texts", config.locality_samples, config.locality_tokens, config.seed), sample)
