"""ROME's pieces on tiny random models with the default model's tokenizer."""
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.methods.locate.core import (ValueConfig, context_templates, io_at_subject, key_at_subject,
                                          optimise_value, rank_one_update)
from hf_kedit.methods.requests import subject_last_index
from hf_kedit.methods.locate import core as locate
from hf_kedit.methods.locate import rome as rome_module
from hf_kedit.methods.locate.rome import ROMEConfig, rome_edit
from hf_kedit.methods.locate import self_sampled, stats
from hf_kedit.methods.locate.head_loss import head_cross_entropy
from packs import delta_matrix

EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def tiny(tokenizer, arch="llama", **overrides):
    extra = dict(n_embd=32, n_layer=3, n_head=4, n_positions=128) if arch == "gpt2" else dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128)
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id or 0,
                                  eos_token_id=tokenizer.eos_token_id, **{**extra, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("with_covariance", [False, True])
def test_the_rank_one_update_maps_the_current_key_to_the_new_value(with_covariance):
    g = torch.Generator().manual_seed(0)
    W, k_bar, k, v_star = (torch.randn(6, 10, generator=g), torch.randn(10, generator=g),
                           torch.randn(10, generator=g), torch.randn(6, generator=g))
    X = torch.randn(200, 10, generator=g)
    C = X.T @ X / 200 if with_covariance else None
    A, B = rank_one_update(k_bar, v_star, k, W @ k, C)
    assert A.shape == (1, 10) and B.shape == (6, 1)
    torch.testing.assert_close((W + B @ A) @ k, v_star, atol=1e-5, rtol=1e-5)
    # u is C⁻¹k̄ (normalised): the update is orthogonal, under C, to keys C-orthogonal to k̄.
    direction = torch.linalg.solve(C, k_bar) if with_covariance else k_bar
    torch.testing.assert_close(A[0], direction / direction.norm(), atol=1e-5, rtol=1e-5)


def test_the_rank_one_update_leaves_the_statistics_as_they_were():
    X = torch.randn(50, 10, dtype=torch.float64)
    C = X.T @ X / 50
    before = C.clone()
    rank_one_update(torch.randn(10), torch.randn(6), torch.randn(10), torch.randn(6), C)
    assert torch.equal(C, before)


def test_subject_last_index_points_at_the_subject(tokenizer):
    text = EDIT.text
    index = subject_last_index(tokenizer, text, EDIT.subject)
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids[:index + 1]).endswith("Darrieux")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rome_pack_makes_the_module_output_the_optimised_value(tokenizer, arch):
    model = tiny(tokenizer, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ROMEConfig(layer=1, covariance=False, steps=5, context_templates=((2, 3),))
    pack = rome_edit(model, tokenizer, [EDIT], config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the method changed nothing
    name = anatomy_of(model).mlp_out(1)
    assert list(pack.kind_config["modules"]) == [name]
    A = pack.tensors[f"e0.{name}.lora_A"]
    assert A.shape[0] == 1  # rank one
    module = model.get_submodule(name)
    k, v = io_at_subject(model, tokenizer, module, EDIT)
    load_edits(model, pack, name="rome")
    k_after, v_after = io_at_subject(model, tokenizer, module, EDIT)
    torch.testing.assert_close(k_after, k)  # the key is read before the edited module
    expected = v + (delta_matrix(pack, name) @ k)
    torch.testing.assert_close(v_after, expected, atol=1e-4, rtol=1e-4)
    remove_edits(model, "rome")


def test_statistics_are_cached_and_reused(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path))
    model = tiny(tokenizer)
    corpus = ["The cat sat on the mat.", "Paris is the capital of France.", "One, two, three, four."] * 5
    C = stats.key_second_moments(model, tokenizer, [1], corpus, n_tokens=60, progress=False)[1]
    assert C.shape == (64, 64) and torch.allclose(C, C.T)
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 1

    def no_recompute(*args, **kwargs):
        raise AssertionError("statistics recomputed instead of read from the cache")

    monkeypatch.setattr(stats, "_accumulate", no_recompute)
    assert torch.equal(stats.key_second_moments(model, tokenizer, [1], corpus, n_tokens=60, progress=False)[1], C)
    with pytest.raises(AssertionError, match="recomputed"):  # another layer is another statistic
        stats.key_second_moments(model, tokenizer, [2], corpus, n_tokens=60, progress=False)


def test_statistics_are_the_second_moment_of_the_keys(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path))
    model = tiny(tokenizer)
    corpus = ["The cat sat on the mat.", "Paris is the capital of France and a city."]
    both = stats.key_second_moments(model, tokenizer, [0, 2], corpus, n_tokens=10_000, progress=False)
    C = both[0]
    keys = []
    module = model.get_submodule(anatomy_of(model).mlp_out(0))
    handle = module.register_forward_pre_hook(lambda m, a: keys.append(a[0][0]))
    for text in corpus:
        model(torch.tensor([tokenizer(text).input_ids]))
    handle.remove()
    K = torch.cat(keys)
    torch.testing.assert_close(C, K.T @ K / len(K), atol=1e-5, rtol=1e-4)


