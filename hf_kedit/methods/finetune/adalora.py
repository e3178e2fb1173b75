"""AdaLoRA baseline: PEFT's AdaLoRA on the MLP output projections of a band of
layers, trained on each edit's target. Its SVD-form adapters (P Λ Q) start at
`init_r` ranks each and give up the least important ones during training,
until the band holds `target_r` ranks per module on average: the ranks the edit
keeps differ between modules, and the pack keeps them as they are."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraModel

from ...anatomy import anatomy_of
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...progress import StepBar
from ..builders import weight_delta_pack
from ..requests import check_requests, edit_layers
from ..setting import NOT_TUNED, setting
from ..teacher_forcing import fit_target, teacher_forced
from .peft_tuning import ADAPTER, fan_in_fan_out, orthogonality_penalty, peft_adapter, trained_factors

PEFT_DEFAULT = "PEFT's AdaLoraConfig default"
EASYEDIT = "EasyEdit's LoRA hyperparameters (lora_type adalora)"


@dataclass
class AdaLoRAConfig:
    """AdaLoRA's settings: where, how many ranks at the start and at the end, and the
    schedule that takes the budget from one to the other."""

    layers: tuple = setting((0.0, 0.8), "the layers whose MLP output projection is adapted: indices, or a (start, "
                            "end) pair of relative depths", NOT_TUNED)
    init_r: int = setting(12, "ranks per module at the start", PEFT_DEFAULT)
    target_r: int = setting(4, "ranks per module at the end, on average over the modules", NOT_TUNED)
    steps: int = setting(70, "Adam steps per edit (all of them: the rank schedule spans them)",
                         f"{EASYEDIT} (num_steps)")
    lr: float = setting(5e-3, "Adam's step size", f"{EASYEDIT} (lr)")
    lora_alpha: float = setting(32, "scales the adapters' output by alpha / ranks", f"{EASYEDIT} (lora_alpha)")
    tinit: int = setting(10, "steps at the full budget before ranks are pruned", NOT_TUNED)
    tfinal: int = setting(20, "last steps at the final budget", NOT_TUNED)
    delta_t: int = setting(5, "steps between two prunings", NOT_TUNED)
    beta1: float = setting(0.85, "smoothing of the importance scores", PEFT_DEFAULT)
    beta2: float = setting(0.85, "smoothing of their uncertainty", PEFT_DEFAULT)
    orth_reg_weight: float = setting(0.5, "weight of the penalty that keeps P and Q orthogonal", PEFT_DEFAULT)
    seed: int = setting(0, "seeds the adapters' random start", "any: a fixed seed makes packs reproducible")

    def __post_init__(self):
        if not 0 < self.target_r <= self.init_r:
            raise EditRequestError(f"target_r={self.target_r}, init_r={self.init_r}: give 0 < target_r <= init_r")
        if not 0 <= self.tinit < self.steps - self.tfinal:
            raise EditRequestError(f"tinit={self.tinit}, tfinal={self.tfinal}, steps={self.steps}: the ranks are "
                                   "pruned between step tinit and step steps - tfinal, so give tinit < steps - tfinal")


def adalora_edit(model, tokenizer, requests: list[Edit], config: AdaLoRAConfig | None = None,
                 progress: bool = True) -> EditPack:
    """Train one AdaLoRA adapter per request; returns a `weight_delta` pack whose
    edits hold factors of different ranks on different modules.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = adalora_edit(model, tokenizer, [edit], AdaLoRAConfig(target_r=2))
    """
    check_requests(requests, subject_slot=False)
    config = config or AdaLoRAConfig()
    anatomy = anatomy_of(model)
    layers = edit_layers(config.layers, anatomy.num_layers)
    modules = [anatomy.mlp_out(layer) for layer in layers]
    peft_config = AdaLoraConfig(
        target_modules=modules, init_r=config.init_r, target_r=config.target_r, total_step=config.steps,
        tinit=config.tinit, tfinal=config.tfinal, deltaT=config.delta_t, beta1=config.beta1, beta2=config.beta2,
        orth_reg_weight=config.orth_reg_weight, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out(model, modules))
    factors = {}
    bar = StepBar(requests, config.steps, "adalora: training", disable=not progress)
    for edit in bar:
        torch.manual_seed(config.seed)
        with peft_adapter(model, AdaLoraModel, peft_config) as tuner:
            trained = [p for n, p in model.named_parameters() if p.requires_grad and ADAPTER in n]
            ids, labels, _ = teacher_forced(tokenizer, edit.text, edit.target_new, trained[0].device)
            fit_target(model, ids, labels, torch.optim.Adam(trained, lr=config.lr), config.steps, -1.0, bar.step,
                       after_step=tuner.update_and_allocate,
                       regulariser=lambda: config.orth_reg_weight * orthogonality_penalty(model, modules),
                       trained=[model.get_submodule(m) for m in modules])
            kept = {m: trained_factors(model, m) for m in modules}
            factors[edit.id] = {m: pair for m, pair in kept.items() if pair is not None}
    return weight_delta_pack(model, "adalora", {**asdict(config), "layers": layers}, requests, factors)
