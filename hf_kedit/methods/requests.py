"""Edit requests and layer settings turned into checked values, the same way for
every method: `EditRequestError` naming the first thing a method cannot carry
out, raised before any statistics, templates or optimisation."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EditRequestError
from ..pack import Edit, check_edits
from .setting import NOT_TUNED, setting


@dataclass
class RequestConfig:
    """Settings every method takes, applied to its requests before it runs
    (`make_pack` reads them beside the method's own)."""

    implied_facts: int = setting(0, "per edit, up to this many facts the model infers from it with the fact in "
                                 "context, added as edit requests of their own (`in_context.implied_edits`)",
                                 NOT_TUNED)

    def __post_init__(self):
        """`EditRequestError` for a count that is not a non-negative integer."""
        if type(self.implied_facts) is not int or self.implied_facts < 0:
            raise EditRequestError(f"implied_facts={self.implied_facts!r}: give a whole number of facts, 0 or more")


def check_requests(requests: list[Edit], subject_slot: bool = True) -> None:
    """Raise `EditRequestError` naming the first request a method cannot carry out:
    not a non-empty list of `Edit`s, a blank subject, prompt or target, a bad or
    repeated id, or (`subject_slot`, the locate-and-edit methods, which edit at the
    subject's last token) a prompt without exactly one "{}" where the subject goes.
    Every method calls it first, before any statistics or optimisation.

    Example:
        >>> check_requests([Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English")])
    """
    if not isinstance(requests, (list, tuple)) or not requests:
        raise EditRequestError(f"give a non-empty list of Edit requests, got {requests!r}")
    strangers = [r for r in requests if not isinstance(r, Edit)]
    if strangers:
        raise EditRequestError(f"requests must be hf_kedit.Edit objects, got {type(strangers[0]).__name__}: "
                               f"{strangers[0]!r}")
    check_edits(requests, EditRequestError)
    for edit in requests if subject_slot else ():
        if edit.prompt.count("{}") != 1:
            raise EditRequestError(f"edit {edit.id!r}: the prompt {edit.prompt!r} must hold \"{{}}\" exactly once, "
                                   f"where the subject goes{_slot_hint(edit)}")


def _slot_hint(edit: Edit) -> str:
    if edit.prompt.count("{}") == 0 and edit.subject in edit.prompt:
        return f": write {edit.prompt.replace(edit.subject, '{}', 1)!r}"
    if edit.prompt.count("{}") == 0:
        return f" (the subject {edit.subject!r} does not occur in it)"
    return ""


def check_layers(layers: list[int], num_layers: int, setting: str) -> None:
    """Raise `EditRequestError` unless `layers` (what the setting `setting` gave)
    are layer indices of a model with `num_layers` layers."""
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise EditRequestError(f"{setting} gives layers {bad or layers}, out of range: the model has {num_layers} "
                               f"layers (0 to {num_layers - 1}); give indices in that range or relative depths "
                               "in [0, 1)")


def resolve_layer(layer, num_layers: int, model=None, tokenizer=None, edits=()) -> int:
    """A layer index from an index, a relative depth in [0, 1), or "auto" (causal tracing of the edits)."""
    if layer == "auto":
        from ..trace import auto_layer

        return auto_layer(model, tokenizer, edits)
    if not isinstance(layer, (int, float)):
        raise EditRequestError(f"layer={layer!r}: give a layer index, a relative depth in [0, 1) or \"auto\"")
    index = layer if isinstance(layer, int) else round(layer * num_layers)
    check_layers([index], num_layers, f"layer={layer!r}")
    return index


def edit_layers(spec, num_layers: int, setting: str = "layers") -> list[int]:
    """Layer indices from indices, or from a (start, end) pair of relative depths
    (`setting` names the setting in errors)."""
    usage = f"{setting}={spec!r}: give layer indices or a (start, end) pair of relative depths"
    if not isinstance(spec, (list, tuple)) or not all(isinstance(x, (int, float)) for x in spec):
        raise EditRequestError(usage)
    if all(isinstance(x, int) for x in spec):
        layers = list(spec)
    elif len(spec) == 2:
        layers = list(range(round(spec[0] * num_layers), round(spec[1] * num_layers) + 1))
    else:
        raise EditRequestError(usage)
    check_layers(layers, num_layers, f"{setting}={spec!r}")
    return sorted(layers)


def subject_last_index(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in `text` (which contains `subject`)."""
    where = text.rfind(subject)
    if where < 0:
        raise ValueError(f"the subject {subject!r} does not occur in {text!r}")
    return len(tokenizer(text[:where + len(subject)]).input_ids) - 1
