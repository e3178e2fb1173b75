"""SVF (Transformer²'s singular-value fine-tuning) on an edit: one vector z per MLP
output projection of a band of layers scales that weight's singular values,
W' = U diag(S ⊙ z) Vᵀ, trained on the target's cross-entropy with KL terms that
keep what the model says of the subject itself ("{subject} is a") and of the
relation with a neutral subject in the prompt, and stored as a `singular_scale` pack.
A change of singular values acts on every input, so the second term is what
keeps other subjects' answers (docs/methods.md)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ...anatomy import anatomy_of, input_device
from ...batching import pad_id
from ...kinds.singular_scale import decomposition
from ...kinds.weight_delta import low_rank_delta
from ...pack import Edit, EditPack
from ...progress import StepBar
from ..builders import singular_scale_pack
from ..requests import check_requests, edit_layers
from ..setting import NOT_TUNED, setting
from ..locate.self_sampled import self_sampled_texts
from ..locate.stats import TEXT_LENGTH, StatisticsConfig, stats_dir
from ..teacher_forcing import Kept, fit_target, frozen, teacher_forced


SWEEP = "chosen here on CounterFact cases 100-119 (docs/bench/svf-sweep)"


@dataclass
class SVFConfig:
    """SVF's settings: which weights get a z, and how each edit's z are trained."""

    layers: tuple = setting((0.0, 0.8), "the layers whose MLP output projection gets a z: indices, or a (start, "
                            "end) pair of relative depths", NOT_TUNED)
    steps: int = setting(40, "most Adam steps per edit", NOT_TUNED)
    lr: float = setting(1e-2, "Adam's step size on z (which starts at 1)", NOT_TUNED)
    stop_loss: float = setting(0.05, "stop once the target's cross-entropy is below this", NOT_TUNED)
    kl_factor: float = setting(1.0, "weight of the KL term that keeps \"{subject} is a\"'s next-token distribution",
                               NOT_TUNED)
    relation_kl_factor: float = setting(10.0, "weight of the KL term that keeps the edit's prompt with its subject "
                                        "replaced by each of `neutral_subjects` (what the relation says without "
                                        "this subject)", f"{SWEEP}: locality tf 0.54 against 0.41 without it")
    neutral_subjects: tuple = setting(("someone", "something", "it"), "the subjects put in the prompt's slot for "
                                      "that term", NOT_TUNED)
    text_kl_factor: float = setting(0.0, "weight of the mean KL over every token of `text_rows` texts the model "
                                    "wrote itself (the key statistics' corpus): what the edit must leave alone",
                                    f"{SWEEP}: 100 gives locality tf 0.57 against 0.41, at 2.5 times the time")
    text_rows: int = setting(8, "how many of those texts", NOT_TUNED)
    text_length: int = setting(32, "tokens read of each", NOT_TUNED)


def svf_edit(model, tokenizer, requests: list[Edit], config: SVFConfig | None = None,
             progress: bool = True) -> EditPack:
    """Train one set of singular-value scales z per request; returns a `singular_scale` pack.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = svf_edit(model, tokenizer, [edit])
    """
    check_requests(requests, subject_slot=False)
    config = config or SVFConfig()
    anatomy = anatomy_of(model)
    layers = edit_layers(config.layers, anatomy.num_layers)
    modules = [anatomy.mlp_out(layer) for layer in layers]
    decompositions = {name: decomposition(model, name) for name in modules}
    texts = own_texts(model, tokenizer, config) if config.text_kl_factor else []
    text_weight = config.text_kl_factor / max(sum(map(len, texts)), 1)
    zs = {}
    bar = StepBar(requests, config.steps, "svf: training", disable=not progress)
    for edit in bar:
        z = {name: torch.ones_like(S, requires_grad=True) for name, (_, S, _) in decompositions.items()}
        ids, labels, _ = teacher_forced(tokenizer, edit.text, edit.target_new, input_device(model))
        essence = tokenizer(f"{edit.subject} is a").input_ids
        neutral = ([tokenizer(edit.prompt.replace("{}", s)).input_ids for s in config.neutral_subjects]
                   if config.relation_kl_factor and "{}" in edit.prompt else [])
        rows = [essence, *neutral, *texts]
        weights = ([[0.0] * (len(essence) - 1) + [config.kl_factor]]
                   + [[0.0] * (len(r) - 1) + [config.relation_kl_factor / len(neutral)] for r in neutral]
                   + [[text_weight] * len(t) for t in texts])
        kept = Kept.of(model, rows, weights, pad_id(tokenizer))
        with frozen(model), scaled(model, decompositions, z):
            fit_target(model, ids, labels, torch.optim.Adam(list(z.values()), lr=config.lr), config.steps,
                       config.stop_loss, bar.step, kept=kept, pad=pad_id(tokenizer),
                       trained=[model.get_submodule(name) for name in modules])
        zs[edit.id] = {name: v.detach() for name, v in z.items()}
    spectra = {name: S for name, (_, S, _) in decompositions.items()}
    return singular_scale_pack(model, "svf", {**asdict(config), "layers": layers}, requests, zs, spectra)


def own_texts(model, tokenizer, config: SVFConfig) -> list[list[int]]:
    """The first `text_rows` texts of the key statistics' default corpus (text the model
    wrote itself, shipped for the default model, cached for others), `text_length` tokens each."""
    texts = self_sampled_texts(model, tokenizer, StatisticsConfig.stats_tokens, TEXT_LENGTH, stats_dir())
    return [tokenizer(t).input_ids[:config.text_length] for t in texts[:config.text_rows]]


@contextmanager
def scaled(model, decompositions: dict, z: dict):
    """Run `model` with each named weight's singular values scaled by its z, for the
    block: the output gains U ((S ⊙ (z − 1)) ⊙ Vᵀx), differentiable in z."""
    # The kind's factors, A = Vᵀ and B = U diag(S ⊙ (z − 1)), so training computes what the attached pack will.
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, U=U, S=S, Vh=Vh, v=z[name]: out + low_rank_delta(
            args[0], Vh.to(args[0].device), (U * (S * (v - 1))).to(args[0].device)))
        for name, (U, S, Vh) in decompositions.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
