"""GRACE (Hartvigsen et al., NeurIPS 2023): per edit, one codebook entry at an MLP
output projection: the key is the projection's input at the prompt's last
token, the value is trained so that returning it there makes the model say the
target, and the deferral radius says how near a query must be for the value to
be used. Stored as a `codebook` pack."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ...anatomy import anatomy_of, execution_device, input_device
from ...errors import EditRequestError
from ...kinds.codebook import by_token
from ...pack import Edit, EditPack
from ...progress import StepBar
from ..builders import codebook_pack
from ..requests import check_requests, resolve_layer
from ..setting import NOT_TUNED, setting
from ..teacher_forcing import fit_target, frozen, teacher_forced

INITS = ("cold", "warm")
EASYEDIT = "EasyEdit's GRACE settings"
SPLIT_MARGIN = 1e-5  # GRACE's: the older of two colliding entries stops just short of the midpoint


@dataclass
class GRACEConfig:
    """GRACE's settings: where the codebook sits, an entry's radius, and how its value is trained."""

    layer: float | int | str = setting(0.85, "the layer whose MLP output projection holds the codebook: an index, "
                                       "a relative depth in [0, 1) or \"auto\" (causal tracing)",
                                       f"{EASYEDIT} for Llama-2-7B (layer 27 of 32)")
    radius: float = setting(1.0, "an entry's deferral radius before collisions shrink it: a query within this "
                            "Euclidean distance of the key gets the value", f"{EASYEDIT} (eps 1.0)")
    steps: int = setting(50, "most Adam steps on a value", f"{EASYEDIT} for Llama models (n_iter 50)")
    lr: float = setting(1.0, "Adam's step size on a value", f"{EASYEDIT} (edit_lr 1.0)")
    stop_loss: float = setting(1e-2, "stop once the target's NLL is below this (GRACE's early stopping)",
                               "the threshold FT-L uses here (EasyEdit's FT code)")
    init: str = setting("cold", "a value's start: \"cold\" (uniform in [0, 1), seeded) or \"warm\" (the "
                        "projection's own output at the key)", f"{EASYEDIT} (val_init cold)")
    seed: int = setting(0, "seed of the cold start", NOT_TUNED)

    def __post_init__(self):
        if self.init not in INITS:
            raise EditRequestError(f"init={self.init!r}: use one of {INITS}")
        if not (isinstance(self.radius, (int, float)) and self.radius > 0):
            raise EditRequestError(f"radius={self.radius!r}: give a positive distance (GRACE's is 1.0)")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise EditRequestError(f"steps={self.steps!r}: give at least one step")


def grace_edit(model, tokenizer, requests: list[Edit], config: GRACEConfig | None = None,
               progress: bool = True) -> EditPack:
    """Make one codebook entry per request; returns a `codebook` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = grace_edit(model, tokenizer, [edit], GRACEConfig(radius=2.0))
    """
    check_requests(requests, subject_slot=False)
    config = config or GRACEConfig()
    anatomy = anatomy_of(model)
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    name = anatomy.mlp_out(layer)
    module = model.get_submodule(name)
    device = execution_device(model, name)
    generator = torch.Generator().manual_seed(config.seed)
    entries = {}
    bar = StepBar(requests, config.steps, "grace: training values", disable=not progress)
    for edit in bar:
        ids, labels, n = teacher_forced(tokenizer, edit.text, edit.target_new, input_device(model))
        key, own = projection_at(model, module, ids[:, :n], n - 1)
        value = (torch.rand(own.shape, generator=generator) if config.init == "cold" else own).to(device)
        value.requires_grad_(True)

        def replace(m, args, output, value=value, at=n - 1, shape=ids.shape):
            edited = by_token(output, shape).clone()
            edited[:, at] = value.to(output.dtype)
            return edited.reshape(output.shape)

        handle = module.register_forward_hook(replace)
        try:
            with frozen(model):
                fit_target(model, ids, labels, torch.optim.Adam([value], lr=config.lr), config.steps,
                           config.stop_loss, bar.step, trained=[module])
        finally:
            handle.remove()
        entries[edit.id] = (key, value.detach(), config.radius)
    return codebook_pack(model, "grace", {**asdict(config), "layer": layer}, requests, layer,
                         split_collisions(requests, entries))


def projection_at(model, module, ids: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of `module` at token `position` of the row `ids` [1, T], float32."""
    seen = {}

    def read(m, args, output):
        seen["key"], seen["value"] = (by_token(x, ids.shape)[0, position].float() for x in (args[0], output))

    handle = module.register_forward_hook(read)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["key"], seen["value"]


def split_collisions(edits: list[Edit], entries: dict) -> dict:
    """The entries with GRACE's collision rule applied in the edits' order: when a
    new key lies within reach of an earlier one (their distance at most the sum of
    their radii) and the two edits want different targets, both radii shrink to
    half the distance, the earlier one just short of it, so no query gets both.
    Edits with the same target keep their radii (where GRACE widens the older
    entry instead, each edit keeps its own entry here, so that it can be removed
    alone)."""
    radii = {e.id: float(entries[e.id][2]) for e in edits}
    for i, new in enumerate(edits):
        for old in edits[:i]:
            distance = torch.dist(entries[new.id][0], entries[old.id][0]).item()
            if distance <= radii[new.id] + radii[old.id] and new.target_new.strip() != old.target_new.strip():
                radii[old.id] = min(radii[old.id], distance / 2 - SPLIT_MARGIN)
                radii[new.id] = min(radii[new.id], distance / 2)
    return {e.id: (entries[e.id][0], entries[e.id][1], radii[e.id]) for e in edits}
