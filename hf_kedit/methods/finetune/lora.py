"""LoRA baseline: a rank-r fine-tune of one MLP output projection on each edit's
target (teacher-forced NLL), or one of rank r × n on n edits together, trained as
PEFT's own LoRA layer and stored as a `weight_delta` pack."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from ...anatomy import anatomy_of, linear_shape
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...progress import StepBar
from ..builders import weight_delta_pack
from ..requests import check_requests, resolve_layer
from ..setting import NOT_TUNED, setting
from ..teacher_forcing import fit_target, teacher_forced_rows
from .peft_tuning import ADAPTER, fan_in_fan_out, peft_adapter, trained_factors


@dataclass
class LoRAConfig:
    """The fine-tuning baseline's settings: one low-rank delta of one MLP output
    projection per edit, trained on the target's cross-entropy."""

    layer: float | int = setting(0.3, "the trained layer: an index, a relative depth in [0, 1) (rounded, as every "
                                 "method rounds it), or \"auto\" (causal tracing of the edits)", NOT_TUNED)
    rank: int = setting(1, "r of each edit's delta B A", "chosen here: one rank per edit, as ROME's update")
    steps: int = setting(60, "most Adam steps per edit", NOT_TUNED)
    lr: float = setting(2e-2, "Adam's step size", NOT_TUNED)
    stop_loss: float = setting(0.05, "stop once the target's cross-entropy is below this", NOT_TUNED)
    seed: int = setting(0, "seeds A's random start", "any: a fixed seed makes packs reproducible")
    joint: bool = setting(False, "true: one delta of rank `rank` × the number of edits, trained on all the call's "
                          "edits together (the mean of their losses, until each is below stop_loss); the edits own "
                          "it together and come off together. false: one delta per edit, each trained alone",
                          NOT_TUNED)

    def __post_init__(self):
        """`EditRequestError` for settings LoRA cannot use (checks that need no model)."""
        for name in ("rank", "steps"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise EditRequestError(f"{name}={value!r}: give a positive integer")
        if type(self.lr) not in (int, float) or not self.lr > 0:
            raise EditRequestError(f"lr={self.lr!r}: give a positive step size")
        if type(self.joint) is not bool:
            raise EditRequestError(f"joint={self.joint!r}: give true (one delta for all the edits) or false "
                                   "(one per edit)")


def lora_edit(model, tokenizer, requests: list[Edit], config: LoRAConfig | None = None,
              progress: bool = True) -> EditPack:
    """Train one low-rank delta per request (or one for all of them, `joint`);
    returns a `weight_delta` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = lora_edit(model, tokenizer, [edit])
    """
    # LoRA reads only the prompt with the subject filled in: it needs no subject slot.
    check_requests(requests, subject_slot=False)
    config = config or LoRAConfig()
    anatomy = anatomy_of(model)
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    name = anatomy.mlp_out(layer)
    module = model.get_submodule(name)
    _, in_f = linear_shape(module)
    factors = {}
    bar = StepBar(requests, config.steps, "lora: training", disable=not progress)
    for batch in bar.batches(len(requests) if config.joint else 1):
        rank = config.rank * len(batch)
        # lora_alpha = r: PEFT's scaling alpha / r is 1, so the trained factors are the pack's.
        peft_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=[name], lora_dropout=0.0,
                                 fan_in_fan_out=fan_in_fan_out(model, [name]))
        with peft_adapter(model, LoraModel, peft_config):
            trained = model.get_submodule(name)
            A, B = trained.lora_A[ADAPTER].weight, trained.lora_B[ADAPTER].weight
            torch.manual_seed(config.seed)
            with torch.no_grad():  # A's start: Gaussian of variance 1/in (B starts at zero, as PEFT's does)
                A.copy_(torch.randn(rank, in_f, device=A.device) / in_f ** 0.5)
            ids, labels = teacher_forced_rows(tokenizer, [e.text for e in batch], [e.target_new for e in batch],
                                              A.device)
            optimizer = torch.optim.Adam([A, B], lr=config.lr)
            fit_target(model, ids, labels, optimizer, config.steps, config.stop_loss, bar.step, trained=[trained])
            factors[batch[0].id] = {name: trained_factors(model, name)}
    return weight_delta_pack(model, "lora", {**asdict(config), "layer": layer}, requests, factors,
                             joint=config.joint)
