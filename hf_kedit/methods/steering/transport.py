"""The linear optimal-transport map between two sample sets, as POT's
`ot.da.LinearTransport(reg=...).fit(Xs, Xt)` computes it, in exact factored form.

POT (`ot.gaussian.empirical_bures_wasserstein_mapping`, uniform weights, bias
on) takes the sample means m_s, m_t and the biased covariances
Cs = (1/n_s) Σ (x − m_s)(x − m_s)ᵀ + reg·I (Ct alike) and returns
    A = Cs^{-1/2} (Cs^{1/2} Ct Cs^{1/2})^{1/2} Cs^{-1/2},   b = m_t − m_s A,
applied to row vectors as x A + b (square roots by `eigh`).

Both covariances are (a matrix on the span U of the centred samples) + reg·I,
so on the complement of U both equal reg·I and A is the identity there:
A = I + U (A_U − I) Uᵀ, where A_U is the same formula on the k×k blocks
Uᵀ Cs U and Uᵀ Ct U (k ≤ n_s + n_t − 2). Storing U [d, k] and M = A_U − I
[k, k] instead of A [d, d] gives the same outputs; at d = 4096 with 300
samples it is about 13× smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FactoredMap:
    """x ↦ x (I + U M Uᵀ) + b for rows x: `basis` U [d, k] (orthonormal columns),
    `core` M [k, k] (symmetric), `bias` b [d]. k = 0 is a pure shift (ActAdd).

    Example:
        >>> fitted = linear_transport(source, target, reg=1e-2)
        >>> moved = source + (source @ fitted.basis) @ fitted.core @ fitted.basis.T + fitted.bias
    """

    basis: torch.Tensor
    core: torch.Tensor
    bias: torch.Tensor

    @property
    def numel(self) -> int:
        return self.basis.numel() + self.core.numel() + self.bias.numel()


def linear_transport(source: torch.Tensor, target: torch.Tensor, reg: float = 1e-2) -> FactoredMap:
    """POT's `LinearTransport(reg=reg, bias=True)` fitted on rows `source` [n_s, d] and
    `target` [n_t, d], in factored form (float64). `reg` > 0 is added to both
    covariances' diagonals; it is what makes them invertible when n < d.

    Example:
        >>> fitted = linear_transport(torch.randn(200, 576), torch.randn(100, 576) + 1, reg=1e-2)
        >>> fitted.basis.shape, fitted.core.shape
        (torch.Size([576, 298]), torch.Size([298, 298]))
    """
    xs, xt = source.double(), target.double()
    ms, mt = xs.mean(0), xt.mean(0)
    cs, ct = xs - ms, xt - mt
    basis = span(torch.cat([cs, ct]))
    ps, pt = cs @ basis, ct @ basis
    eye = torch.eye(basis.shape[1], dtype=torch.float64)
    cov_s = ps.T @ ps / len(xs) + reg * eye
    cov_t = pt.T @ pt / len(xt) + reg * eye
    root_s, inverse_root_s = _powers(cov_s, 0.5, -0.5)
    (middle,) = _powers(root_s @ cov_t @ root_s, 0.5)
    block = inverse_root_s @ middle @ inverse_root_s
    core = (block + block.T) / 2 - eye       # A_U is symmetric; drop the rounding that makes it not quite
    bias = mt - (ms + (ms @ basis) @ core @ basis.T)
    return FactoredMap(basis, core, bias)


def span(rows: torch.Tensor) -> torch.Tensor:
    """[d, k] orthonormal columns spanning `rows` [n, d] (float64), directions whose
    singular value is at rounding level dropped (their variance is below any reg)."""
    if rows.numel() == 0:
        return rows.new_zeros(rows.shape[1], 0)
    _, singular, vh = torch.linalg.svd(rows, full_matrices=False)
    tolerance = singular.max() * max(rows.shape) * torch.finfo(rows.dtype).eps
    return vh[singular > tolerance].T.contiguous()


def _powers(matrix: torch.Tensor, *exponents: float) -> tuple[torch.Tensor, ...]:
    """S^p for each exponent p of a symmetric positive definite S, by `eigh` as POT's sqrtm."""
    values, vectors = torch.linalg.eigh(matrix)
    return tuple((vectors * values.pow(p)) @ vectors.T for p in exponents)
