"""Token-id rows as one padded batch: the one way methods, statistics and
evaluation build model inputs from prompts of different lengths."""
from __future__ import annotations

import torch


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, or its end-of-sequence token where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def padded(rows: list[list[int]], pad: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`. Right padding (the default) leaves every real
    token at the position it has alone; generation needs left padding."""
    width = max(map(len, rows))
    fill = [[pad] * (width - len(r)) for r in rows]
    ones = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    ids = [f + r if left else r + f for r, f in zip(rows, fill)]
    mask = [m[::-1] if left else m for m in ones]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
