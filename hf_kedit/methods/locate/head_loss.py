"""Cross-entropy through the LM head in one pass over its weight, for loops that
optimise a few positions' hidden states (the value optimisation of ROME, MEMIT
and STEAM). The plain way (logits, log-softmax, backward) reads the
[vocab, hidden] weight twice per step, and on a CPU the product with a handful
of rows is bound by reading that weight: on the default model it costs more
than a quarter of a step. Here each chunk of the vocabulary is read once, while
it is in cache, for both the log-normaliser and the gradient.

Example:
    >>> targets = head.weight[token_ids]  # one-hot targets: the tokens' own rows
    >>> nll = head_cross_entropy(hidden, head.weight, None, targets, torch.zeros(len(token_ids)))
    >>> nll.sum().backward()  # hidden.grad = E_p[W] − W[token]
"""
from __future__ import annotations

import torch

CHUNK = 2048  # vocabulary rows per chunk: 4.7 MB of a 576-wide fp32 head, so the chunk is still in cache for e @ W_c


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       target_rows: torch.Tensor, target_bias: torch.Tensor) -> torch.Tensor:
    """−Σ_v q_v log softmax(W h + b)_v for each row h of `hidden` [R, d], given its
    target distribution q only through q·W (`target_rows` [R, d]) and q·b
    (`target_bias` [R]): the token's row of W for a one-hot target, p₀ @ W for
    a distribution p₀. Differentiable in `hidden`; `weight` and `bias` are
    constants. Returns [R] in float32."""
    return _HeadCrossEntropy.apply(hidden, weight, bias, target_rows, target_bias)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target_rows, target_bias):
        h = hidden.float()
        peak = torch.full((len(h),), float("-inf"), device=h.device)
        total = torch.zeros(len(h), device=h.device)  # Σ exp(z − peak)
        weighted = torch.zeros_like(h)  # Σ exp(z − peak) W_v
        for start in range(0, len(weight), CHUNK):
            rows = weight[start:start + CHUNK].float()
            z = h @ rows.T
            if bias is not None:
                z += bias[start:start + CHUNK].float()
            new_peak = torch.maximum(peak, z.max(1).values)
            rescale = torch.exp(peak - new_peak)
            e = torch.exp(z - new_peak[:, None])
            total = total * rescale + e.sum(1)
            weighted = weighted * rescale[:, None] + e @ rows
            peak = new_peak
        log_normaliser = peak + total.log()
        ctx.save_for_backward(weighted / total[:, None] - target_rows.float())  # ∂/∂h = E_p[W] − q·W
        ctx.dtype = hidden.dtype
        return log_normaliser - (h * target_rows.float()).sum(1) - target_bias.float()

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return (grad[:, None] * slope).to(ctx.dtype), None, None, None, None