def test_self_sampled_text_is_sampled_once_for_all_layers(tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path))
    model = tiny(tokenizer)
    first = stats.key_second_moments(model, tokenizer, [0], None, n_tokens=64, max_length=16, progress=False)[0]
    assert first.shape == (64, 64) and torch.isfinite(first).all()

    def no_sampling(*args, **kwargs):
        raise AssertionError("text sampled again")

    monkeypatch.setattr(self_sampled, "sample_corpus", no_sampling)
    second = stats.key_second_moments(model, tokenizer, [0, 2], None, n_tokens=64, max_length=16, progress=False)
    assert torch.equal(second[0], first) and second[2].shape == (64, 64)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_value_optimisation_reads_the_same_keys_as_a_plain_forward(tokenizer, arch):
    model = tiny(tokenizer, arch)
    module = model.get_submodule(anatomy_of(model).mlp_out(1))
    templates = context_templates(model, tokenizer, ((2, 3),))
    solved = optimise_value(model, tokenizer, module, EDIT, templates, ValueConfig(steps=2))
    k, v = io_at_subject(model, tokenizer, module, EDIT)
    torch.testing.assert_close(solved.key, key_at_subject(model, tokenizer, module, EDIT, templates),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(solved.current_key, k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(solved.current_value, v, atol=1e-5, rtol=1e-4)
    assert not torch.equal(solved.value, v)  # δ moved it


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_layers_before_the_edit_run_once_per_value_optimisation(tokenizer, arch, monkeypatch):
    model = tiny(tokenizer, arch)
    layers = model.get_submodule(anatomy_of(model).layers)
    calls = {0: 0, 2: 0}
    for i in calls:  # a submodule: it runs only when its layer's own forward does
        next(layers[i].children()).register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    module = model.get_submodule(anatomy_of(model).mlp_out(1))
    templates, config = ["{}", "Hello there. {}"], ValueConfig(steps=6, stop_nll=0.0)
    replayed = optimise_value(model, tokenizer, module, EDIT, templates, config)
    assert calls == {0: 2, 2: 7}  # the prefix pass, then layer 0 once and layer 2 at each of the 6 steps
    assert all("forward" not in layer.__dict__ for layer in layers)  # the layers' own forwards are back
    monkeypatch.setattr(locate, "layers_before", lambda model, modules: [])
    plain = optimise_value(model, tokenizer, module, EDIT, templates, config)
    torch.testing.assert_close(replayed.value, plain.value)
    assert not torch.equal(replayed.value, replayed.current_value)


@pytest.mark.parametrize("arch", ["llama", "phi"])  # phi's head has a bias
def test_the_one_pass_head_loss_gives_the_plain_loss_value(tokenizer, arch, monkeypatch):
    model = tiny(tokenizer, arch)
    module = model.get_submodule(anatomy_of(model).mlp_out(1))
    templates, config = ["{}", "Hello there. {}"], ValueConfig(steps=6, stop_nll=0.0)
    calls = []
    monkeypatch.setattr(locate, "head_cross_entropy", lambda *a: calls.append(1) or head_cross_entropy(*a))
    fused = optimise_value(model, tokenizer, module, EDIT, templates, config)
    assert len(calls) == 5  # every step after the first, which reads p₀ from the logits
    plain = optimise_value(model, tokenizer, module, EDIT, templates, replace(config, head_loss=False))
    assert len(calls) == 5
    torch.testing.assert_close(fused.value, plain.value, atol=1e-4, rtol=1e-4)
    assert not torch.equal(fused.value, fused.current_value)


def test_a_model_that_caps_its_logits_keeps_the_plain_loss(tokenizer, monkeypatch):
    config = AutoConfig.for_model("gemma2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  final_logit_softcapping=1.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    calls = []
    monkeypatch.setattr(locate, "head_cross_entropy", lambda *a: calls.append(1) or head_cross_entropy(*a))
    solved = optimise_value(model, tokenizer, model.get_submodule(anatomy_of(model).mlp_out(1)), EDIT, ["{}"],
                            ValueConfig(steps=3, stop_nll=0.0))
    assert calls == [] and not torch.equal(solved.value, solved.current_value)


def test_context_templates_given_as_json_lists_are_used_as_pairs(tokenizer):
    model = tiny(tokenizer)
    as_json = rome_edit(model, tokenizer, [EDIT], ROMEConfig(layer=1, covariance=False, steps=2,
                                                             context_templates=[[2, 3]]), progress=False)
    as_pairs = rome_edit(model, tokenizer, [EDIT], ROMEConfig(layer=1, covariance=False, steps=2,
                                                              context_templates=((2, 3),)), progress=False)
    assert as_json.tensors.keys() == as_pairs.tensors.keys()
    assert all(torch.equal(as_json.tensors[k], as_pairs.tensors[k]) for k in as_json.tensors)


@pytest.mark.parametrize("solve_at", ["templates", "prompt"])
def test_the_update_adds_delta_exactly_at_the_key_it_is_solved_at(tokenizer, solve_at, monkeypatch):
    # Weights large enough that the context templates move the subject's key (with transformers'
    # default init a tiny random model's keys hardly depend on the context).
    model = tiny(tokenizer, initializer_range=0.2)
    name = anatomy_of(model).mlp_out(1)
    templates = ["{}", "Long ago, in a land far away, people told many stories. {}", "Yes. {}"]
    monkeypatch.setattr(rome_module, "context_templates", lambda *args: templates)
    config = ROMEConfig(layer=1, covariance=False, steps=4, solve_at=solve_at)
    solved = optimise_value(model, tokenizer, model.get_submodule(name), EDIT, templates, config)
    delta = delta_matrix(rome_edit(model, tokenizer, [EDIT], config, progress=False), name)
    at, other = (solved.key, solved.current_key) if solve_at == "templates" else (solved.current_key, solved.key)
    wanted = solved.value - solved.current_value
    torch.testing.assert_close(delta @ at, wanted, atol=1e-6, rtol=1e-4)
    assert (delta @ other - wanted).norm() > 0.01 * wanted.norm()  # k̄ and k differ: only one is exact


def test_requests_optimised_together_get_the_values_they_get_alone(tokenizer, monkeypatch):
    model = tiny(tokenizer, initializer_range=0.2)
    module = model.get_submodule(anatomy_of(model).mlp_out(1))
    edits = [EDIT, Edit("b", "Paris", "{} is the capital of", "Italy and Spain", "France"),
             Edit("c", "Toyota", "{} was founded in", "Germany", "Japan"),
             Edit("d", "The Eiffel Tower", "{} stands in", "Rome", "Paris")]
    templates = ["{}", "Long ago, people told stories. {}"]
    # On this model these settings stop the four after 1, 4, 12 and 6 steps: the batch is cut
    # again when two have stopped and when three have.
    config = ValueConfig(steps=12, stop_nll=10.5, lr=2.0, clamp_norm_factor=100.0)
    steps = []
    alone = []
    for edit in edits:
        count = []
        alone.append(optimise_value(model, tokenizer, module, edit, templates, config, on_step=lambda: count.append(1)))
        steps.append(len(count))
    assert steps == [1, 4, 12, 6]
    cuts = []
    monkeypatch.setattr(locate.SplitBatch, "cut", lambda *a, cut=locate.SplitBatch.cut: cuts.append(1) or cut(*a))
    count = []
    together = locate.optimise_values(model, tokenizer, module, edits, templates, config,
                                      on_step=lambda: count.append(1))
    assert len(count) == sum(steps) and len(cuts) == 3
    # Within rounding: a batch sums in another order, and 12 steps at lr 2.0 amplify that to ~1e-3
    # relative on some CPUs (AMD EPYC here); a wrong δ per request is off by O(1).
    for a, b in zip(alone, together):
        torch.testing.assert_close(b.value, a.value, atol=1e-4, rtol=2e-3)
        torch.testing.assert_close(b.key, a.key, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.current_key, a.current_key, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.current_value, a.current_value, atol=1e-5, rtol=1e-4)
    assert len({round(float(s.value.norm()), 3) for s in together}) == 4  # each request has its own δ


def test_steams_alignment_terms_stay_with_their_own_requests_in_a_batch(tokenizer):
    model = tiny(tokenizer, initializer_range=0.2)
    module = model.get_submodule(anatomy_of(model).mlp_out(0))
    layers = model.get_submodule(anatomy_of(model).layers)
    edits = [EDIT, Edit("b", "Paris", "{} is the capital of", "Italy and Spain", "France"),
             Edit("c", "Toyota", "{} was founded in", "Germany", "Japan")]
    g = torch.Generator().manual_seed(0)
    alignments = [locate.Alignment([layers[1], layers[2]], torch.randn(2, 32, generator=g), 5.0), None,
                  locate.Alignment([layers[1], layers[2]], torch.randn(2, 32, generator=g), 5.0,
                                   torch.randn(2, 32, generator=g))]
    templates, config = ["{}", "Yes. {}"], ValueConfig(steps=5, stop_nll=0.0, lr=2.0)
    together = locate.optimise_values(model, tokenizer, module, edits, templates, config, alignments)
    for edit, alignment, solved in zip(edits, alignments, together):
        alone = optimise_value(model, tokenizer, module, edit, templates, config, alignment)
        torch.testing.assert_close(solved.value, alone.value, atol=1e-5, rtol=1e-4)
    plain = optimise_value(model, tokenizer, module, edits[0], templates, config)
    assert (plain.value - together[0].value).norm() > 1e-3  # the term moved request 0's v*


def test_a_target_that_names_the_subject_is_edited_at_the_subject_in_the_prompt(tokenizer, one_thread):
    """zsRE has "What company is Vueling part of?" -> "Vueling Holdings": the value
    optimisation's rows hold the target's first tokens, and the subject found there
    put the cut, and the update, inside the target (and crashed on a short suffix)."""
    from hf_kedit.methods.locate.core import _ValuePrompts

    edit = Edit("v", "Vueling", "What company is {} part of?", "Vueling Holdings")
    rows = _ValuePrompts.make(tokenizer, edit, ["{}", "Some text. {}"])
    assert rows.cuts[:2] == [subject_last_index(tokenizer, edit.text, "Vueling"),
                             subject_last_index(tokenizer, "Some text. " + edit.text, "Vueling")]
    assert all(cut < len(tokenizer(p).input_ids) for cut, p in zip(rows.cuts, [edit.text, "Some text. " + edit.text]))
    pack = rome_edit(tiny(tokenizer), tokenizer, [edit], ROMEConfig(covariance=False, steps=3, layer=1),
                     progress=False)
    assert pack.edits[0].tensors
