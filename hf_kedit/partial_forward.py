"""Forward passes that compute only what the caller reads. Methods often run a
model for the states of a few early layers, or for the logits at a few
positions: the layers after the last one read, and the LM head at every other
position (on a small model, the head is a fifth of the weights), are wasted work.
Optimisation loops that run the same inputs step after step and train nothing
below some layer recompute the layers below it every step: wasted too.

Example:
    >>> run_until(model, [model.model.layers[5]], input_ids=ids)  # layers 0-5, then stops
    >>> with lm_head_at(model, (slice(None), -1)):
    ...     last_logits = model(input_ids=ids).logits  # [batch, vocab]
    >>> with replayed(layers_before(model, [model.model.layers[5].mlp])):
    ...     for step in range(steps): ...  # layers 0-4 run on the first step only
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .anatomy import anatomy_of


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


def layers_before(model, modules) -> list:
    """The decoder layers before the first one that is or holds one of `modules`
    (all of them when no layer holds one)."""
    layers = model.get_submodule(anatomy_of(model).layers)
    wanted = {id(m) for m in modules}
    index = next((i for i, layer in enumerate(layers) if any(id(m) in wanted for m in layer.modules())), len(layers))
    return list(layers[:index])


@contextmanager
def replayed(modules):
    """Inside the block, each module's forward runs on the first call only; later
    calls get (a copy of) what it returned then. For the layers below every
    trained parameter in a loop whose inputs do not change from step to step:
    the steps then run only the layers from the first trained one on. Forward
    hooks still run on the replayed output, as they ran on the recorded one."""
    own = [m.__dict__.get("forward") for m in modules]  # accelerate sets instance forwards
    for m in modules:
        m.forward = _replaying(m.forward)
    try:
        yield
    finally:
        for m, forward in zip(modules, own):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def _replaying(forward):
    recorded = []

    def replay(*args, **kwargs):
        if not recorded:
            recorded.append(forward(*args, **kwargs))
        out = recorded[0]
        # A copy: the next layer may write into its input.
        return tuple(t.clone() if torch.is_tensor(t) else t for t in out) if isinstance(out, tuple) else out.clone()
    return replay
