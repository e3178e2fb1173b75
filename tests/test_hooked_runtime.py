"""The hooked kinds' shared runtime: how a forward call is read (prompt or a
cached continuation, on any transformers version), per-thread call state, and
all-or-nothing attaching."""
from __future__ import annotations

import threading

import pytest
import torch

from hf_kedit import load_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.kinds import basis_intervention, steering_map
from hf_kedit.kinds.prompt_calls import continues_cache
from packs import random_basis_pack, random_steering_pack
from test_bad_input import raises_exactly, untouched
from tiny_models import ARCHITECTURES, tiny_inputs, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_steps_are_read_as_continuations(arch):
    """The first call of `generate` is the prompt, every later one continues the cache,
    whatever name this transformers version gives the cache argument."""
    model = tiny_model(arch)
    base = model.get_submodule(anatomy_of(model).layers.rpartition(".")[0])
    seen = []
    base.register_forward_pre_hook(lambda m, args, kwargs: seen.append(continues_cache(args, kwargs)),
                                   with_kwargs=True)
    ids = tiny_inputs(batch=2, length=5)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)
        model(ids)  # a plain call afterwards is a prompt again
    assert seen == [False, True, True, True, False]


def _packs(model):
    ids = tiny_inputs(batch=4, length=6)
    with torch.no_grad():
        last = model(ids, output_hidden_states=True).hidden_states[-1][:, -1]
    return [random_basis_pack(model, layers=(0, 2), positions="f1+l2", gated=True, scale=2.0),
            random_steering_pack(model, last[:2], threshold=0.5, prefix="s", subject="T{}", apply="every")]


def test_concurrent_forwards_each_see_their_own_call():
    """Threads running differently shaped calls at once get what each gets alone."""
    model = tiny_model("llama")
    for i, pack in enumerate(_packs(model)):
        load_edits(model, pack, name=f"p{i}")
    inputs = [tiny_inputs(batch=b, length=n, seed=s) for b, n, s in ((1, 3, 1), (2, 6, 2), (4, 6, 1), (3, 9, 3))]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels alone and together: outputs comparable bit for bit
    try:
        with torch.no_grad():
            expected = [model(ids).logits for ids in inputs]
        errors, wrong, start = [], [], threading.Barrier(len(inputs))

        def run(i):
            start.wait()
            for _ in range(40):
                try:
                    with torch.no_grad():
                        out = model(inputs[i]).logits
                except Exception as e:  # noqa: BLE001 (counted, then asserted on)
                    errors.append(repr(e))
                    continue
                if not torch.equal(out, expected[i]):
                    wrong.append(i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(threads_before)
    assert errors == [] and wrong == []


@pytest.mark.parametrize("kind", ["basis_intervention", "steering_map"])
def test_a_put_that_fails_changes_nothing(kind, monkeypatch):
    """A failure while a runtime prepares a pack leaves the packs already attached as they were."""
    model = tiny_model("llama")
    first, second = (_packs(model)[0], random_basis_pack(model, seed=3, prefix="x", subject="X{}")) \
        if kind == "basis_intervention" else (_packs(model)[1], random_steering_pack(
            model, torch.randn(1, 32), prefix="y", subject="Y{}"))
    load_edits(model, first, name="first")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while preparing the hooks")
    module = basis_intervention if kind == "basis_intervention" else steering_map
    monkeypatch.setattr(module, "fuse" if kind == "basis_intervention" else "Router", broken)
    with untouched(model), raises_exactly(RuntimeError, "simulated failure"):
        load_edits(model, second, name="second")
