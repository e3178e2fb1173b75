"""The self-sampled statistics corpus: sampled once, kept in the cache, shipped
for the default model, and a texts file that does not record this model and
request is never used."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hf_kedit.methods.locate import self_sampled, stats
from hf_kedit.methods.locate.self_sampled import read_texts, sample_corpus, self_sampled_texts, texts_record
from hf_kedit.progress import StepBar
from hf_kedit.sampling import sample_texts
from test_rome import tiny

N_TOKENS, MAX_LENGTH = 64, 16


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def no_sampling(monkeypatch):
    monkeypatch.setattr(self_sampled, "sample_corpus", lambda *a, **k: pytest.fail("text sampled"))


def test_sampled_texts_hold_the_tokens_asked_for(tokenizer):
    texts = sample_corpus(tiny(tokenizer), tokenizer, N_TOKENS, MAX_LENGTH, progress=False)
    counts = [len(tokenizer(t, truncation=True, max_length=MAX_LENGTH).input_ids) for t in texts]
    assert sum(counts) >= N_TOKENS and max(counts) <= MAX_LENGTH


def test_each_generated_step_is_reported(tokenizer):
    steps = []
    texts = sample_texts(tiny(tokenizer), tokenizer, 3, 5, top_k=50, on_step=steps.append)
    assert len(texts) == 3 and steps and set(steps) == {3} and len(steps) <= 5


def test_texts_are_kept_and_read_back_instead_of_sampled(tokenizer, tmp_path, monkeypatch):
    model = tiny(tokenizer)
    first = self_sampled_texts(model, tokenizer, N_TOKENS, MAX_LENGTH, tmp_path, progress=False)
    [kept] = tmp_path.glob("sampled-*.json")
    assert json.loads(kept.read_text()) == {**texts_record(model, N_TOKENS, MAX_LENGTH), "texts": first}
    no_sampling(monkeypatch)
    assert self_sampled_texts(model, tokenizer, N_TOKENS, MAX_LENGTH, tmp_path, progress=False) == first


def test_shipped_texts_serve_the_model_they_record(tokenizer, tmp_path, monkeypatch):
    model = tiny(tokenizer)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    (shipped / "tiny.json").write_text(json.dumps({**texts_record(model, N_TOKENS, MAX_LENGTH), "texts": texts}))
    monkeypatch.setattr(self_sampled, "SHIPPED", shipped)
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "cache"))
    no_sampling(monkeypatch)
    C = stats.key_second_moments(model, tokenizer, [0], None, N_TOKENS, MAX_LENGTH, progress=False)[0]
    assert torch.allclose(C, stats.key_second_moments(model, tokenizer, [0], texts, N_TOKENS, MAX_LENGTH,
                                                      progress=False)[0])


@pytest.mark.parametrize("change", [
    {"sha256_bf16": "0" * 64},  # another model's texts
    {"n_tokens": N_TOKENS + 1},
    {"max_length": MAX_LENGTH * 2},
    {"module": "model.layers.1.mlp.down_proj"},
    {"texts": "one string"},
    {"texts": ["a text", 3]},
])
def test_a_texts_file_of_something_else_is_not_used(tokenizer, tmp_path, change):
    model = tiny(tokenizer)
    record = texts_record(model, N_TOKENS, MAX_LENGTH)
    path = tmp_path / "texts.json"
    path.write_text(json.dumps({**record, "texts": ["a text"], **change}))
    assert read_texts(path, record) is None


@pytest.mark.parametrize("content", ["", "{", "[\"an older cache file: a bare list\"]", "null", "\x00\xff"])
def test_a_broken_texts_file_is_sampled_again(tokenizer, tmp_path, content):
    model = tiny(tokenizer)
    record = texts_record(model, N_TOKENS, MAX_LENGTH)
    for path in [tmp_path / "x.json"]:
        path.write_bytes(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
        assert read_texts(path, record) is None
    assert read_texts(tmp_path / "absent.json", record) is None


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["module", "sha256_bf16", "n_tokens", "max_length", "texts", "other"]), inner, max_size=6),
    max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_the_texts_reader_never_raises(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "texts.json"
    path.write_bytes(data)
    record = {"module": "m", "sha256_bf16": "s", "n_tokens": 1, "max_length": 2}
    texts = read_texts(path, record)
    assert texts is None or all(isinstance(t, str) for t in texts)


@pytest.mark.default_model
def test_the_default_model_needs_no_sampling(default_model, tmp_path, monkeypatch):
    model, tokenizer = default_model
    no_sampling(monkeypatch)
    texts = self_sampled_texts(model, tokenizer, stats.StatisticsConfig().stats_tokens, 128, tmp_path, progress=False)
    counts = [len(tokenizer(t, truncation=True, max_length=128).input_ids) for t in texts]
    assert sum(counts) >= stats.StatisticsConfig().stats_tokens
    assert list(tmp_path.iterdir()) == []  # read from the package, nothing written


def test_a_step_bar_counts_every_step_of_every_item():
    bar = StepBar(["a", "b", "c"], steps=4, desc="")
    seen = []
    for item in bar:
        seen.append(bar.bar.n)  # where each item starts: every earlier item counted in full
        for _ in range({"a": 4, "b": 1, "c": 9}[item]):  # b stops early; c tries more steps than it has
            bar.step()
        seen.append(bar.bar.n)
    assert seen == [0, 4, 4, 5, 8, 12] and bar.bar.n == bar.bar.total == 12


def test_value_optimisation_reports_its_steps(tokenizer):
    from hf_kedit.methods.locate.core import ValueConfig, optimise_value
    from test_rome import EDIT
    model = tiny(tokenizer)
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    steps = []
    optimise_value(model, tokenizer, module, EDIT, ["{}"], ValueConfig(steps=3, stop_nll=0.0),
                   on_step=lambda: steps.append(1))
    assert len(steps) == 3
