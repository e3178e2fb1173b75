"""ROME: a rank-one update of one MLP output projection per edit, stored as a
`weight_delta` pack (rank one per edit)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ...anatomy import anatomy_of, execution_device
from ...errors import EditRequestError
from ...pack import Edit, EditPack
from ...progress import StepBar
from .stats import StatisticsConfig, corpus_name, key_second_moments
from ..builders import weight_delta_pack
from ..requests import check_requests, resolve_layer
from ..setting import setting
from .core import LOCATE, ValueConfig, context_templates, optimise_values, rank_one_update, template_counts


SOLVE_AT = ("prompt", "templates")


@dataclass
class ROMEConfig(ValueConfig, StatisticsConfig):
    """ROME's settings: the key statistics' (`StatisticsConfig`), the value
    optimisation's (`ValueConfig`), and where the update is written."""

    layer: float | int | str = setting(0.1, "the edited layer: an index, a relative depth in [0, 1) (rounded), or "
                                       "\"auto\" (causal tracing, hf_kedit.trace)", "chosen here by cross-validation "
                                       "over counterfact.json cases 200-499 and confirmed on 500-639 (layer 3 of 30 "
                                       "against EasyEdit's 5: locality kept, some generality lost; docs/benchmarks.md); "
                                       f"\"auto\" measured here to cost locality ({LOCATE})")
    context_templates: tuple = setting(((5, 5),), "(how many, tokens) pairs of texts the model samples to put "
                                       "before the prompt", "measured here on held-apart cases 100-139: as good as "
                                       f"five of 5 and five of 10 tokens, 23 % faster ({LOCATE}); EasyEdit's Llama "
                                       "settings: ten of 5 and ten of 10")
    solve_at: str = setting("prompt", "the key at which the update adds exactly v* − v: \"prompt\" (the bare "
                            "prompt's key) or \"templates\" (the key averaged over the context templates, as "
                            "r-ROME: better for many edits attached together, some single-edit efficacy lost)",
                            f"ROME's reference code; \"templates\" measured here ({LOCATE})")


def rome_edit(model, tokenizer, requests: list[Edit], config: ROMEConfig | None = None,
              progress: bool = True) -> EditPack:
    """One rank-one ROME update per request, each computed on the unedited model.

    Example:
        >>> edit = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
        >>> pack = rome_edit(model, tokenizer, [edit])
    """
    check_requests(requests)
    return rank_one_edits(model, tokenizer, requests, config or ROMEConfig(), "rome", progress=progress)


def rank_one_edits(model, tokenizer, requests: list[Edit], config: ROMEConfig, method: str,
                   alignment_for=None, hyperparameters: dict | None = None, progress: bool = True) -> EditPack:
    """The ROME loop, shared with STEAM: per request, k̄, v* (with the alignment term
    `alignment_for(edit, layer)` returns, if any) and the rank-one closed form."""
    template_counts(config.context_templates)
    if config.solve_at not in SOLVE_AT:
        raise EditRequestError(f"solve_at={config.solve_at!r}: give one of {', '.join(map(repr, SOLVE_AT))}")
    anatomy = anatomy_of(model)
    layer = resolve_layer(config.layer, anatomy.num_layers, model, tokenizer, requests)
    name = anatomy.mlp_out(layer)
    module = model.get_submodule(name)
    C = (key_second_moments(model, tokenizer, [layer], config.stats_corpus, config.stats_tokens,
                            progress=progress, source=config.stats_source)[layer].to(execution_device(model, name))
         if config.covariance else None)
    templates = context_templates(model, tokenizer, config.context_templates)
    factors = {}
    bar = StepBar(requests, config.steps, f"{method}: optimising values", disable=not progress)
    for batch in bar.batches(config.batch_size):
        alignments = [alignment_for(edit, layer) if alignment_for else None for edit in batch]
        for edit, solved in zip(batch, optimise_values(model, tokenizer, module, batch, templates, config,
                                                       alignments, bar.step)):
            key = solved.key if config.solve_at == "templates" else solved.current_key
            factors[edit.id] = {name: rank_one_update(solved.key, solved.value, key, solved.current_value, C)}
    recorded = {**asdict(config), "layer": layer, "stats_corpus": corpus_name(config.stats_corpus),
                **(hyperparameters or {})}
    return weight_delta_pack(model, method, recorded, requests, factors)
