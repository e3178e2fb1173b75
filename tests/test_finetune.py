"""The fine-tuning baselines: LoRA and AdaLoRA trained as PEFT's own layers, FT-L's
constrained dense change, SVF's singular-value scales. Tiny random models with the default model's tokenizer."""
from __future__ import annotations

import pytest
import torch
from peft import AdaLoraConfig, PeftModel
from peft.tuners.adalora import AdaLoraModel

from hf_kedit import EditPack, load_edits, remove_edits, stack_of
from hf_kedit.anatomy import anatomy_of, linear_shape
from hf_kedit.errors import EditRequestError, IncompatiblePackError
from hf_kedit.kinds.singular_scale import singular_decomposition, weight_matrix, z_name
from hf_kedit.kinds.weight_delta import deltas_applied
from hf_kedit.methods import AdaLoRAConfig, FTConfig, LoRAConfig, make_pack
from hf_kedit.methods.finetune.svf import scaled
from hf_kedit.methods.finetune.peft_tuning import ADAPTER, peft_adapter, trained_factors
from hf_kedit.batching import padded
from hf_kedit.methods.teacher_forcing import Kept, fit_target, frozen, teacher_forced, teacher_forced_rows
from hf_kedit.pack import Edit
from test_bad_input import raises_exactly
from test_rome import tiny
from tiny_models import tiny_inputs

EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
ARCHS = ["llama", "gpt2"]  # an nn.Linear projection and GPT-2's transposed Conv1D
QUICK = {"lora": {"steps": 3}, "adalora": {"steps": 8, "tinit": 2, "tfinal": 3, "delta_t": 1, "init_r": 4,
                                           "target_r": 2, "layers": [0, 1, 2]},
         "ft": {"steps": 3, "layer": 1}, "svf": {"steps": 3, "layers": [0, 2]}}
KIND = {"lora": "weight_delta", "adalora": "weight_delta", "ft": "weight_delta", "svf": "singular_scale"}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def snapshot(model):
    """Everything a method must leave as it found it."""
    return ({n: id(m) for n, m in model.named_modules()}, {n: (p.detach().clone(), p.requires_grad)
                                                            for n, p in model.named_parameters()},
            set(model.__dict__), [(n, list(m._forward_hooks), list(m._forward_pre_hooks))
                                  for n, m in model.named_modules()])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(QUICK))
def test_each_method_leaves_the_model_exactly_as_it_found_it(tokenizer, one_thread, arch, method):
    model = tiny(tokenizer, arch)
    model.get_submodule(anatomy_of(model).mlp_out(0)).weight.requires_grad_(False)  # a flag of the user's own
    modules, params, attributes, hooks = snapshot(model)
    pack = make_pack(method, model, tokenizer, [EDIT], QUICK[method], progress=False)
    after_modules, after_params, after_attributes, after_hooks = snapshot(model)
    assert after_modules == modules and after_attributes == attributes and after_hooks == hooks
    assert after_params.keys() == params.keys()
    assert all(torch.equal(after_params[n][0], p) and after_params[n][1] == flag for n, (p, flag) in params.items())
    assert all(p.grad is None for p in model.parameters())
    assert pack.kind == KIND[method] and pack.edits[0].tensors


def test_lora_through_peft_gives_the_factors_of_its_own_training_loop(tokenizer, one_thread):
    """The pack equals what training the factors directly (the same start, loss and
    Adam steps, through a hook) gives: PEFT's layer computes the same thing."""
    model = tiny(tokenizer)
    pack = make_pack("lora", model, tokenizer, [EDIT], {"steps": 20, "layer": 1, "rank": 2}, progress=False)
    name = anatomy_of(model).mlp_out(1)
    out_f, in_f = linear_shape(model.get_submodule(name))
    torch.manual_seed(0)
    A = (torch.randn(2, in_f) / in_f ** 0.5).requires_grad_()
    B = torch.zeros(out_f, 2, requires_grad=True)
    ids, labels, _ = teacher_forced(tokenizer, EDIT.text, EDIT.target_new, "cpu")
    with deltas_applied(model, {name: (A, B)}), frozen(model):
        fit_target(model, ids, labels, torch.optim.Adam([A, B], lr=2e-2), 20, 0.05)
    torch.testing.assert_close(pack.tensors[f"e0.{name}.lora_A"], A.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(pack.tensors[f"e0.{name}.lora_B"], B.detach(), rtol=0, atol=1e-6)
    assert B.abs().max() > 0.01  # it trained


def test_trained_factors_equal_peft_s_own_delta_weight_for_pruned_adalora_ranks(tokenizer, one_thread):
    model = tiny(tokenizer)
    name = anatomy_of(model).mlp_out(1)
    config = AdaLoraConfig(target_modules=[name], init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2,
                           lora_alpha=8)
    with peft_adapter(model, AdaLoraModel, config):
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.lora_E[ADAPTER].copy_(torch.tensor([[0.5], [0.0], [-2.0], [0.0]]))  # two ranks pruned
        A, B = trained_factors(model, name)
        expected = layer.get_delta_weight(ADAPTER)
    assert A.shape == (2, linear_shape(layer.base_layer)[1]) and B.shape == (linear_shape(layer.base_layer)[0], 2)
    torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-7)


