"""Key statistics shared through the Hub (the local `hub_server`): `push_stats`, then
`key_second_moments(source=...)` and the methods' `stats_source`, on a tiny random
model with the default model's tokenizer. Caching itself: test_rome.py."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import save_file

from hf_kedit import Edit
from hf_kedit.methods.locate import self_sampled, stats
from hf_kedit.cli import main as kedit
from hf_kedit.errors import StatsError
from hf_kedit.pack.hub import file_sha256
from hf_kedit.methods.locate.memit import MEMITConfig, memit_edit
from hf_kedit.methods.locate.rome import ROMEConfig, rome_edit
from hf_kedit.methods.locate.stats import STATS_MANIFEST, key_second_moments, push_stats, stats_file
from test_bad_input import raises_exactly
from test_rome import tiny

CORPUS = ["The cat sat on the mat.", "Paris is the capital of France.", "One, two, three, four."] * 5
N_TOKENS = 60
EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture
def repo(hub_server, request):
    return f"user/{request.node.name.replace('[', '-').replace(']', '')}"


@pytest.fixture
def use_cache(monkeypatch, tmp_path):
    """Points the statistics cache at a new folder (a machine of its own); returns its stats folder."""
    def use(name: str) -> Path:
        monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / name))
        return tmp_path / name / "stats"
    return use


def no_recomputing(monkeypatch):
    def recompute(*args, **kwargs):
        raise AssertionError("statistics recomputed instead of read from the source or the cache")
    monkeypatch.setattr(stats, "_accumulate", recompute)


def test_pushed_statistics_load_by_repo_id_without_recomputing(tokenizer, repo, use_cache, monkeypatch):
    model = tiny(tokenizer)
    use_cache("pusher")
    pushed = key_second_moments(model, tokenizer, [0, 2], CORPUS, N_TOKENS, progress=False)
    no_recomputing(monkeypatch)  # the push reuses the pusher's cache
    push_stats(model, tokenizer, [0, 2], repo, CORPUS, N_TOKENS, progress=False)
    manifest = json.loads(Path(hf_hub_download(repo, STATS_MANIFEST)).read_text())
    assert manifest["format_version"] == 1 and manifest["n_tokens"] == N_TOKENS and manifest["max_length"] == 128
    assert manifest["corpus"].startswith("sha256:") and manifest["corpus_name"] == "list"
    assert manifest["layers"]["2"]["module"] == "model.layers.2.mlp.down_proj"
    assert manifest["layers"]["2"]["tokens_seen"] == N_TOKENS
    assert sorted(manifest["base_model"]["fingerprint"]) == ["model.layers.0.mlp.down_proj",
                                                             "model.layers.2.mlp.down_proj"]

    cache = use_cache("elsewhere")
    loaded = key_second_moments(model, tokenizer, [0, 2], CORPUS, N_TOKENS, progress=False, source=repo)
    assert all(torch.equal(loaded[layer], pushed[layer]) for layer in (0, 2))
    assert len(list(cache.glob("*.safetensors"))) == 2
    # Cached now: later calls need neither the source nor a statistics pass.
    assert torch.equal(key_second_moments(model, tokenizer, [2], CORPUS, N_TOKENS, progress=False)[2], pushed[2])


def test_rome_and_memit_read_statistics_from_stats_source(tokenizer, repo, use_cache, monkeypatch):
    model = tiny(tokenizer)
    settings = dict(steps=3, context_templates=((2, 3),), stats_corpus=CORPUS, stats_tokens=N_TOKENS)
    use_cache("pusher")
    local = rome_edit(model, tokenizer, [EDIT], ROMEConfig(layer=1, **settings), progress=False)
    push_stats(model, tokenizer, [1, 2], repo, CORPUS, N_TOKENS, progress=False)

    use_cache("elsewhere")
    no_recomputing(monkeypatch)
    shared = rome_edit(model, tokenizer, [EDIT], ROMEConfig(layer=1, stats_source=repo, **settings), progress=False)
    assert all(torch.equal(shared.tensors[name], local.tensors[name]) for name in local.tensors)
    assert shared.hyperparameters["stats_source"] == repo and shared.hyperparameters["stats_tokens"] == N_TOKENS
    pack = memit_edit(model, tokenizer, [EDIT], MEMITConfig(layers=(1, 2), stats_source=repo, **settings),
                      progress=False)
    assert len(pack.edits[0].tensors) == 4


def test_statistics_of_another_models_weights_are_refused(tokenizer, repo, use_cache, monkeypatch):
    other = tiny(tokenizer)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # a fine-tuned sibling
    use_cache("pusher")
    push_stats(other, tokenizer, [1], repo, CORPUS, N_TOKENS, progress=False)
    cache = use_cache("elsewhere")
    no_recomputing(monkeypatch)
    with raises_exactly(StatsError, r"computed on model.layers.1.mlp.down_proj of another model .*push statistics "
                                    r"from this model, or leave stats_source unset"):
        key_second_moments(tiny(tokenizer), tokenizer, [1], CORPUS, N_TOKENS, progress=False, source=repo)
    assert not cache.exists()


# ----- a shared folder broken one way at a time -------------------------------------------

@pytest.fixture(scope="module")
def shared_folder(hub_server, tokenizer, tmp_path_factory) -> Path:
    """Statistics of layers 0 and 1 of the tiny model as push_stats uploads them, downloaded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_KEDIT_CACHE", str(tmp_path_factory.mktemp("pusher")))
        push_stats(tiny(tokenizer), tokenizer, [0, 1], "user/shared-stats", CORPUS, N_TOKENS, progress=False)
    return Path(snapshot_download("user/shared-stats", local_dir=tmp_path_factory.mktemp("shared")))


