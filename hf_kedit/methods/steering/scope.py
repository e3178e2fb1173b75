"""Calibrating a steering pack's scope threshold from prompts that should and
should not be steered (the SAKE paper's Figure 3 trade-off)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import EditRequestError
from ...kinds.steering_map import SteeringMapConfig, names_subject, part_name, scope_distances
from ...pack import EditPack
from .core import router_representations


@dataclass
class ThresholdCurve:
    """Per candidate threshold, the fraction of in-scope prompts within their own
    edit's threshold (`in_scope`) and of out-of-scope prompts outside every edit's
    (`out_of_scope`); `chosen`: the threshold maximising their sum."""

    thresholds: list[float]
    in_scope: list[float]
    out_of_scope: list[float]
    chosen: float


def calibrate_threshold(model, tokenizer, pack: EditPack, in_scope: dict[str, list[str]],
                        out_of_scope: list[str]) -> tuple[EditPack, ThresholdCurve]:
    """One threshold for every edit of `pack`, chosen from `in_scope` (edit id -> prompts
    that edit should steer) and `out_of_scope` (prompts none should): the pack with
    that threshold, and the trade-off curve (`hf_kedit.evaluate.report.plot_threshold_curve`).

    Example:
        >>> pack, curve = calibrate_threshold(model, tokenizer, pack, {"e0": paraphrases}, unrelated_prompts)
        >>> plot_threshold_curve(curve, "threshold.png")
    """
    config = SteeringMapConfig.of(pack)
    ids = {e.id for e in pack.edits}
    if not in_scope or set(in_scope) - ids or not all(in_scope.values()) or not out_of_scope:
        raise EditRequestError(f"give in-scope prompts for edits of the pack ({sorted(ids)}), each a non-empty "
                               f"list, and a non-empty list of out-of-scope prompts; got edits {sorted(in_scope)}")
    texts = [p for prompts in in_scope.values() for p in prompts] + list(out_of_scope)
    states = router_representations(model, tokenizer, config, texts)
    order = [e.id for e in pack.edits]
    centroids = torch.stack([pack.tensors[part_name(i, "scope.centroid")].float() for i in order])
    distances = scope_distances(states, centroids, config.metric)
    if config.subject_gate:
        distances = distances.masked_fill(~names_subject(texts, [e.subject for e in pack.edits]), float("inf"))
    owners = torch.tensor([order.index(edit_id) for edit_id, prompts in in_scope.items() for _ in prompts])
    own = distances[torch.arange(len(owners)), owners]
    other = distances[len(owners):].min(1).values
    candidates = torch.cat([own, other]).unique()      # where the trade-off can change
    candidates = candidates[candidates.isfinite()]
    top = 2.0 if config.metric == "cosine" else float("inf")
    candidates = candidates[(candidates > 0) & (candidates <= top)]
    if not len(candidates):
        raise EditRequestError("no threshold can put any in-scope prompt in its edit's scope: with the subject gate "
                               "on, each in-scope prompt must name its edit's subject")
    inside = (own[None] <= candidates[:, None]).float().mean(1)
    outside = (other[None] > candidates[:, None]).float().mean(1)
    chosen = candidates[(inside + outside).argmax()].item()
    tensors = {**pack.tensors, **{part_name(i, "scope.threshold"): torch.tensor([chosen]) for i in order}}
    calibrated = EditPack(pack.kind, pack.method, pack.edits, tensors, pack.base_model,
                          {**pack.hyperparameters, "threshold": chosen, "threshold_calibrated": True}, pack.kind_config)
    return calibrated, ThresholdCurve(candidates.tolist(), inside.tolist(), outside.tolist(), chosen)
