"""Packs through a Hub-compatible server on 127.0.0.1, driven by the real huggingface_hub client."""
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from hf_kedit import EditPack, load_edits, remove_edits, stack_of
from hf_kedit.cli import main as kedit
from packs import random_pack
from tiny_models import tiny_inputs, tiny_model


def logits(model):
    with torch.no_grad():
        return model(tiny_inputs()).logits


def edited(pack, **kwargs):
    return logits(load_edits(tiny_model("llama"), pack, **kwargs))


@pytest.fixture
def repo(hub_server, request):
    return f"user/{request.node.name.replace('[', '-').replace(']', '')}"


def test_push_then_load_by_repo_id_tag_and_sha(repo):
    model = tiny_model("llama")
    pack = random_pack(model, layers=(0, 2), n_edits=2)
    sha = pack.push_to_hub(repo)
    HfApi().create_tag(repo, tag="v1")
    local = edited(pack)
    for revision in (None, "v1", sha):
        fresh = tiny_model("llama")
        load_edits(fresh, repo, revision=revision)
        assert torch.equal(logits(fresh), local)
        assert stack_of(fresh).packs[repo].pack.revision == sha


def test_a_pinned_revision_returns_the_old_pack_after_a_new_push(repo):
    model = tiny_model("llama")
    old, new = random_pack(model, seed=1), random_pack(model, seed=2)
    old_sha = old.push_to_hub(repo)
    new_sha = new.push_to_hub(repo, commit_message="second edit")
    assert new_sha != old_sha
    assert torch.equal(edited(repo, revision=old_sha), edited(old))
    assert torch.equal(edited(repo), edited(new))
    assert not torch.equal(edited(old), edited(new))


def test_push_to_a_branch(repo):
    model = tiny_model("llama")
    main_pack, branch_pack = random_pack(model, seed=1), random_pack(model, seed=3)
    main_pack.push_to_hub(repo)
    branch_pack.push_to_hub(repo, branch="dev")
    assert torch.equal(edited(repo, revision="dev"), edited(branch_pack))
    assert torch.equal(edited(repo), edited(main_pack))


def test_removal_of_a_hub_pack_is_exact(repo):
    model = tiny_model("llama")
    base = logits(model)
    random_pack(model).push_to_hub(repo)
    load_edits(model, repo)
    assert not torch.equal(logits(model), base)
    remove_edits(model, repo)
    assert torch.equal(logits(model), base)


def test_model_card_on_the_hub(repo):
    model = tiny_model("llama")
    model.config._name_or_path = "someone/tiny-llama"
    pack = random_pack(model, n_edits=3)
    pack.push_to_hub(repo)
    card = ModelCard.load(hf_hub_download(repo, "README.md"))
    assert card.data.library_name == "hf-kedit"
    assert card.data.base_model == "someone/tiny-llama"
    assert {"knowledge-editing", "random", "weight_delta"} <= set(card.data.tags)
    assert card.text.count("| e") == 3  # one table row per edit
    assert f'load_edits(model, "{repo}", tokenizer=tokenizer)' in card.text
    assert 'tokenizer = AutoTokenizer.from_pretrained("someone/tiny-llama")' in card.text


def test_missing_repo_and_revision_are_hub_errors_and_leave_the_model(repo):
    model = tiny_model("llama")
    base = logits(model)
    with pytest.raises(RepositoryNotFoundError):
        load_edits(model, "user/no-such-repo")
    random_pack(model).push_to_hub(repo)
    with pytest.raises(RevisionNotFoundError):
        load_edits(model, repo, revision="no-such-tag")
    assert torch.equal(logits(model), base) and len(stack_of(model)) == 0


def test_cli_push_pull_info(repo, tmp_path, capsys):
    model = tiny_model("llama")
    pack = random_pack(model, n_edits=2)
    pack.save_pretrained(tmp_path / "pack")
    assert kedit(["push", str(tmp_path / "pack"), repo]) == 0
    assert kedit(["pull", repo, str(tmp_path / "pulled")]) == 0
    pulled = EditPack.from_pretrained(tmp_path / "pulled")
    assert all(torch.equal(pulled.tensors[k], pack.tensors[k]) for k in pack.tensors)
    capsys.readouterr()
    assert kedit(["info", repo]) == 0
    out = capsys.readouterr().out
    assert "weight_delta" in out and "e0: The capital of S0 is Old -> T0-0" in out and "e1:" in out
    assert kedit(["info", str(tmp_path / "missing")]) == 2
    assert "FileNotFoundError" in capsys.readouterr().err
