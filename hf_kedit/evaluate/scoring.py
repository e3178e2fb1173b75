"""Batched forward passes that every metric is computed from: teacher-forced
scoring of (prompt, answer) pairs and greedy generation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..batching import pad_id, padded
from ..kinds.prompt_calls import prompt_lengths

TOKENS_PER_BATCH = 1024


@dataclass
class Forced:
    """Teacher-forced reading of one answer after one prompt."""

    target: list[int]      # the answer's token ids
    predicted: list[int]   # the argmax token at each answer position
    nll: float             # mean negative log-likelihood per answer token

    @property
    def accuracy(self) -> float:
        """Share of answer tokens the model predicts (EasyEdit's teacher-forced score)."""
        return sum(p == t for p, t in zip(self.predicted, self.target)) / len(self.target)


class Scorer:
    """Runs a model on batches of prompts. Forced passes are right-padded, so each
    sequence sees exactly the positions it would see alone; generation is
    left-padded."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.pad_id = pad_id(tokenizer)
        self.device = next(model.parameters()).device

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        # An answer follows its prompt after a space, as the benchmarks' targets are written.
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids

    @torch.no_grad()
    def forced(self, pairs: list[tuple[str, str | list[int]]]) -> list[Forced]:
        """Teacher-forced readings of (prompt, answer) pairs; an answer is text or token ids.
        Repeated pairs are read once; batches group similar lengths to waste little on padding."""
        seqs = {}
        for prompt, answer in pairs:
            key = (prompt, answer if isinstance(answer, str) else tuple(answer))
            if key not in seqs:
                seqs[key] = (self.prompt_ids(prompt), list(answer) if not isinstance(answer, str)
                             else self.answer_ids(answer))
        keys = sorted(seqs, key=lambda k: len(seqs[k][0]) + len(seqs[k][1]))
        readings = {}
        for chunk in self._chunks(keys, lambda k: len(seqs[k][0]) + len(seqs[k][1])):
            ids, mask = padded([seqs[k][0] + seqs[k][1] for k in chunk], self.pad_id, self.device)
            # The answers are a continuation, not prompt: basis interventions act where generation has them act.
            with prompt_lengths(self.model, [len(seqs[k][0]) for k in chunk]):
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            for row, k in enumerate(chunk):
                p, t = seqs[k]
                step = logits[row, len(p) - 1:len(p) + len(t) - 1]
                nll = F.cross_entropy(step, torch.tensor(t, device=self.device)).item()
                readings[k] = Forced(t, step.argmax(-1).tolist(), nll)
        return [readings[(p, a if isinstance(a, str) else tuple(a))] for p, a in pairs]

    def _chunks(self, keys: list, length) -> list[list]:
        """Consecutive runs of at most `batch_size` sequences and `TOKENS_PER_BATCH` padded tokens."""
        chunks, chunk = [], []
        for k in keys:
            if chunk and (len(chunk) == self.batch_size or (len(chunk) + 1) * length(k) > TOKENS_PER_BATCH):
                chunks.append(chunk)
                chunk = []
            chunk.append(k)
        return chunks + [chunk] if chunk else chunks

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (token ids, cut at the end-of-sequence token)."""
        results = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = padded([self.prompt_ids(p) for p in prompts[start:start + self.batch_size]], self.pad_id,
                               self.device, left=True)
            width = ids.shape[1]
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=self.pad_id)
            for row in out[:, width:].tolist():
                eos = self.tokenizer.eos_token_id
                results.append(row[:row.index(eos)] if eos in row else row)
        return results

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
