"""What a hook needs to know of the forward call running now, for the kinds that
act at prompt positions (basis_intervention, steering_map, codebook): which tokens are
real, where each row's prompt ends, and whether the call continues a KV cache
(a generated step). One reader, shared by those kinds and the scorer."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import KeditError

_PROMPT_LENGTHS = "_kedit_prompt_lengths"
_TOKENIZER = "_kedit_tokenizer"


def set_tokenizer(model: nn.Module, tokenizer) -> None:
    """Give the model's hooks its tokenizer, for kinds whose router reads the
    prompt's text (`load_edits(..., tokenizer=)` calls this)."""
    model.__dict__[_TOKENIZER] = tokenizer


def tokenizer_of(model: nn.Module):
    """The tokenizer given to `set_tokenizer`, or None."""
    return model.__dict__.get(_TOKENIZER)


@contextmanager
def prompt_lengths(model: nn.Module, lengths: list[int]):
    """Within the block, a forward call of `model` over an empty cache reads row
    i as a prompt of its first `lengths[i]` real tokens followed by a continuation
    (teacher-forced answers), so basis interventions act on the prompt only, as
    in cached generation. Without it a call's whole input is the prompt. Other
    kinds ignore it.

    Example:
        >>> with prompt_lengths(model, [len(prompt_ids)]):
        ...     logits = model(torch.tensor([prompt_ids + answer_ids])).logits
    """
    previous = model.__dict__.get(_PROMPT_LENGTHS)
    model.__dict__[_PROMPT_LENGTHS] = torch.tensor(lengths)
    try:
        yield model
    finally:
        model.__dict__[_PROMPT_LENGTHS] = previous


def select_positions(real: torch.Tensor, first: int, last: int,
                     prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the first `first` and last `last` prompt tokens of each row.
    `real` [B, T] marks real (not padding) tokens; a row's prompt is its first
    `prompt_lengths[i]` real tokens, or all of them.

    Example:
        >>> select_positions(torch.tensor([[0, 1, 1, 1, 1]]).bool(), 1, 1, torch.tensor([3]))
        tensor([[False,  True, False,  True, False]])
    """
    rank = real.long().cumsum(1) - 1                      # index among the row's real tokens
    length = real.sum(1)
    if prompt_lengths is not None:
        length = torch.minimum(length, prompt_lengths.to(length.device))
    in_prompt = real & (rank < length[:, None])
    return in_prompt & ((rank < first) | (rank >= length[:, None] - last))


@dataclass
class ForwardCall:
    """What the layer hooks need of the forward call running now: which tokens are
    real, the prompt lengths if the caller gave them, and whether the call
    continues a KV cache (then nothing is intervened)."""

    ids: torch.Tensor | None
    real: torch.Tensor
    prompt_lengths: torch.Tensor | None
    continuing: bool

    @classmethod
    def of(cls, model: nn.Module, args, kwargs) -> "ForwardCall":
        """Read from the base model's forward arguments (a pre-hook with kwargs)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = (ids if ids is not None else kwargs.get("inputs_embeds")[..., 0]).shape
        mask = kwargs.get("attention_mask")
        device = (ids if ids is not None else kwargs.get("inputs_embeds")).device
        real = (mask.bool() if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape)
                else torch.ones(shape, dtype=torch.bool, device=device))
        return cls(ids, real, model.__dict__.get(_PROMPT_LENGTHS), continues_cache(args, kwargs))

    def __post_init__(self):
        self.selections = {}
        self.captured = {}  # what hooks early in the call read for hooks later in it (a router's layer states)

    def prompt_texts(self, tokenizer) -> list[str]:
        """Each row's prompt (its real prompt tokens) decoded, special tokens skipped;
        `KeditError` for a call made with embeddings instead of token ids."""
        if self.ids is None:
            raise KeditError("a router that reads the prompt's text needs input_ids; this forward call passed "
                             "inputs_embeds")
        prompt = self.selection((self.ids.shape[1], 0), self.ids.device)
        return tokenizer.batch_decode([row[keep] for row, keep in zip(self.ids, prompt)], skip_special_tokens=True)

    def selection(self, positions: tuple[int, int], device) -> torch.Tensor:
        key = (positions, device)
        if key not in self.selections:
            self.selections[key] = select_positions(self.real, *positions, self.prompt_lengths).to(device)
        return self.selections[key]


def continues_cache(args, kwargs) -> bool:
    """Whether a forward call's arguments hold a KV cache that already holds tokens.
    The cache is found by what it does (`get_seq_length`), not by the name of the
    argument that carries it: transformers 4.x passes `past_key_values`, 5.x
    `cache`, and a positional slot is possible."""
    for value in (*args, *kwargs.values()):
        seq_length = getattr(value, "get_seq_length", None)
        if callable(seq_length) and seq_length() > 0:
            return True
    return False


def hidden_size(model: nn.Module) -> int:
    """The width of the model's residual stream (what interventions act on)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "hidden_size", getattr(config, "n_embd", None))