def test_an_adalora_pack_keeps_its_varying_ranks_through_save_attach_and_peft_export(tokenizer, one_thread,
                                                                                    tmp_path):
    model = tiny(tokenizer, num_hidden_layers=4)
    settings = {"steps": 24, "tinit": 4, "tfinal": 6, "delta_t": 2, "init_r": 6, "target_r": 3, "lr": 2e-2,
                "layers": [0, 1, 2, 3]}
    pack = make_pack("adalora", model, tokenizer, [EDIT], settings, progress=False)
    ranks = {n: t.shape[0] for n, t in pack.tensors.items() if n.endswith("lora_A")}
    assert len(set(ranks.values())) > 1  # the budget went where it mattered, unevenly
    assert sum(ranks.values()) <= 4 * 3 and max(ranks.values()) <= 6
    pack.save_pretrained(tmp_path / "pack")
    loaded = EditPack.from_pretrained(tmp_path / "pack")
    assert all(torch.equal(loaded.tensors[n], t) for n, t in pack.tensors.items())
    ids = tiny_inputs()
    with torch.no_grad():
        base = model(ids).logits
        load_edits(model, loaded, name="ada")
        edited = model(ids).logits
        remove_edits(model, "ada")
        assert torch.equal(model(ids).logits, base)
    assert (edited - base).abs().max() > 1e-4
    pack.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny(tokenizer, num_hidden_layers=4), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, edited, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_ft_l_keeps_every_weight_within_its_bound_and_stores_the_dense_change_exactly(tokenizer, one_thread, arch):
    model = tiny(tokenizer, arch)
    pack = make_pack("ft", model, tokenizer, [EDIT], {"steps": 10, "layer": 1, "lr": 1e-2,
                                                      "norm_constraint": 2e-3}, progress=False)
    name = anatomy_of(model).mlp_out(1)
    A, B = pack.tensors[f"e0.{name}.lora_A"], pack.tensors[f"e0.{name}.lora_B"]
    out_f, in_f = linear_shape(model.get_submodule(name))
    assert A.shape[0] == B.shape[1] == min(out_f, in_f)
    dense = A if out_f <= in_f else B  # the other factor is the identity
    assert torch.equal(A if out_f > in_f else B, torch.eye(min(out_f, in_f)))
    assert torch.equal(B @ A, dense)
    assert dense.abs().max() <= 2e-3 + 1e-9 and (dense.abs() > 2e-3 * 0.99).any()  # the bound binds


def test_ft_l_s_objective_scores_every_target_token_at_the_prompt_s_end(tokenizer, one_thread):
    model = tiny(tokenizer)
    ids, labels, prompt = teacher_forced(tokenizer, EDIT.text, "the English language", "cpu")
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    targets = labels[0, prompt:]
    at_end = torch.nn.functional.cross_entropy(logits[prompt - 1].expand(len(targets), -1), targets)
    each = torch.nn.functional.cross_entropy(logits[prompt - 1:-1], targets)
    delta = torch.zeros(1, 1, requires_grad=True)  # no step is taken: steps=1 reads the loss only
    read = {flag: fit_target(model, ids, labels, torch.optim.Adam([delta]), 1, 1e9, at_prompt_end=flag)
            for flag in (True, False)}
    assert read[True] == pytest.approx(at_end.item(), rel=1e-6) and read[False] == pytest.approx(each.item(), rel=1e-6)
    assert abs(read[True] - read[False]) > 1e-3


