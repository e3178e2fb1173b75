"""SAKE (Scialanga et al., ACL 2025): per edit, the linear optimal-transport map
from the states of its prompts (and their forced variants) to the states of
the prompts that name the new object, applied by a scope router
(`steering.py` builds the sets; `transport.py` fits the map as POT's
`ot.da.LinearTransport` does, in factored form)."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ..setting import setting
from .core import SteeringConfig, steering_edit
from .transport import linear_transport


@dataclass
class SAKEConfig(SteeringConfig):
    """SAKE's settings: those of `SteeringConfig`, plus the transport map's regularisation."""

    reg: float = setting(10.0, "added to both covariances' diagonals: the larger, the nearer the map is to "
                         "ActAdd's shift, which few samples estimate better", "measured here on held-apart cases "
                         "100-139 with ten template paraphrases: 10 best of 0.01-10 (docs/steering.md); the "
                         "reference code hard-codes 1e-2 (GPT-2 XL, 100 paraphrases)")


def sake_edit(model, tokenizer, requests: list[Edit], config: SAKEConfig | None = None,
              progress: bool = True) -> EditPack:
    """Fit one transport map and scope per request; returns a `steering_map` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = sake_edit(model, tokenizer, [edit], SAKEConfig(paraphrases={"e0": ["Danielle Darrieux spoke"]}))
    """
    config = config or SAKEConfig()
    if not (isinstance(config.reg, (int, float)) and config.reg > 0):
        raise EditRequestError(f"reg={config.reg!r}: give a positive regularisation (SAKE's is 1e-2)")
    return steering_edit(model, tokenizer, requests, config, "sake",
                         lambda source, target: linear_transport(source, target, config.reg), progress)
