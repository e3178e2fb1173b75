"""Text the model writes itself: from its start token, the corpus for key
statistics and the context templates of locate-and-edit; after a subject, the
names it mentions with that subject; about an object, the words that lead up
to it. No download."""
from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .anatomy import input_device
from .batching import pad_id

_PER_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def per_model(model, key, make: Callable):
    """`make()`, computed once per model and `key` and kept while the model lives:
    text a model writes for every edit alike (context templates, unrelated text)
    is sampled once, not once per edit."""
    cache = _PER_MODEL.setdefault(model, {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


@contextmanager
def seeded(seed: int):
    """Sample reproducibly without disturbing the caller's random state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


class _EachStep(LogitsProcessor):
    """Calls `on_step(rows)` once per generated token of every row; changes nothing."""

    def __init__(self, on_step: Callable[[int], object]):
        self.on_step = on_step

    def __call__(self, input_ids, scores):
        self.on_step(input_ids.shape[0])
        return scores


@torch.no_grad()
def sample_texts(model, tokenizer, n: int, new_tokens: int, top_k: int,
                 on_step: Callable[[int], object] | None = None) -> list[str]:
    """`n` texts of `new_tokens` sampled tokens (top-k) from the start token;
    `on_step(n)` after each step (a progress bar's `update`)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((n, 1), start, device=input_device(model))
    steps = LogitsProcessorList([_EachStep(on_step)] if on_step else [])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k,
                         max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id, logits_processor=steps)
    return tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)


@torch.no_grad()
def continuations(model, tokenizer, prompt: str, n: int, new_tokens: int, top_k: int) -> list[str]:
    """`n` texts the model writes after `prompt` (top-k sampling), without the
    prompt; seed the caller's RNG (`seeded`)."""
    ids = torch.tensor([tokenizer(prompt).input_ids] * n, device=input_device(model))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k,
                         max_new_tokens=new_tokens, pad_token_id=pad_id(tokenizer))
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


SIBLING_FRAME = "Names that are often mentioned together: {} and"
_NAME_END = re.compile(r",|\band\b|\bis\b|\bare\b|\bhave\b|\.|;|:|\(|\n|–|—")


@torch.no_grad()
def sibling_names(model, tokenizer, subject: str, n: int, new_tokens: int = 8) -> list[str]:
    """Up to `n` distinct names the model writes after "... {subject} and": things
    of the subject's kind (for "Brazil": Argentina, Chile, Portugal, ...), never
    the subject itself. Sampled with top-k 20; seed the caller's RNG (`seeded`)."""
    names = []
    for text in continuations(model, tokenizer, SIBLING_FRAME.format(subject), n, new_tokens, top_k=20):
        name = " ".join(_NAME_END.split(text)[0].split()[:3])
        if name and subject.lower() not in name.lower() and name.lower() not in subject.lower() \
                and name not in names:
            names.append(name)
    return names


OBJECT_FRAMES = ("Facts about {}:\n1.", "Here are some sentences that mention {}:\n1.")
_SENTENCE_BREAK = re.compile(r"\n+|(?<=[.!?;])\s+|\s\d+\.\s")


@torch.no_grad()
def lead_ups(model, tokenizer, target: str, n: int, new_tokens: int = 48) -> list[str]:
    """Distinct sentence starts that the model writes right before `target`, in `n`
    texts per frame of `OBJECT_FRAMES` about it (for "London": "The capital of
    England is", "The Tower of"); a start counts when it has two words or more
    and does not itself name the target. Sampled with top-k 20; seed the
    caller's RNG (`seeded`)."""
    found = []
    for frame in OBJECT_FRAMES:
        for text in continuations(model, tokenizer, frame.format(target), n, new_tokens, top_k=20):
            for sentence in _SENTENCE_BREAK.split(text):
                at = sentence.find(target)
                lead = sentence[:at].strip() if at > 0 else ""
                if len(lead.split()) >= 2 and target.lower() not in lead.lower() and lead not in found:
                    found.append(lead)
    return found
