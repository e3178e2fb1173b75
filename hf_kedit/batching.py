"""Token-id rows as padded batches: the one way methods, statistics and
evaluation build model inputs from prompts of different lengths, and group
rows of similar lengths so that little is spent on padding."""
from __future__ import annotations

import math

import torch

TOKENS_PER_BATCH = 1024
# A forward call's fixed cost in tokens' worth of compute (the default model on a 2-core CPU: 33 ms
# a call, 0.7 ms a token; docs/evaluation.md):
# a batch is split where its padding would cost more than another call.
CALL_TOKENS = 48


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


def length_runs(lengths: list[int], batch_size: int) -> list[range]:
    """Consecutive runs of the ascending `lengths`, each of at most `batch_size`
    sequences and `TOKENS_PER_BATCH` padded tokens (a longer sequence runs alone),
    that cost the fewest padded tokens plus `CALL_TOKENS` per call (dynamic
    programming over where each run starts).

    Example:
        >>> length_runs([3, 3, 4, 40], batch_size=16)
        [range(0, 3), range(3, 4)]
    """
    n = len(lengths)
    cost, start = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for first in range(end - 1, max(end - batch_size, 0) - 1, -1):
            rows = end - first
            if rows > 1 and rows * lengths[end - 1] > TOKENS_PER_BATCH:
                break
            total = cost[first] + rows * lengths[end - 1] + CALL_TOKENS
            if total < cost[end]:
                cost[end], start[end] = total, first
    runs, end = [], n
    while end:
        runs.append(range(start[end], end))
        end = start[end]
    return runs[::-1]


def by_length(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """The indices of `rows` in batches of similar lengths (`length_runs` over the
    rows sorted by length): the batches to run them in, wasting little on padding."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [[order[i] for i in run] for run in length_runs([len(rows[i]) for i in order], batch_size)]
