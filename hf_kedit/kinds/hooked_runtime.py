"""The runtime base of the kinds that act on hidden states through hooks
(basis_intervention, steering_map, codebook): one pair of hooks on the base model (the
decoder stack) that reads each forward call, kept per thread so that
concurrent forwards never see each other's calls, and the merge such kinds
cannot do."""
from __future__ import annotations

import threading

from torch import nn

from ..anatomy import anatomy_of
from ..errors import KeditError
from .prompt_calls import ForwardCall


class HookedRuntime:
    """What both hooked runtimes share. A subclass sets `kind` and `why_unmergeable`
    and registers its own hooks; it calls `watch_calls(True)` while it has any.

    Example:
        >>> class MyRuntime(HookedRuntime):
        ...     kind, why_unmergeable = "my_kind", "it acts on hidden states"
    """

    kind = ""
    why_unmergeable = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.enabled = True
        self.merged: set[str] = set()
        self.originals: dict = {}
        anatomy = anatomy_of(model)
        self.anatomy = anatomy
        self.layers = model.get_submodule(anatomy.layers)
        self.base = model.get_submodule(anatomy.layers.rpartition(".")[0])
        self.local = threading.local()  # this thread's call, and what outlives one call (a generation's routing)
        self._call_handles: list = []

    @property
    def call(self) -> ForwardCall | None:
        """The forward call this thread is running through the base model (None outside one)."""
        return getattr(self.local, "call", None)

    def watch_calls(self, on: bool) -> None:
        """Register (or remove) the hooks that read every forward call of the base model."""
        if on and not self._call_handles:
            self._call_handles = [self.base.register_forward_pre_hook(self._start_call, with_kwargs=True),
                                  self.base.register_forward_hook(self._end_call, always_call=True)]
        elif not on:
            for handle in self._call_handles:
                handle.remove()
            self._call_handles = []

    def _start_call(self, module, args, kwargs) -> None:
        self.local.call = ForwardCall.of(self.model, args, kwargs)

    def _end_call(self, module, args, output) -> None:
        self.local.call = None

    def merge(self, name: str) -> None:
        raise KeditError(f"pack {name!r} is a {self.kind} pack: {self.why_unmergeable}, which no weight can hold; "
                         "keep it hooked (merge=False)")

    def unmerge(self, name: str) -> None:
        """Nothing to do: `merge` never succeeds for these kinds."""