def change_manifest(change):
    def breaker(folder: Path):
        manifest = json.loads((folder / STATS_MANIFEST).read_text())
        change(manifest)
        (folder / STATS_MANIFEST).write_text(json.dumps(manifest))
    return breaker


def replace_layer_1(tensors: dict):
    """Layer 1's file holding `tensors`, the manifest's sha256 updated to match."""
    def breaker(folder: Path):
        save_file(tensors, str(folder / stats_file(1)))
        change_manifest(lambda m: m["layers"]["1"].update(sha256=file_sha256(folder / stats_file(1))))(folder)
    return breaker


def flip_a_byte(folder: Path):
    path = folder / stats_file(1)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(folder: Path):
    path = folder / stats_file(1)
    path.write_bytes(path.read_bytes()[:100])
    change_manifest(lambda m: m["layers"]["1"].update(sha256=file_sha256(path)))(folder)


def drop_layer_1(manifest):
    del manifest["layers"]["1"]


NAN = torch.eye(64)
NAN[3, 3] = float("nan")

BROKEN = [  # (id, breaker, regex the message must match)
    ("no-manifest", lambda f: (f / STATS_MANIFEST).unlink(), r"holds no kedit_stats.json: it is not a statistics"),
    ("manifest-not-json", lambda f: (f / STATS_MANIFEST).write_text("{oops"), r"kedit_stats.json is not valid JSON"),
    ("manifest-a-list", lambda f: (f / STATS_MANIFEST).write_text("[]"), r"kedit_stats.json must hold a JSON object"),
    ("manifest-no-version", lambda f: (f / STATS_MANIFEST).write_text("{}"), r"not a JSON object with a format_version"),
    ("newer-version", change_manifest(lambda m: m.update(format_version=2)), r"format_version 2; this hf_kedit"),
    ("no-layers-entry", change_manifest(lambda m: m.pop("layers")), r"must hold corpus .* and layers"),
    ("tokens-a-string", change_manifest(lambda m: m.update(n_tokens="60")), r"n_tokens and max_length \(ints\)"),
    ("missing-layer", change_manifest(drop_layer_1), r"holds statistics of layers \[0\], not of \[1\]: push them"),
    ("missing-file", lambda f: (f / stats_file(1)).unlink(), r"lacks layer-1.safetensors"),
    ("flipped-byte", flip_a_byte, r"layer-1.safetensors is corrupted \(its sha256 differs"),
    ("truncated", truncate, r"layer-1.safetensors is not a readable safetensors file"),
    ("wrong-shape", replace_layer_1({"second_moment": torch.eye(32)}), r"float32 \[64, 64\] .* holds torch.float32 "
                                                                      r"\[32, 32\]"),
    ("wrong-dtype", replace_layer_1({"second_moment": torch.eye(64, dtype=torch.float16)}), r"holds torch.float16"),
    ("wrong-name", replace_layer_1({"C": torch.eye(64)}), r"holds no 'second_moment'"),
    ("nan", replace_layer_1({"second_moment": NAN}), r"holds NaN or inf values"),
    ("other-weights", change_manifest(lambda m: m["base_model"]["fingerprint"]["model.layers.1.mlp.down_proj"]
                                      .update(sha256_bf16="0" * 64)), r"of another model"),
]


