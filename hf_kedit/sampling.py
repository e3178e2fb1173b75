"""Text the model writes itself from its start token: the corpus for key
statistics and the context templates of locate-and-edit, with no download."""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int):
    """Sample reproducibly without disturbing the caller's random state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def sample_texts(model, tokenizer, n: int, new_tokens: int, top_k: int) -> list[str]:
    """`n` texts of `new_tokens` sampled tokens (top-k) from the start token."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, 1), start, device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k,
                         max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
