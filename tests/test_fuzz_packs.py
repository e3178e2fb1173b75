"""Fuzzing what parses pack files: mutated manifests and safetensors headers of all
three kinds give a typed error or a pack that runs, and never a changed model."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pack_fuzz import KINDS, good_folders, model_state, mutated_folder, run_case
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fuzz_bench(tmp_path_factory):
    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("fuzz")
    return model, good_folders(model, root), model_state(model), root


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 32 - 1))
def test_a_mutated_pack_fails_typed_or_runs_and_never_breaks_the_model(fuzz_bench, kind, seed):
    model, folders, reference, root = fuzz_bench
    folder = mutated_folder(folders[kind], root / "case", random.Random(seed))
    outcome = run_case(model, folder, reference)
    assert outcome.result in ("typed", "loaded"), outcome.error
    assert not outcome.broken, outcome.error
