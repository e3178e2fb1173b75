"""Causal tracing (ROME, Meng et al. 2022): corrupt the subject's token
embeddings with noise, then restore one clean hidden state (or MLP output) at a
time and measure how much of the answer's probability comes back. The layer
where restoring the subject's last token helps most is where the fact is read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .anatomy import anatomy_of, hidden_states, input_device
from .partial_forward import lm_head_at

TRACED = ("hidden", "mlp")


@dataclass
class Trace:
    """Probabilities of `answer` with the subject corrupted and one state restored:
    `scores[t, l]` for token `t` and layer `l`."""

    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    kind: str
    clean: float
    corrupted: float
    scores: torch.Tensor

    @property
    def subject_last(self) -> int:
        return self.subject_range[1] - 1

    def best_layer(self) -> int:
        """The layer whose restored state at the subject's last token recovers the most."""
        return int(self.scores[self.subject_last].argmax())

    def plot(self, path: str | Path) -> None:
        """The familiar heatmap: tokens down, layers across (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 0.35 * len(self.tokens) + 1.6))
        image = ax.pcolormesh(self.scores.numpy(), cmap="Purples" if self.kind == "hidden" else "Greens",
                              vmin=self.corrupted)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(self.tokens))],
                      [t + ("*" if self.subject_range[0] <= i < self.subject_range[1] else "")
                       for i, t in enumerate(self.tokens)])
        ax.set_xlabel(f"layer (restored {'hidden state' if self.kind == 'hidden' else 'MLP output'})")
        ax.set_title(f"p({self.answer!r}): clean {self.clean:.3f}, corrupted {self.corrupted:.3f}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@torch.no_grad()
def trace(model, tokenizer, prompt: str, subject: str, kind: str = "hidden", samples: int = 5,
          noise: float = 3.0, seed: int = 0, progress: bool = True) -> Trace:
    """Trace where `model` reads the fact `prompt` completes about `subject`.

    The answer is the model's own next token. Noise: Gaussian, `noise` times the
    standard deviation of the input embeddings, the same `samples` draws for every
    restored state.

    Example:
        >>> t = trace(model, tokenizer, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
        >>> t.plot("trace.png"); t.best_layer()
    """
    if kind not in TRACED:
        raise ValueError(f"kind={kind!r}: use one of {TRACED}")
    where = prompt.find(subject)
    if where < 0:
        raise ValueError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    anatomy = anatomy_of(model)
    ids = tokenizer(prompt).input_ids
    # The prefix without its trailing space: that space belongs to the subject's first token.
    start = len(tokenizer(prompt[:where].rstrip()).input_ids)
    end = len(tokenizer(prompt[:where + len(subject)]).input_ids)
    inputs = torch.tensor([ids], device=input_device(model))
    modules = [model.get_submodule(anatomy.layer(l) if kind == "hidden" else anatomy.mlp_out(l))
               for l in range(anatomy.num_layers)]

    clean_states = []
    handles = [m.register_forward_hook(lambda mod, a, out: clean_states.append(hidden_states(out)[0])) for m in modules]
    with lm_head_at(model, (slice(None), -1)):
        probs = model(inputs).logits[0].float().softmax(-1)
    for h in handles:
        h.remove()
    answer_id = int(probs.argmax())

    embeddings = model.get_input_embeddings()
    clean_embeds = embeddings(inputs)
    generator = torch.Generator().manual_seed(seed)
    scale = noise * embeddings.weight.float().std().item()
    draw = torch.randn(samples, end - start, clean_embeds.shape[-1], generator=generator) * scale
    corrupted = clean_embeds.repeat(samples, 1, 1)
    corrupted[:, start:end] += draw.to(corrupted.device, corrupted.dtype)

    def answer_probability(embeds, restore=None):
        handle = None
        if restore is not None:
            layer, positions = restore

            def put_back(mod, a, out):
                h = hidden_states(out).clone()
                rows = torch.arange(len(h), device=h.device)
                h[rows, positions] = clean_states[layer][positions]
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handle = modules[layer].register_forward_hook(put_back)
        try:
            with lm_head_at(model, (slice(None), -1)):
                logits = model(inputs_embeds=embeds).logits.float()
        finally:
            if handle is not None:
                handle.remove()
        return logits.softmax(-1)[:, answer_id]

    low = answer_probability(corrupted).mean().item()
    tokens = len(ids)
    scores = torch.zeros(tokens, anatomy.num_layers)
    # One batch per layer: every (token, noise sample) pair restores its own position.
    batch = corrupted.repeat(tokens, 1, 1)
    positions = torch.arange(tokens, device=inputs.device).repeat_interleave(samples)
    for layer in tqdm(range(anatomy.num_layers), desc="causal trace (layers)", disable=not progress):
        p = answer_probability(batch, (layer, positions))
        scores[:, layer] = p.view(tokens, samples).mean(1).cpu()
    return Trace([tokenizer.decode([i]) for i in ids], (start, end), tokenizer.decode([answer_id]), kind,
                 probs[answer_id].item(), low, scores)


def auto_layer(model, tokenizer, edits, traced: int = 3) -> int:
    """The edit layer for `layer="auto"`: where restoring the MLP output at the
    subject's last token recovers the most, averaged over the first `traced` edits."""
    traces = [trace(model, tokenizer, e.text, e.subject, kind="mlp", progress=False) for e in edits[:traced]]
    return int(torch.stack([t.scores[t.subject_last] for t in traces]).mean(0).argmax())
