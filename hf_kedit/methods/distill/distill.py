"""`distill`: context distillation of an edit (supervised knowledge editing;
Padmanabhan et al., "Propagating knowledge updates to LMs through
distillation", NeurIPS 2023). The teacher is the model with the fact in its
context, in the form the `icl` baseline uses; the student is the same model
with a pack and no context. Per edit, LoRA factors on chosen MLP output
projections (a `weight_delta` pack), or BaFT's gated intervention at one
layer (a `basis_intervention` pack), are trained so that the student's
next-token distributions match the teacher's (KL(teacher ‖ student)) on text
that reaches beyond the edit prompt:
- the edit prompt followed by its new target;
- text the teacher itself writes about the subject with the fact in context
  (continuations of the subject, sampled with a fixed seed), where an
  implication of the fact, if the teacher draws it, is what the student learns;
and so that it keeps the unedited model's distributions on text the model
samples from its start token (KL(unedited ‖ student)), plus the target's
cross-entropy at the edit prompt, so that the edit holds even where the
teacher itself is unsure of it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from ...anatomy import anatomy_of, input_device
from ...batching import pad_id, padded
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...progress import StepBar
from ...sampling import per_model, sample_texts, seeded
from ..builders import weight_delta_pack
from ..finetune.peft_tuning import ADAPTER, fan_in_fan_out, peft_adapter, trained_factors
from ..in_context import aligned_positions, fact_context, teacher_continuations
from ..representation.baft import BaFTConfig, gate_fit
from ..representation.core import train_interventions
from ..requests import check_requests, resolve_layer
from ..setting import NOT_TUNED, setting
from ..teacher_forcing import Kept, fit_target, teacher_forced


STUDENTS = ("lora", "basis")


@dataclass
class DistillConfig:
    """`distill`'s settings: where the student's LoRA factors go, what text the
    teacher writes, and how the two divergences are weighed."""

    layers: tuple = setting((0.3,), "the MLP output projections trained, one per entry: an index or a relative "
                            "depth in [0, 1) (rounded)", "chosen here, not tuned: the LoRA baseline's layer")
    rank: int = setting(4, "r of each edit's delta B A on each layer", NOT_TUNED)
    steps: int = setting(40, "Adam steps per edit (all run: the divergences have no stopping point)", NOT_TUNED)
    lr: float = setting(1e-2, "Adam's step size", NOT_TUNED)
    samples: int = setting(4, "texts the teacher writes about the subject, with the fact in context", NOT_TUNED)
    sample_tokens: int = setting(24, "tokens per text the teacher writes", NOT_TUNED)
    locality_samples: int = setting(4, "unrelated texts the model samples, on which the student must not move",
                                    NOT_TUNED)
    locality_tokens: int = setting(32, "tokens per unrelated text", NOT_TUNED)
    locality_weight: float = setting(1.0, "weight of the unrelated texts' divergence against the teacher's",
                                     NOT_TUNED)
    seed: int = setting(0, "seeds the teacher's sampling and A's random start", "any: a fixed seed makes packs "
                        "reproducible")
    student: str = setting("lora", "the pack trained: \"lora\" (LoRA factors on the MLP output projections of "
                           "`layers`, a weight_delta pack) or \"basis\" (BaFT's gated intervention of `rank` bases "
                           "at the one layer of `layers`, its gate fitted as BaFT fits it, a basis_intervention pack)",
                           "chosen against \"basis\" on RippleEdits' first 20 cases: better locality and "
                           "portability at the same efficacy (docs/benchmarks.md)")

    def __post_init__(self):
        """`EditRequestError` for settings that cannot work (checks that need no model)."""
        if isinstance(self.layers, (str, int, float)) or not self.layers:
            raise EditRequestError(f"layers={self.layers!r}: give a list of layers (indices or relative depths), "
                                   "e.g. [0.3]")
        for name in ("rank", "steps", "samples", "sample_tokens", "locality_samples", "locality_tokens"):
            value, least = getattr(self, name), 0 if name in ("samples", "locality_samples") else 1
            if type(value) is not int or value < least:
                raise EditRequestError(f"{name}={value!r}: give an integer of at least {least}")
        if self.student not in STUDENTS:
            raise EditRequestError(f"student={self.student!r}: give one of {', '.join(map(repr, STUDENTS))}")
        if self.student == "basis" and len(self.layers) != 1:
            raise EditRequestError(f"layers={self.layers!r}: a basis student intervenes at one layer; give one")
        for name in ("lr", "locality_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or (name == "lr" and value == 0):
                raise EditRequestError(f"{name}={value!r}: give a {'positive' if name == 'lr' else 'non-negative'} "
                                       "number")


def distill_edit(model, tokenizer, requests: list[Edit], config: DistillConfig | None = None,
                 progress: bool = True) -> EditPack:
    """Train one student per request by context distillation: LoRA factors (a
    `weight_delta` pack), or with `student="basis"` a gated intervention (a
    `basis_intervention` pack).

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = distill_edit(model, tokenizer, [edit])
        >>> pack = distill_edit(model, tokenizer, [edit], DistillConfig(student="basis"))
    """
    check_requests(requests, subject_slot=False)
    config = config or DistillConfig()
    if config.student == "basis":
        return basis_student(model, tokenizer, requests, config, progress)
    anatomy = anatomy_of(model)
    layers = sorted({resolve_layer(layer, anatomy.num_layers, model, tokenizer, requests) for layer in config.layers})
    names = [anatomy.mlp_out(layer) for layer in layers]
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=names, lora_dropout=0.0,
                             fan_in_fan_out=fan_in_fan_out(model, names))
    unrelated = unrelated_rows(model, tokenizer, config)
    pad = pad_id(tokenizer)
    factors = {}
    bar = StepBar(requests, config.steps, "distill: training", disable=not progress)
    for edit in bar:
        kept = distillation_targets(model, tokenizer, edit, config, unrelated)
        with peft_adapter(model, LoraModel, peft_config):
            torch.manual_seed(config.seed)
            trainable = []
            for name in names:
                trained = model.get_submodule(name)
                A, B = trained.lora_A[ADAPTER].weight, trained.lora_B[ADAPTER].weight
                with torch.no_grad():  # A's start: Gaussian of variance 1/in (B starts at zero, as PEFT's does)
                    A.copy_(torch.randn(A.shape, device=A.device) / A.shape[1] ** 0.5)
                trainable += [A, B]
            ids, labels, _ = teacher_forced(tokenizer, edit.text, edit.target_new, input_device(model))
            fit_target(model, ids, labels, torch.optim.Adam(trainable, lr=config.lr), config.steps, 0.0, bar.step,
                       kept=kept, pad=pad, trained=[model.get_submodule(n) for n in names])
            factors[edit.id] = {name: trained_factors(model, name) for name in names}
    hyperparameters = {**asdict(config), "layers": layers}
    return weight_delta_pack(model, "distill", hyperparameters, requests, factors)


def basis_student(model, tokenizer, requests: list[Edit], config: DistillConfig, progress: bool) -> EditPack:
    """BaFT's gated intervention per request, its gate fitted as BaFT fits it (open
    at the subject, shut on unrelated text and contrast subjects), then trained on
    the distillation targets with every step run."""
    unrelated = unrelated_rows(model, tokenizer, config)
    settings = BaFTConfig(layer=config.layers[0], rank=config.rank, steps=config.steps, lr=config.lr, stop_loss=0.0,
                          seed=config.seed)
    return train_interventions(model, tokenizer, requests, settings, "distill", "BAFT",
                               gate_fit(model, tokenizer, requests, settings), progress,
                               kept_for=lambda edit: distillation_targets(model, tokenizer, edit, config, unrelated),
                               recorded=asdict(config))


def teacher_texts(model, tokenizer, edit: Edit, config: DistillConfig) -> list[str]:
    """The edit prompt with its target, and `config.samples` texts the teacher writes
    after the subject with the fact in context (top-50 sampling, seeded)."""
    return [f"{edit.text} {edit.target_new.strip()}",
            *teacher_continuations(model, tokenizer, edit, config.samples, config.sample_tokens, config.seed)]


@torch.no_grad()
def log_probs_at(model, rows: list[list[int]], positions: list[list[int]], pad: int) -> list[torch.Tensor]:
    """Per row, log p(next token) [len(positions[i]), vocab] at its `positions`, float32."""
    ids, mask = padded(rows, pad, input_device(model))
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [F.log_softmax(logits[i, p].float(), -1) for i, p in enumerate(positions)]


def distillation_targets(model, tokenizer, edit: Edit, config: DistillConfig,
                         unrelated: list[list[int]]) -> Kept:
    """What the student learns for `edit`, as the rows `fit_target` keeps: the
    teacher's distributions on the teacher's texts (read with the fact in context)
    and the unedited model's on `unrelated`, each set weighed to sum to 1 (the
    unrelated set to `locality_weight`)."""
    pad = pad_id(tokenizer)
    context = fact_context([edit])
    rows, teacher_rows, pairs = [], [], []
    for text in teacher_texts(model, tokenizer, edit, config):
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        student, teacher = tokenizer(text).input_ids, tokenizer(context + text).input_ids
        paired = aligned_positions(student, teacher, tokens)
        if paired:
            rows.append(student)
            teacher_rows.append(teacher)
            pairs.append(paired)
    if not pairs:
        raise EditRequestError(f"edit {edit.id!r}: no token of its texts reads the same with and without the fact "
                               "in context, so there is nothing to distil (is the target empty?)")
    before = log_probs_at(model, teacher_rows, [[t for _, t in p] for p in pairs], pad)
    student_positions = [[s for s, _ in p] for p in pairs]
    everywhere = [list(range(len(row))) for row in unrelated]
    if unrelated:
        before += log_probs_at(model, unrelated, everywhere, pad)
    rows, positions = rows + unrelated, student_positions + everywhere
    weights = torch.zeros(len(rows), max(map(len, rows)), device=input_device(model))
    shares = {"teacher": 1.0 / sum(map(len, student_positions)),
              "unrelated": config.locality_weight / max(sum(map(len, everywhere)), 1)}
    for i, where in enumerate(positions):
        weights[i, where] = shares["teacher" if i < len(pairs) else "unrelated"]
    # `Kept` holds p₀ in the order of weights.nonzero(), row by row with positions ascending: as built here
    return Kept(rows, weights, torch.cat(before))


def unrelated_rows(model, tokenizer, config: DistillConfig) -> list[list[int]]:
    """Token rows of text the model samples from its start token (once per model and setting)."""
    if not config.locality_samples:
        return []

    def sample():
        with seeded(config.seed):
            return sample_texts(model, tokenizer, config.locality_samples, config.locality_tokens, top_k=50)
    texts = per_model(model, ("unrelated_texts", config.locality_samples, config.locality_tokens, config.seed), sample)
    return [ids for ids in (tokenizer(t).input_ids for t in texts) if len(ids) > 1]
