"""Progress bars that move with the work: loops over edits whose work comes in
optimisation steps count the steps, so a bar moves while a single edit is made
and its rate and estimate are per step, not per edit."""
from __future__ import annotations

from typing import Iterable, Iterator

from tqdm.auto import tqdm


class StepBar:
    """Iterate `items`, each worked on in up to `steps` steps; call `step()` after
    each. An item that stops early (its loss low enough) moves the bar past the
    steps it skipped, so the total is exact and the estimate errs long, not short.

    Example:
        >>> bar = StepBar(requests, config.steps, "rome: optimising values")
        >>> for edit in bar:
        ...     optimise_value(..., on_step=bar.step)
    """

    def __init__(self, items: Iterable, steps: int, desc: str, disable: bool = False):
        self.items, self.steps = list(items), max(int(steps), 1)
        self.bar = tqdm(total=len(self.items) * self.steps, desc=desc, unit="step", disable=disable)
        self._left = 0

    def __iter__(self) -> Iterator:
        for batch in self.batches(1):
            yield batch[0]

    def batches(self, size: int) -> Iterator[list]:
        """The items in lists of up to `size`, worked on together: `step()` once per
        item and step."""
        try:
            for start in range(0, len(self.items), size):
                batch = self.items[start:start + size]
                self._left = self.steps * len(batch)
                yield batch
                self.bar.update(self._left)
        finally:
            self.bar.close()

    def step(self) -> None:
        if self._left:
            self._left -= 1
            self.bar.update(1)