def test_unconstrained_ft_and_adalora_make_the_target_likelier(tokenizer, one_thread):
    model = tiny(tokenizer)
    ids, labels, _ = teacher_forced(tokenizer, EDIT.text, EDIT.target_new, "cpu")

    def target_loss():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], labels[0, 1:]).item()

    before = target_loss()
    for method, settings in [("ft", {"norm_constraint": None, "objective": "target", "layer": 1, "lr": 1e-2}),
                             ("adalora", {**QUICK["adalora"], "steps": 20, "lr": 2e-2})]:
        load_edits(model, make_pack(method, model, tokenizer, [EDIT], settings, progress=False), name=method)
        assert target_loss() < before - 0.5, method
        remove_edits(model, method)


def test_kept_rows_share_the_edit_s_forward_pass_without_changing_its_loss(tokenizer, one_thread):
    """Right padding leaves the edit's row as it reads alone; the kept rows' divergence
    is zero before training and grows, weighted, as the model moves away from p₀."""
    model = tiny(tokenizer)
    ids, labels, _ = teacher_forced(tokenizer, EDIT.text, EDIT.target_new, "cpu")
    long = tokenizer("A much longer text than the edit's own row, so that the edit's row is padded").input_ids
    short = tokenizer("Danielle Darrieux is a").input_ids
    kept = Kept.of(model, [long, short], [[0.5] * len(long), [0.0] * (len(short) - 1) + [2.0]], pad=0)
    rows, mask = padded([long, short], 0, "cpu")
    with torch.no_grad():
        assert kept.divergence(model(input_ids=rows, attention_mask=mask).logits).item() == pytest.approx(0, abs=1e-6)
    alone = fit_target(model, ids, labels, torch.optim.Adam([torch.zeros(1, requires_grad=True)]), 1, 1e9)
    together = fit_target(model, ids, labels, torch.optim.Adam([torch.zeros(1, requires_grad=True)]), 1, 1e9,
                          kept=kept, pad=0)
    assert together == pytest.approx(alone, rel=1e-5)
    module = anatomy_of(model).mlp_out(1)
    out_f, in_f = linear_shape(model.get_submodule(module))
    with torch.no_grad(), deltas_applied(model, {module: (torch.ones(1, in_f), torch.ones(out_f, 1))}):
        moved = kept.divergence(model(input_ids=rows, attention_mask=mask).logits).item()
        half = Kept(kept.rows, kept.weights / 2, kept.before).divergence(model(input_ids=rows, attention_mask=mask).logits)
    assert moved > 1e-3 and half.item() == pytest.approx(moved / 2, rel=1e-5)


@pytest.mark.parametrize("at_prompt_end", [False, True])
def test_rows_fitted_together_score_as_each_does_alone(tokenizer, one_thread, at_prompt_end):
    """Rows of different lengths, right-padded into one batch: the loss is the mean
    of each row's own loss, and the bar moves once per row and step."""
    model = tiny(tokenizer)
    prompts, targets = [EDIT.text, "The capital city of the country of France is"], [EDIT.target_new, "Rome of Italy"]
    idle = dict(steps=1, stop_loss=1e9, at_prompt_end=at_prompt_end)

    def fitted(ids, labels, steps_seen=None):
        return fit_target(model, ids, labels, torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
                          on_step=None if steps_seen is None else lambda: steps_seen.append(1), **idle)

    rows = [teacher_forced(tokenizer, p, t, "cpu")[:2] for p, t in zip(prompts, targets)]
    alone = [fitted(*row) for row in rows]
    ids, labels = teacher_forced_rows(tokenizer, prompts, targets, "cpu")
    widths = [row[0].shape[1] for row in rows]
    assert ids.shape == (2, max(widths)) and widths[0] < widths[1]  # the edit's row is padded
    steps_seen = []
    assert fitted(ids, labels, steps_seen) == pytest.approx(sum(alone) / 2, rel=1e-5)
    assert len(steps_seen) == 2 and alone[0] != pytest.approx(alone[1], rel=1e-3)


