"""Forward passes that compute only what the caller reads. Methods often run a
model for the states of a few early layers, or for the logits at a few
positions: the layers after the last one read, and the LM head at every other
position (on a small model, the head is a fifth of the weights), are wasted work.

Example:
    >>> run_until(model, [model.model.layers[5]], input_ids=ids)  # layers 0-5, then stops
    >>> with lm_head_at(model, (slice(None), -1)):
    ...     last_logits = model(input_ids=ids).logits  # [batch, vocab]
"""
from __future__ import annotations

from contextlib import contextmanager


class _Reached(Exception):
    """Raised by the last module a pass needs, to end that pass."""


def run_until(model, modules, **inputs) -> None:
    """Run `model` on `inputs` until every module in `modules` has run, and stop
    there: the layers after them and the LM head do not run. Hooks registered on
    those modules before the call see what they would see in a full pass."""
    modules = list(modules)
    done = set()

    def reached(module, args, out):
        done.add(id(module))
        if len(done) == len(modules):
            raise _Reached

    handles = [m.register_forward_hook(reached) for m in modules]
    try:
        model(**inputs)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()


@contextmanager
def lm_head_at(model, index, compute: bool = True):
    """Inside the block, the LM head reads only `hidden[index]` (e.g. `(slice(None),
    -1)` for the last column, `(rows, columns)` for one position per row) as one
    matrix product, and the logits have that shape: [..., vocab]. (transformers'
    `logits_to_keep` hands the head a strided slice, which CPU matmul turns into a
    batched product over copies of the head: slower than computing every column.)
    The list it yields gets each pass's `hidden[index]`; with `compute=False` the
    head reads nothing (logits [0, vocab]), for callers that take those states
    to the vocabulary themselves (`head_loss`)."""
    head = model.get_output_embeddings()
    shape, read = [], []

    def take(m, args):
        picked = args[0][index]
        read.append(picked)
        shape[:] = picked.shape[:-1]
        flat = picked.reshape(-1, picked.shape[-1])
        return (flat if compute else flat[:0],)

    def unflatten(m, args, out):
        return out.reshape(*shape, out.shape[-1]) if compute else out

    handles = [head.register_forward_pre_hook(take), head.register_forward_hook(unflatten)]
    try:
        yield read
    finally:
        for h in handles:
            h.remove()
