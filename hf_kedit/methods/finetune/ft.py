"""FT-L: one MLP output projection fine-tuned on each edit, each weight kept
within a small distance of its original value (ROME's constrained fine-tuning
baseline, EasyEdit's FT). The change is dense; the pack stores it exactly as
factors ΔW = B A of rank min(out, in), one of them the identity."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...anatomy import anatomy_of, input_device, linear_shape
from ...errors import EditRequestError
from ...kinds.weight_delta import deltas_applied
from ...pack import Edit, EditPack
from ...progress import StepBar
from ..builders import weight_delta_pack
from ..requests import check_requests, resolve_layer
from ..setting import setting
from ..teacher_forcing import fit_target, frozen, teacher_forced

OBJECTIVES = ("prompt_last", "target")
EASYEDIT = "EasyEdit's FT hyperparameters"


@dataclass
class FTConfig:
    """FT-L's settings: which projection, how long, and how far each weight may move."""

    layer: float | int = setting(0.66, "the fine-tuned layer's MLP output projection: an index, a relative depth "
                                 "in [0, 1) or \"auto\" (causal tracing)",
                                 f"{EASYEDIT} for Llama-2-7B (layer 21 of 32)")
    steps: int = setting(25, "most Adam steps per edit", f"{EASYEDIT} (num_steps)")
    lr: float = setting(5e-4, "Adam's step size", f"{EASYEDIT} (lr)")
    norm_constraint: float | None = setting(5e-4, "after each step every weight is clamped to within this of its "
                                            "original value (an L∞ ball); null: unconstrained (FT-M's setting)",
                                            "ROME's constrained FT-L (EasyEdit's gpt2-xl_constr.json)")
    objective: str = setting("prompt_last", "\"prompt_last\": every target token scored at the prompt's last "
                             "position (FT-L); \"target\": teacher forcing over the target (FT-M)",
                             f"{EASYEDIT} (objective_optimization; FT-L in EasyEdit's survey)")
    stop_loss: float = setting(1e-2, "stop once the loss is below this", "EasyEdit's FT code")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise EditRequestError(f"objective={self.objective!r}: use one of {OBJECTIVES}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise EditRequestError(f"norm_constraint={self.norm_constraint}: give a positive bound, or null for none")


def ft_edit(model, tokenizer, requests: list[Edit], config: FTConfig | None = None,
            progress: bool = True) -> EditPack:
    """Fine-tune one MLP output projection on each request; returns a `weight_delta` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = ft_edit(model, tokenizer, [edit], FTConfig(norm_constraint=None))
    """
    check_requests(requests, subject_slot=False)
    config = config or FTConfig()
    anatomy = anatomy_of(model)
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    name = anatomy.mlp_out(layer)
    out_f, in_f = linear_shape(model.get_submodule(name))
    device = input_device(model)
    factors = {}
    bar = StepBar(requests, config.steps, "ft: fine-tuning", disable=not progress)
    for edit in bar:
        # The trained matrix is the dense change itself; the identity on the smaller side makes it a factor pair.
        delta = torch.zeros(min(out_f, in_f), max(out_f, in_f), device=device, requires_grad=True)
        identity = torch.eye(min(out_f, in_f), device=device)
        A, B = (delta, identity) if out_f <= in_f else (identity, delta.T)
        ids, labels, _ = teacher_forced(tokenizer, edit.text, edit.target_new, device)
        optimizer = torch.optim.Adam([delta], lr=config.lr)
        bound = config.norm_constraint

        def clamp(step):
            with torch.no_grad():
                delta.clamp_(-bound, bound)

        with deltas_applied(model, {name: (A, B)}), frozen(model):
            fit_target(model, ids, labels, optimizer, config.steps, config.stop_loss, bar.step,
                       at_prompt_end=config.objective == "prompt_last", after_step=clamp if bound else None,
                       trained=[model.get_submodule(name)])
        factors[edit.id] = {name: (A.detach(), B.detach())}
    return weight_delta_pack(model, "ft", {**asdict(config), "layer": layer}, requests, factors)
