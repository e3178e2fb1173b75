"""Training an edit through a PEFT adapter injected for the time of the training.

LoRA and AdaLoRA train PEFT's own layers (their forward, AdaLoRA's SVD form and
rank allocation); the trained factors are read off and the model gets its own
modules back (`unload`), with their own `requires_grad` flags, exactly as it was.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ...anatomy import weight_layout, weight_present

ADAPTER = "kedit"


@contextmanager
def peft_adapter(model: nn.Module, tuner_class, config):
    """PEFT's `tuner_class` (`LoraModel`, `AdaLoraModel`) injected into `model` with
    `config` for the block; yields the tuner. Only the adapter's parameters train.

    Example:
        >>> with peft_adapter(model, LoraModel, LoraConfig(r=1, target_modules=[name])) as tuner:
        ...     ...  # train; read the factors with `trained_factors`
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with ExitStack() as present:
        # PEFT puts each adapter where its base weight is: for a weight accelerate keeps on `meta`
        # between forwards, bring it in while the adapter is made, so the adapter is real.
        for name in config.target_modules:
            present.enter_context(weight_present(model.get_submodule(name), device=None))
        tuner = tuner_class(model, config, ADAPTER)
    try:
        yield tuner
    finally:
        tuner.unload()
        for p, flag in flags:
            p.requires_grad_(flag)


def fan_in_fan_out(model: nn.Module, modules: list[str]) -> bool:
    """PEFT's flag for weights stored (in, out), as GPT-2's Conv1D stores them."""
    layouts = {weight_layout(model.get_submodule(m)) for m in modules}
    return layouts == {"in_out"}


def trained_factors(model: nn.Module, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The factors (A [r, in], B [out, r]) of ΔW = B A that the adapter on `module`
    adds, with PEFT's scaling folded into A; AdaLoRA's pruned ranks (zero singular
    values) are left out, so ranks differ between modules. None if every rank was pruned."""
    layer = model.get_submodule(module)
    scaling = layer.scaling[ADAPTER]
    A, B = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    if isinstance(A, nn.Module):  # LoRA: linear layers
        return (A.weight * scaling).detach(), B.weight.detach()
    E = layer.lora_E[ADAPTER][:, 0]  # AdaLoRA: P Λ Q, the singular values Λ apart
    keep = E != 0
    if not keep.any():
        return None
    scale = scaling / (layer.ranknum[ADAPTER] + 1e-5)
    return (A[keep] * E[keep, None] * scale).detach(), B[:, keep].detach()


def orthogonality_penalty(model: nn.Module, modules: list[str]) -> torch.Tensor:
    """AdaLoRA's regulariser: the mean over its P and Q matrices of ‖PᵀP − I‖_F and
    ‖QQᵀ − I‖_F. PEFT adds it only to a loss the model computes from `labels`; the
    trained methods compute their own loss, so they add it here."""
    terms = []
    for module in modules:
        layer = model.get_submodule(module)
        P, Q = layer.lora_B[ADAPTER], layer.lora_A[ADAPTER]
        for cov in (P.T @ P, Q @ Q.T):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device, dtype=cov.dtype)))
    return torch.stack(terms).mean()