@pytest.mark.parametrize("breaker, match", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_broken_statistics_folder_is_refused_and_caches_nothing(tokenizer, shared_folder, tmp_path, use_cache,
                                                                  monkeypatch, breaker, match):
    folder = Path(shutil.copytree(shared_folder, tmp_path / "shared"))
    breaker(folder)
    cache = use_cache("elsewhere")
    no_recomputing(monkeypatch)
    with raises_exactly(StatsError, match):
        key_second_moments(tiny(tokenizer), tokenizer, [0, 1], CORPUS, N_TOKENS, progress=False, source=folder)
    assert not cache.exists()  # not even layer 0's good file: all or nothing


@pytest.mark.parametrize("asked, match", [
    (dict(corpus=CORPUS, n_tokens=61), r"holds statistics over 60 tokens .*; these edits ask for 61 tokens"),
    (dict(corpus=None, n_tokens=N_TOKENS), r"ask for 60 tokens of corpus self-sampled:128"),
    (dict(corpus=CORPUS, n_tokens=N_TOKENS, max_length=64), r"ask for 60 tokens of corpus sha256:\w+ \(max_length 64"),
])
def test_statistics_over_another_corpus_are_refused(tokenizer, shared_folder, use_cache, monkeypatch, asked, match):
    cache = use_cache("elsewhere")
    no_recomputing(monkeypatch)
    monkeypatch.setattr(self_sampled, "sample_corpus", lambda *a, **k: pytest.fail("text sampled"))
    with raises_exactly(StatsError, match + ".*give the same corpus and token count"):
        key_second_moments(tiny(tokenizer), tokenizer, [0], progress=False, source=shared_folder, **asked)
    assert not cache.exists()


def test_cli_push_stats(tokenizer, repo, tmp_path, use_cache, monkeypatch, capsys):
    model = tiny(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    use_cache("pusher")
    assert kedit(["push-stats", repo, "--model", str(tmp_path / "model"), "--layers", "0,2", "--tokens", "40",
                  "--corpus", str(corpus)]) == 0
    assert f"--set stats_source={repo} --set stats_tokens=40 --set stats_corpus={corpus}" in capsys.readouterr().out
    pushed = key_second_moments(model, tokenizer, [0, 2], corpus, 40, progress=False)
    use_cache("elsewhere")
    no_recomputing(monkeypatch)
    loaded = key_second_moments(model, tokenizer, [0, 2], corpus, 40, progress=False, source=repo)
    assert all(torch.equal(loaded[layer], pushed[layer]) for layer in (0, 2))
    with pytest.raises(SystemExit):
        kedit(["push-stats", repo, "--layers", "five"])
    assert "give comma-separated layer indices" in capsys.readouterr().err
