"""Methods make packs: each takes a model, a tokenizer and edit requests and
returns an `EditPack`, leaving the model as it found it. The methods live in
families, one folder each, with the family's shared core beside one small
file per method: `locate/` (ROME, MEMIT, AlphaEdit, STEAM: locate-and-edit,
with its key statistics and head loss), `representation/` (ReFT, BaFT: basis
interventions), `steering/` (SAKE, ActAdd: steering maps), `finetune/`
(LoRA, AdaLoRA, FT-L, SVF), `lifelong/` (UltraEdit: closed-form batches that
continue a running state), `learned/` (MEND: an editor network trained once
per base model), `memory/` (GRACE: edits kept as entries beside the model)
and `distill/` (context distillation: the model taught to answer without a
fact in context as it does with it). `in_context.py` is how facts are stated
in a prompt and what the model infers from them there, `requests.py` checks
requests and layer settings for all of them and holds the settings every
method takes (`RequestConfig`), `history.py` is what sequential methods carry
between batches, `builders.py` builds their packs; this module is the
registry alone.
"""
from __future__ import annotations

from dataclasses import fields

from torch import nn

from ..errors import EditRequestError
from ..pack import Edit, EditPack
from .distill.distill import DistillConfig, distill_edit
from .finetune.adalora import AdaLoRAConfig, adalora_edit
from .finetune.ft import FTConfig, ft_edit
from .finetune.lora import LoRAConfig, lora_edit
from .finetune.svf import SVFConfig, svf_edit
from .learned.mend import MENDConfig, MENDTrainingConfig, mend_edit
from .lifelong.ultraedit import LifelongNorm, UltraEditConfig, ultraedit_edit
from .locate.alphaedit import AlphaEditConfig, EditedKeys, alphaedit_edit
from .locate.memit import MEMITConfig, memit_edit
from .locate.rome import ROMEConfig, rome_edit
from .locate.steam import STEAMConfig, steam_edit
from .in_context import implied_edits
from .memory.grace import GRACEConfig, grace_edit
from .representation.baft import BaFTConfig, baft_edit
from .representation.reft import ReFTConfig, reft_edit
from .representation.shared_bases import SharedBases
from .requests import RequestConfig, check_requests
from .steering.actadd import ActAddConfig, actadd_edit
from .steering.sake import SAKEConfig, sake_edit

METHODS = {"actadd": (actadd_edit, ActAddConfig), "adalora": (adalora_edit, AdaLoRAConfig), "alphaedit": (alphaedit_edit, AlphaEditConfig),
           "baft": (baft_edit, BaFTConfig), "distill": (distill_edit, DistillConfig), "ft": (ft_edit, FTConfig), "grace": (grace_edit, GRACEConfig),
           "lora": (lora_edit, LoRAConfig), "memit": (memit_edit, MEMITConfig),
           "mend": (mend_edit, MENDConfig),
           "reft": (reft_edit, ReFTConfig), "rome": (rome_edit, ROMEConfig), "sake": (sake_edit, SAKEConfig),
           "steam": (steam_edit, STEAMConfig), "svf": (svf_edit, SVFConfig), "ultraedit": (ultraedit_edit, UltraEditConfig)}

# Methods trained once per base model before they edit: their training's config.
TRAINING = {"mend": MENDTrainingConfig}


# Methods that carry a history from one batch of a sequence to the next: its type.
HISTORIES = {"alphaedit": EditedKeys, "baft": SharedBases, "ultraedit": LifelongNorm}


def new_history(method: str):
    """An empty history for a sequence of `method`'s batches, or None if it keeps none."""
    return HISTORIES[method]() if method in HISTORIES else None


def make_pack(method: str, model: nn.Module, tokenizer, edits: list[Edit], settings: dict | None = None,
              progress: bool = True, history=None) -> EditPack:
    """Run the method called `method` on `edits` with `settings` (its config's fields,
    and those of `RequestConfig`, which every method takes); `history`: what the
    method keeps of the earlier batches of a sequence (`new_history`), read and
    extended.

    Example:
        >>> pack = make_pack("lora", model, tokenizer, edits, {"rank": 2})
        >>> pack = make_pack("rome", model, tokenizer, edits, {"implied_facts": 2})
    """
    if method not in METHODS:
        raise EditRequestError(f"unknown method {method!r}: the methods that make packs are {sorted(METHODS)}")
    edit, config_class = METHODS[method]
    own, every = {f.name for f in fields(config_class)}, {f.name for f in fields(RequestConfig)}
    unknown = set(settings or {}) - own - every
    if unknown:
        raise EditRequestError(f"{method} has no setting {sorted(unknown)}; its settings are {sorted(own)}, and "
                               f"every method's {sorted(every)}")
    if history is not None and not isinstance(history, HISTORIES.get(method, ())):
        raise EditRequestError(f"history={type(history).__name__}: {method} keeps "
                               + (f"a {HISTORIES[method].__name__}" if method in HISTORIES else "no history"))
    requests = RequestConfig(**{k: v for k, v in (settings or {}).items() if k in every})
    config = config_class(**{k: v for k, v in (settings or {}).items() if k in own})
    if requests.implied_facts:
        check_requests(edits, subject_slot=False)  # bad requests fail before the model writes anything
        edits = [*edits, *implied_edits(model, tokenizer, edits, requests.implied_facts)]
    extra = {"history": history} if history is not None else {}
    return edit(model, tokenizer, edits, config, progress=progress, **extra)