def test_a_joint_lora_pack_fits_every_edit_and_its_edits_come_off_together(tokenizer, one_thread, tmp_path):
    model = tiny(tokenizer, initializer_range=0.2)  # logits large enough that a target can become likely
    edits = [EDIT, Edit("e1", "Paris", "{} is the capital of", "Italy", "France"),
             Edit("e2", "Toko Yasuda", "{} plays the", "trumpet", "guitar")]
    settings = {"steps": 60, "layer": 1, "joint": True, "lr": 5e-2}

    def losses():
        with torch.no_grad():
            return [model(input_ids=ids, labels=labels).loss.item() for ids, labels, _ in
                    (teacher_forced(tokenizer, e.text, e.target_new, "cpu") for e in edits)]

    before, weights = losses(), {n: p.detach().clone() for n, p in model.named_parameters()}
    pack = make_pack("lora", model, tokenizer, edits, settings, progress=False)
    name = anatomy_of(model).mlp_out(1)
    assert sorted(pack.tensors) == [f"e0.{name}.lora_A", f"e0.{name}.lora_B"]
    assert pack.tensors[f"e0.{name}.lora_A"].shape[0] == 3 and pack.sharing_groups == [["e0", "e1", "e2"]]
    pack.save_pretrained(tmp_path / "joint")
    loaded = EditPack.from_pretrained(tmp_path / "joint")
    with raises_exactly(IncompatiblePackError, r"edits \['e1', 'e2'\] share their tensors with \['e0'\]"):
        loaded.select(["e0"])
    load_edits(model, loaded, name="joint")
    after = losses()
    assert all(a < b - 3.0 for a, b in zip(after, before)), (before, after)
    remove_edits(model, "joint")
    assert losses() == before
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    twice = make_pack("lora", model, tokenizer, [EDIT, Edit("e9", EDIT.subject, EDIT.prompt, "German", "French")],
                      {**settings, "steps": 2}, progress=False)
    with pytest.warns(UserWarning, match=r"earlier edits 'e0' \(the same pack\) share their tensors"):
        load_edits(model, twice, name="twice", on_conflict="last")  # the group cannot be split: both stay
    assert [e.id for e in stack_of(model).packs["twice"].pack.edits] == ["e0", "e9"]
    remove_edits(model, "twice")
    one = {**settings, "steps": 5}  # one edit: joint or not, the same pack
    joint_one = make_pack("lora", model, tokenizer, [EDIT], one, progress=False)
    alone_one = make_pack("lora", model, tokenizer, [EDIT], {**one, "joint": False}, progress=False)
    assert joint_one.tensors.keys() == alone_one.tensors.keys()
    assert all(torch.equal(joint_one.tensors[n], alone_one.tensors[n]) for n in alone_one.tensors)


@pytest.mark.parametrize("arch", ARCHS)
def test_svf_s_pack_acts_as_the_z_it_trained_and_keeps_the_subject_s_distribution(tokenizer, one_thread, arch):
    """Attached, the pack computes what the training hook computed with its z (one
    map), the target gets likelier, and the KL term holds "{subject} is a" closer."""
    model = tiny(tokenizer, arch)
    ids, labels, _ = teacher_forced(tokenizer, EDIT.text, EDIT.target_new, "cpu")
    keep = tokenizer(f"{EDIT.subject} is a", return_tensors="pt").input_ids

    def losses():
        with torch.no_grad():
            logits = model(ids).logits
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]).item()
            return logits, nll, torch.log_softmax(model(keep).logits[0, -1], -1)

    _, before, p0 = losses()
    anatomy = anatomy_of(model)
    drift = {}
    for kl in (0.0, 1.0):
        settings = {"steps": 30, "lr": 0.5, "layers": [0, 1, 2], "kl_factor": kl, "stop_loss": 0.0}
        pack = make_pack("svf", model, tokenizer, [EDIT], settings, progress=False)
        modules = [anatomy.mlp_out(i) for i in range(3)]
        decompositions = {m: singular_decomposition(weight_matrix(model.get_submodule(m), model.get_submodule(m).weight))
                          for m in modules}
        with torch.no_grad(), scaled(model, decompositions, {m: pack.tensors[z_name("e0", m)] for m in modules}):
            trained = model(ids).logits
        load_edits(model, pack, name="svf")
        logits, after, p = losses()
        remove_edits(model, "svf")
        assert torch.allclose(logits, trained, atol=1e-4)
        assert after < before - 0.3  # tiny random models: the MLP output moves the logits little
        drift[kl] = (p0.exp() * (p0 - p)).sum().item()
    assert drift[1.0] < drift[0.0]


@pytest.mark.parametrize("config, match", [
    (lambda: FTConfig(objective="last"), "objective"),
    (lambda: FTConfig(norm_constraint=0.0), "positive bound"),
    (lambda: AdaLoRAConfig(target_r=16), "target_r"),
    (lambda: AdaLoRAConfig(tinit=60), "tinit < steps - tfinal"),
    (lambda: LoRAConfig(joint="yes"), r"joint='yes': give true"),
    (lambda: LoRAConfig(rank=0), r"rank=0: give a positive integer"),
    (lambda: LoRAConfig(lr=-1.0), r"lr=-1.0: give a positive step size"),
])
def test_bad_settings_are_refused_before_any_work(config, match):
    with raises_exactly(EditRequestError, match):
        config()
