"""Batched forward passes that every metric is computed from: teacher-forced
scoring of (prompt, answer) pairs and greedy generation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..anatomy import input_device
from ..batching import by_length, pad_id, padded
from ..kinds.prompt_calls import prompt_lengths
from ..partial_forward import lm_head_at

GENERATE_ROWS = 64


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
        self.device = input_device(model)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        # An answer follows its prompt after a space, as the benchmarks' targets are written.
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids

    @torch.no_grad()
    def forced(self, pairs: list[tuple[str, str | list[int]]], desc: str | None = None) -> list[Forced]:
        """Teacher-forced readings of (prompt, answer) pairs; an answer is text or token ids.
        Repeated pairs are read once; batches group similar lengths to waste little on
        padding, and the LM head runs only where an answer token is predicted. With
        `desc`, a progress bar in padded tokens."""
        seqs = {}
        for prompt, answer in pairs:
            key = (prompt, answer if isinstance(answer, str) else tuple(answer))
            if key not in seqs:
                seqs[key] = (self.prompt_ids(prompt), list(answer) if not isinstance(answer, str)
                             else self.answer_ids(answer))
        keys = list(seqs)
        sequences = [seqs[k][0] + seqs[k][1] for k in keys]
        batches = by_length(sequences, self.batch_size)
        readings = {}
        costs = [len(b) * max(len(sequences[i]) for i in b) for b in batches]
        # The bar counts padded tokens: what a batch costs, so the estimate holds as batches grow longer.
        bar = tqdm(total=sum(costs), desc=desc, unit="tok", disable=not desc or len(batches) < 2)
        for batch, cost in zip(batches, costs):
            chunk = [keys[i] for i in batch]
            ids, mask = padded([sequences[i] for i in batch], self.pad_id, self.device)
            # Position len(prompt) - 1 + j predicts answer token j.
            rows = [row for row, k in enumerate(chunk) for _ in seqs[k][1]]
            columns = [len(seqs[k][0]) - 1 + j for k in chunk for j in range(len(seqs[k][1]))]
            read = (torch.tensor(rows, device=self.device), torch.tensor(columns, device=self.device))
            # The answers are a continuation, not prompt: basis interventions act where generation has them act.
            with prompt_lengths(self.model, [len(seqs[k][0]) for k in chunk]), lm_head_at(self.model, read):
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            for k, step in zip(chunk, logits.split([len(seqs[k][1]) for k in chunk])):
                t = seqs[k][1]
                nll = F.cross_entropy(step, torch.tensor(t, device=self.device)).item()
                readings[k] = Forced(t, step.argmax(-1).tolist(), nll)
            bar.update(cost)
        bar.close()
        return [readings[(p, a if isinstance(a, str) else tuple(a))] for p, a in pairs]

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int | list[int],
                 desc: str | None = None) -> list[list[int]]:
        """Greedy continuations (token ids, cut at the end-of-sequence token) of at most
        `max_new_tokens` tokens, one number for all or one per prompt. Batches group
        prompts of similar needs and lengths, so few steps and little padding are wasted.
        With `desc`, a progress bar in generation steps."""
        needs = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        ids = [self.prompt_ids(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (needs[i], len(ids[i])))
        results = [None] * len(prompts)
        eos = self.tokenizer.eos_token_id
        batches = [order[start:start + GENERATE_ROWS] for start in range(0, len(order), GENERATE_ROWS)]
        # The bar counts generation steps: what a batch costs, whatever its rows.
        bar = tqdm(total=sum(max(needs[i] for i in rows) for rows in batches), desc=desc, unit="step",
                   disable=not desc or len(batches) < 2)
        for rows in batches:
            batch, mask = padded([ids[i] for i in rows], self.pad_id, self.device, left=True)
            out = self.model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max(needs[i] for i in rows),
                                      do_sample=False, pad_token_id=self.pad_id)
            for i, row in zip(rows, out[:, batch.shape[1]:].tolist()):
                row = row[:needs[i]]
                results[i] = row[:row.index(eos)] if eos in row else row
            bar.update(max(needs[i] for i in rows))
        bar.close()
        return results

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
