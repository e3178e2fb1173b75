"""The reft and baft methods on tiny random models with the default model's tokenizer
(read from the converted model's cache folder; the model itself is not loaded)."""
import dataclasses
from pathlib import Path

import pytest
import torch

from hf_kedit import Edit, load_edits, remove_edits, stack_of
from hf_kedit.errors import EditRequestError, IncompatiblePackError
from hf_kedit.evaluate.harness import EvalConfig, evaluate
from hf_kedit.evaluate.scoring import Scorer
from hf_kedit.kinds.basis_intervention import gate_weights, intervention_delta
from hf_kedit.methods import make_pack
from hf_kedit.methods.representation import baft
from hf_kedit.methods.representation import core as basis
from hf_kedit.methods.representation.core import layer_states
from hf_kedit.methods.representation.shared_bases import SharedBases
from hf_kedit.sampling import sibling_names
from test_bad_input import raises_exactly, untouched
from test_rome import tiny

EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
UNRELATED = ("The weather in Paris is mild in spring.", "Cats sleep for most of the day.",
             "The stock market fell sharply on Monday.", "She plays the violin in an orchestra.")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact.json"

pytestmark = pytest.mark.usefixtures("one_thread")




def target_nll(model, tokenizer, edit=EDIT) -> float:
    return reading(model, tokenizer, edit).nll


def reading(model, tokenizer, edit=EDIT):
    """The teacher-forced reading of the edit's target after its prompt."""
    return Scorer(model, tokenizer).forced([(edit.text, edit.target_new)])[0]


# BaFT at the last prompt token, as ReFT: from the subject's token (its default) a tiny random model's
# attention carries too little of an update to the last token for 40 steps to make the edit.
SETTINGS = {"reft": {"layer": 1, "steps": 40},
            "baft": {"layer": 1, "steps": 40, "locality_texts": UNRELATED, "positions": "l1"}}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["reft", "baft"])
def test_training_raises_the_targets_probability_and_leaves_the_model_alone(tokenizer, method, arch):
    model = tiny(tokenizer, arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unedited = reading(model, tokenizer)
    pack = make_pack(method, model, tokenizer, [EDIT], SETTINGS[method], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and p.requires_grad for m in model.modules() for p in m.parameters(False))
    assert pack.kind == "basis_intervention" and pack.method == method
    assert pack.kind_config["peft_type"] == {"reft": "LOREFT", "baft": "BAFT"}[method]
    assert pack.kind_config["layers"] == [1] and pack.kind_config["r"] == 4
    load_edits(model, pack, name="p")
    edited = reading(model, tokenizer)
    # A tiny random model's normed state and random head cap the target's probability far below 1
    # (its NLL cannot go below about 10 nats here); what it can do is make the target the top token.
    assert unedited.accuracy == 0 and edited.accuracy == 1 and edited.nll < unedited.nll - 0.4
    target = tokenizer(" " + EDIT.target_new, add_special_tokens=False).input_ids
    assert Scorer(model, tokenizer).generate([EDIT.text], len(target))[0] == target  # cached generation agrees
    remove_edits(model, "p")
    assert reading(model, tokenizer) == unedited


@pytest.mark.parametrize("method", ["reft", "baft"])
def test_rotation_stays_orthonormal_after_training(tokenizer, method):
    model = tiny(tokenizer)
    pack = make_pack(method, model, tokenizer, [EDIT, Edit("e1", "Paris", "{} is the capital of", "Italy")],
                     {**SETTINGS[method], "rank": 6}, progress=False)
    for e in pack.edits:
        R = pack.tensors[f"{e.id}.layers.1.rotation"].double()
        assert R.shape == (6, 32)
        torch.testing.assert_close(R @ R.T, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.manual_seed(0)  # the rotation trained away from its initial value
    initial = basis.Intervention(32, 6, method == "baft").rotation.weight.detach()
    assert (pack.tensors["e0.layers.1.rotation"] - initial).abs().max() > 1e-3


def test_baft_gates_open_on_the_edit_and_stay_low_on_unrelated_text(tokenizer):
    model = tiny(tokenizer)
    pack = make_pack("baft", model, tokenizer, [EDIT], {**SETTINGS["baft"], "contrast_subjects": ()}, progress=False)
    G, c = pack.tensors["e0.layers.1.gate.weight"], pack.tensors["e0.layers.1.gate.bias"]
    prompt_state = layer_states(model, tokenizer, "model.layers.1", [EDIT.text])[-1]
    unrelated = layer_states(model, tokenizer, "model.layers.1", list(UNRELATED))
    assert gate_weights(unrelated, G, c).mean() < 0.5 * gate_weights(prompt_state, G, c).mean()


def test_baft_contrast_prompts_close_the_gates_on_other_subjects(tokenizer):
    model = tiny(tokenizer)
    others = ["Marie Curie", "Tokyo", "the BBC"]
    contrast = layer_states(model, tokenizer, "model.layers.1", [EDIT.prompt.format(s) for s in others], (0, 1))
    mean_gate = {}
    for subjects in ((), tuple(others)):
        pack = make_pack("baft", model, tokenizer, [EDIT], {**SETTINGS["baft"], "contrast_subjects": subjects},
                         progress=False)
        G, c = pack.tensors["e0.layers.1.gate.weight"], pack.tensors["e0.layers.1.gate.bias"]
        mean_gate[subjects] = gate_weights(contrast, G, c).mean()
    assert contrast.shape[0] == 3 and mean_gate[tuple(others)] < 0.8 * mean_gate[()]


def test_baft_leaves_a_prompt_whose_gates_are_below_the_floor_exactly_as_it_was(tokenizer):
    model = tiny(tokenizer)
    other = torch.tensor([tokenizer(EDIT.prompt.format("Tokyo")).input_ids])
    unedited = model(input_ids=other).logits
    for floor in (0.5, 0.0):
        pack = make_pack("baft", model, tokenizer, [EDIT], {**SETTINGS["baft"], "contrast_subjects": ("Tokyo",),
                                                            "gate_floor": floor}, progress=False)
        assert pack.kind_config["gate_floor"] == floor
        load_edits(model, pack, name="p")
        moved = (model(input_ids=other).logits - unedited).abs().max()
        assert reading(model, tokenizer).accuracy == 1  # the edit holds either way
        remove_edits(model, "p")
        assert moved == 0 if floor else moved > 0  # the gates it shut on "Tokyo" still let a little through


def test_an_edit_acts_at_its_subjects_last_token_when_the_positions_cover_it(tokenizer):
    ids = tokenizer(EDIT.text).input_ids
    subject_end = len(tokenizer("The mother tongue of Danielle Darrieux").input_ids) - 1
    every = torch.ones(1, len(ids), dtype=torch.bool)
    acting = basis.acting_positions(tokenizer, EDIT, EDIT.text, every)
    assert acting.nonzero().flatten().tolist() == [subject_end] and subject_end < len(ids) - 1
    last = torch.zeros_like(every)
    last[0, -1] = True
    assert basis.acting_positions(tokenizer, EDIT, EDIT.text, last).tolist() == [True]
    # in a text other than the prompt: at the subject if it names it, else nowhere
    text = "Danielle Darrieux was an actress"
    named = basis.acting_positions(tokenizer, EDIT, text, torch.ones(1, len(tokenizer(text).input_ids), dtype=bool),
                                   fallback=False)
    assert named.nonzero().flatten().tolist() == [len(tokenizer("Danielle Darrieux").input_ids) - 1]
    other = "The weather is mild"
    assert not basis.acting_positions(tokenizer, EDIT, other, torch.ones(1, len(tokenizer(other).input_ids),
                                                                          dtype=bool), fallback=False).any()


def test_baft_with_every_position_opens_its_gate_at_the_subject_only(tokenizer):
    model = tiny(tokenizer)
    settings = {**SETTINGS["baft"], "positions": "all", "steps": 60}
    pack = make_pack("baft", model, tokenizer, [EDIT], settings, progress=False)
    G, c = pack.tensors["e0.layers.1.gate.weight"], pack.tensors["e0.layers.1.gate.bias"]
    gates = gate_weights(layer_states(model, tokenizer, "model.layers.1", [EDIT.text]), G, c).mean(-1)
    subject_end = len(tokenizer("The mother tongue of Danielle Darrieux").input_ids) - 1
    others = torch.cat([gates[:subject_end], gates[subject_end + 1:]])
    assert gates[subject_end] > 0.9 > 0.2 > others.max()


def test_worst_gate_shuts_the_most_open_unrelated_token(tokenizer):
    model = tiny(tokenizer)
    unrelated = layer_states(model, tokenizer, "model.layers.1", list(UNRELATED))
    most_open = {}
    for worst in (False, True):
        settings = {**SETTINGS["baft"], "positions": "all", "steps": 0, "gate_steps": 100, "gate_margin": 1e-9,
                    "worst_gate": worst}
        pack = make_pack("baft", model, tokenizer, [EDIT], settings, progress=False)
        G, c = pack.tensors["e0.layers.1.gate.weight"], pack.tensors["e0.layers.1.gate.bias"]
        most_open[worst] = gate_weights(unrelated, G, c).max()
    assert most_open[True] < most_open[False] - 0.02


def test_sibling_names_are_the_first_names_written_never_the_subject(tokenizer, monkeypatch):
    model = tiny(tokenizer)
    written = [" Argentina, Chile", " Brazil and Peru", " Chile is big", " Portugal (country)", " the Brazilian"]

    def generate(ids, **kwargs):
        rows = [tokenizer(t, add_special_tokens=False).input_ids for t in written[:len(ids)]]
        width = max(map(len, rows))
        tail = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
        return torch.cat([ids, tail], 1)
    monkeypatch.setattr(model, "generate", generate)
    assert sibling_names(model, tokenizer, "Brazil", 5) == ["Argentina", "Chile", "Portugal"]


def test_baft_fits_its_gate_without_a_forward_per_step(tokenizer):
    model, forwards = tiny(tokenizer), []
    model.register_forward_pre_hook(lambda *args: forwards.append(1))  # a pass may stop before the end
    settings = {**SETTINGS["baft"], "steps": 0, "gate_steps": 300, "contrast_subjects": (),
                "locality_texts": UNRELATED[1:]}  # the first has the edit's last word: on a random model, the same state
    pack = make_pack("baft", model, tokenizer, [EDIT], settings, progress=False)
    assert len(forwards) == 2  # the states of the unrelated texts and of the edit prompt
    G, c = pack.tensors["e0.layers.1.gate.weight"], pack.tensors["e0.layers.1.gate.bias"]
    edit_gate = gate_weights(layer_states(model, tokenizer, "model.layers.1", [EDIT.text])[-1], G, c)
    unrelated = gate_weights(layer_states(model, tokenizer, "model.layers.1", list(UNRELATED[1:])), G, c)
    assert edit_gate.min() > 0.9 and unrelated.max() < 0.1  # within gate_margin of where they should be


def test_a_gate_shut_hard_where_it_must_open_still_opens(tokenizer, monkeypatch):
    # As a shared basis starts at a new edit's key after earlier edits shut it everywhere: far below 0, where
    # a loss on the sigmoid's output (clamped away from 0) had no gradient and the gate stayed shut.
    model, start = tiny(tokenizer), basis.Intervention.__init__

    def shut_hard(self, *args, **kwargs):
        start(self, *args, **kwargs)
        with torch.no_grad():
            self.gate.bias.fill_(-40.0)
    monkeypatch.setattr(basis.Intervention, "__init__", shut_hard)
    settings = {**SETTINGS["baft"], "steps": 0, "gate_steps": 300, "contrast_subjects": (),
                "locality_texts": UNRELATED[1:]}
    pack = make_pack("baft", model, tokenizer, [EDIT], settings, progress=False)
    G, c = pack.tensors["e0.layers.1.gate.weight"], pack.tensors["e0.layers.1.gate.bias"]
    edit_gate = gate_weights(layer_states(model, tokenizer, "model.layers.1", [EDIT.text])[-1], G, c)
    unrelated = gate_weights(layer_states(model, tokenizer, "model.layers.1", list(UNRELATED[1:])), G, c)
    assert edit_gate.min() > 0.9 and unrelated.max() < 0.1


def test_an_edit_opens_the_least_used_bases_the_most_open_first_even_when_all_are_shut_hard():
    edit = torch.tensor([[-50.0, -30.0, -40.0, 5.0, -35.0]])
    earlier = torch.tensor([[-9.0, -9.0, -9.0, 3.0, 2.0], [-9.0, -9.0, -9.0, 4.0, -9.0]])  # bases 3 and 4 in use
    assert basis.opened_bases(edit, earlier, 2, 0.5).tolist() == [[False, True, True, False, False]]
    assert basis.opened_bases(edit, earlier, 4, 0.5).tolist() == [[True, True, True, False, True]]


@pytest.mark.parametrize("margin, settles", [(0.5, True), (1e-9, False)])
def test_the_gate_fit_stops_once_every_gate_is_within_the_margin(tokenizer, monkeypatch, margin, settles):
    calls = []

    def counting(*args):
        gate = args[6]

        def counted_for(layer):
            loss = gate.loss_for(layer)
            return lambda *a: (calls.append(1), loss(*a))[1]
        return basis.train_interventions(*args[:6], dataclasses.replace(gate, loss_for=counted_for), *args[7:])
    monkeypatch.setattr(baft, "train_interventions", counting)
    settings = {**SETTINGS["baft"], "steps": 0, "gate_steps": 300, "gate_margin": margin, "contrast_subjects": (),
                "locality_texts": UNRELATED[1:]}  # the first has the edit's last word: on a random model, the same state
    make_pack("baft", tiny(tokenizer), tokenizer, [EDIT], settings, progress=False)
    assert (len(calls) < 300) if settles else len(calls) == 300


def test_baft_samples_its_own_unrelated_text_when_given_none(tokenizer, monkeypatch):
    model = tiny(tokenizer)
    sampled = []
    real = baft.sample_texts
    monkeypatch.setattr(baft, "sample_texts", lambda *a, **k: sampled.append(real(*a, **k)) or sampled[-1])
    make_pack("baft", model, tokenizer, [EDIT], {"layer": 1, "steps": 2, "locality_samples": 3,
                                                 "locality_tokens": 5}, progress=False)
    assert len(sampled) == 1 and len(sampled[0]) == 3


def test_sequential_packs_stack_and_come_off(tokenizer):
    model = tiny(tokenizer)
    base = target_nll(model, tokenizer)
    second = Edit("e1", "Paris", "{} is the capital of", "Italy")
    load_edits(model, make_pack("baft", model, tokenizer, [EDIT], SETTINGS["baft"], progress=False), name="a")
    load_edits(model, make_pack("baft", model, tokenizer, [second], SETTINGS["baft"], progress=False), name="b")
    assert target_nll(model, tokenizer) < base - 0.4
    remove_edits(model, "a")
    remove_edits(model, "b")
    assert target_nll(model, tokenizer) == base and len(stack_of(model)) == 0


def test_new_edits_extend_a_pack_without_retraining_it(tokenizer):
    model = tiny(tokenizer)
    second = Edit("e1", "Paris", "{} is the capital of", "Italy")
    first = make_pack("baft", model, tokenizer, [EDIT], SETTINGS["baft"], progress=False)
    load_edits(model, first, name="old")
    new = make_pack("baft", model, tokenizer, [second], SETTINGS["baft"], progress=False)  # trained on the stack
    load_edits(model, new, name="new")
    stacked = [reading(model, tokenizer, e) for e in (EDIT, second)]
    remove_edits(model, "old")
    remove_edits(model, "new")
    combined = first.extend(new)
    assert [e.id for e in combined.edits] == ["e0", "e1"]
    assert all(torch.equal(combined.tensors[n], t) for n, t in first.tensors.items())   # nothing retrained
    load_edits(model, combined, name="one")
    assert [reading(model, tokenizer, e) for e in (EDIT, second)] == stacked
    with raises_exactly(IncompatiblePackError, r"both packs hold edits \['e0'\]"):
        first.extend(first)
    with raises_exactly(IncompatiblePackError, r"a basis_intervention pack made by baft cannot hold the edits of a "
                                               r"basis_intervention pack made by reft"):
        first.extend(make_pack("reft", model, tokenizer, [second], SETTINGS["reft"], progress=False))
    other_layer = make_pack("baft", model, tokenizer, [second], {**SETTINGS["baft"], "layer": 0}, progress=False)
    with raises_exactly(IncompatiblePackError, r"the packs differ in kind_config.layers \(\[1\] vs \[0\]\)"):
        first.extend(other_layer)


# ----- shared bases: BaFT's continual setting ------------------------------------------------

BATCHES = ([EDIT, Edit("e1", "Paris", "{} is the capital of", "Italy"), Edit("e2", "Toyota", "{} is owned by", "Apple")],
           [Edit("e3", "Michael Jordan", "{} plays", "tennis"), Edit("e4", "Mount Everest", "{} is in", "Europe"),
            Edit("e5", "the Nile", "{} flows through", "Asia")])
SHARED = {**SETTINGS["baft"], "rank": 2, "shared_bases": 8}


def shared_sequence(model, tokenizer, settings=SHARED, history=None):
    """Both batches made as a user would: the first pack attached while the second trains, then replaced."""
    history = SharedBases() if history is None else history
    first = make_pack("baft", model, tokenizer, BATCHES[0], settings, progress=False, history=history)
    keys = history.tensors["keys"].clone()
    load_edits(model, first, name="facts")
    second = make_pack("baft", model, tokenizer, BATCHES[1], settings, progress=False, history=history)
    remove_edits(model, "facts")
    return first, second, keys, history


@pytest.mark.parametrize("edits, match", [
    ('[{"id": "e0"}]', r"TypeError"), ('{"id": "e0"}', r"TypeError"), ("[", r"JSONDecodeError"),
    ('[{"id": "e 0", "subject": "S", "prompt": "{} is", "target_new": "T"}]', r"edit ids must match"),
], ids=["missing-fields", "not-a-list", "not-json", "bad-id"])
def test_a_history_whose_edits_do_not_read_is_refused(tmp_path, edits, match):
    from safetensors.torch import save_file

    save_file({"keys": torch.zeros(1, 4)}, str(tmp_path / "h.safetensors"),
              metadata={"history": "baft-shared-bases", "n_edits": "1", "base_model": "null", "edits": edits})
    with raises_exactly(EditRequestError, r"is not a file SharedBases.save wrote .*" + match):
        SharedBases.load(tmp_path / "h.safetensors")


def shared_update(pack, h):
    """The update the pack's one intervention adds at states h [N, d]."""
    t = {part: pack.tensors[f"bases.layers.1.{part}"] for part in
         ("rotation", "source.weight", "source.bias", "gate.weight", "gate.bias")}
    gate = (t["gate.weight"], t["gate.bias"], torch.ones(len(t["gate.bias"]), dtype=torch.bool),
            torch.full_like(t["gate.bias"], pack.kind_config["gate_floor"]))
    return intervention_delta(h, t["rotation"], t["source.weight"], t["source.bias"], gate)


def test_shared_bases_keep_one_intervention_as_the_edits_accumulate(tokenizer):
    model = tiny(tokenizer)
    first, second, _, history = shared_sequence(model, tokenizer)
    parameters = [sum(t.numel() for t in p.tensors.values()) for p in (first, second)]
    assert parameters[0] == parameters[1] == 3 * 8 * 32 + 2 * 8  # one intervention of 8 bases, for 3 edits and 6
    assert [e.id for e in second.edits] == [f"e{i}" for i in range(6)] and second.kind_config["shared_bases"]
    assert history.n_edits == 6 and history.tensors["keys"].shape == (6, 32)
    own = make_pack("baft", model, tokenizer, BATCHES[0] + BATCHES[1], {**SHARED, "shared_bases": 0}, progress=False)
    assert sum(t.numel() for t in own.tensors.values()) == 6 * (3 * 2 * 32 + 2 * 2)  # an intervention per edit
    load_edits(model, second, name="facts")  # the latest pack alone holds the whole sequence
    assert len(stack_of(model).edits()) == 6
    remove_edits(model, "facts")
    assert all(not m._forward_hooks for m in model.modules())


def test_shared_bases_hold_the_earlier_edits_updates(tokenizer):
    model = tiny(tokenizer)
    first, second, keys, history = shared_sequence(model, tokenizer)
    before = shared_update(first, keys)
    assert before.norm(dim=-1).min() > 0  # every earlier edit acts at its key
    torch.testing.assert_close(shared_update(second, keys), before, atol=1e-4, rtol=1e-4)  # held, to rounding
    later = shared_update(second, history.tensors["keys"][3:])  # while the second batch's edits act
    assert later.norm(dim=-1).min() > 0
    R = second.tensors["bases.layers.1.rotation"].double()
    torch.testing.assert_close(R @ R.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_a_saved_shared_history_continues_as_the_one_in_memory(tokenizer, tmp_path):
    model = tiny(tokenizer)
    history = SharedBases()
    first = make_pack("baft", model, tokenizer, BATCHES[0], SHARED, progress=False, history=history)
    history.save(tmp_path / "bases.safetensors")
    load_edits(model, first, name="facts")
    in_memory = make_pack("baft", model, tokenizer, BATCHES[1], SHARED, progress=False, history=history)
    loaded = SharedBases.load(tmp_path / "bases.safetensors")
    assert [e.id for e in loaded.edits] == ["e0", "e1", "e2"]
    again = make_pack("baft", model, tokenizer, BATCHES[1], SHARED, progress=False, history=loaded)
    assert [e.id for e in again.edits] == [e.id for e in in_memory.edits]
    for name, t in in_memory.tensors.items():  # training amplifies rounding: equal within it, not bit for bit
        torch.testing.assert_close(again.tensors[name], t, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings, requests, match", [
    ({**SHARED, "layer": 0}, BATCHES[1], r"this SharedBases history intervenes at layer 1, not 0: set layer=1"),
    ({**SHARED, "shared_bases": 6}, BATCHES[1], r"holds 8 bases of size 32: set shared_bases=8"),
    (SHARED, [EDIT], r"edits \['e0'\] are in the sequence already: give new edits new ids"),
    ({**SHARED, "shared_bases": 0}, BATCHES[1], r"this SharedBases history holds shared bases: set shared_bases"),
], ids=["other-layer", "other-size", "same-id", "own-bases"])
def test_a_shared_history_is_continued_only_as_it_was_made(tokenizer, nothing_expensive_after, settings, requests,
                                                           match):
    history, model = nothing_expensive_after
    with untouched(model), raises_exactly(EditRequestError, match):
        make_pack("baft", model, tokenizer, requests, settings, progress=False, history=history)
    assert history.n_edits == 3 and [e.id for e in history.edits] == ["e0", "e1", "e2"]


@pytest.fixture
def nothing_expensive_after(tokenizer, monkeypatch):
    """A history of the first batch; then training and sampling fail the test if they start."""
    model = tiny(tokenizer)
    history = SharedBases()
    make_pack("baft", model, tokenizer, BATCHES[0], SHARED, progress=False, history=history)

    def started(*args, **kwargs):
        raise AssertionError("expensive work started before the history was checked")
    monkeypatch.setattr(basis, "teacher_forced", started)
    monkeypatch.setattr(baft, "sample_texts", started)
    monkeypatch.setattr(baft, "layer_states", started)
    return history, model


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
@pytest.mark.parametrize("method", ["reft", "baft"])
def test_the_harness_runs_the_methods_in_sequential_mode(tokenizer, method):
    from hf_kedit.evaluate.datasets import read_cases

    model = tiny(tokenizer)
    cases = read_cases("counterfact", DATA, limit=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    config = EvalConfig(metrics=("efficacy", "locality"))
    result = evaluate(model, tokenizer, cases, method, "sequential", {"layer": 1, "steps": 3}, config, progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before) and len(stack_of(model)) == 0
    assert result["timing"]["pack_bytes_per_edit"] > 0


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_the_harness_replaces_each_shared_pack_by_the_next(tokenizer, monkeypatch):
    from hf_kedit.evaluate import harness
    from hf_kedit.evaluate.datasets import read_cases

    model = tiny(tokenizer)
    attached = []
    score = harness.aggregate

    def counted(per_case):  # called at each checkpoint, with the packs attached then
        attached.append([len(p.pack.edits) for p in stack_of(model).list()])
        return score(per_case)
    monkeypatch.setattr(harness, "aggregate", counted)
    config = EvalConfig(metrics=("efficacy",), pack_cases=1, checkpoints=(1, 2))
    result = evaluate(model, tokenizer, read_cases("counterfact", DATA, limit=3), "baft", "sequential",
                      {"layer": 1, "steps": 2, "gate_steps": 2, "rank": 2, "shared_bases": 4,
                       "locality_texts": UNRELATED}, config, progress=False)
    assert attached[:3] == [[1], [2], [3]] and len(stack_of(model)) == 0
    assert [c["timing"]["pack_parameters"] for c in result["checkpoints"]] == [3 * 4 * 32 + 2 * 4] * 3


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_a_shared_bases_sequence_cut_short_goes_on_from_its_history_and_last_pack(tokenizer, monkeypatch, tmp_path):
    from hf_kedit.evaluate import harness
    from hf_kedit.evaluate.datasets import read_cases
    from test_evaluate import Cut, making

    model = tiny(tokenizer)
    config = EvalConfig(metrics=("efficacy",), pack_cases=1, checkpoints=(1, 2))
    settings = {"layer": 1, "steps": 2, "gate_steps": 2, "rank": 2, "shared_bases": 4, "locality_texts": UNRELATED}

    def run(state, resume=False):
        return evaluate(model, tokenizer, read_cases("counterfact", DATA, limit=3), "baft", "sequential", settings,
                        config, progress=False, state_dir=tmp_path / state, resume=resume)
    whole = run("whole")
    made = []
    monkeypatch.setattr(harness, "make_pack", making(made, stop_at=2))
    with pytest.raises(Cut):
        run("cut")
    assert len(stack_of(model)) == 0
    assert [p.name for p in (tmp_path / "cut" / "packs").iterdir()] == ["eval-1"]  # the pack it replaced is gone
    monkeypatch.setattr(harness, "make_pack", making(made))
    resumed = run("cut", resume=True)
    assert len(made) == 3 and len(made[2].edits) == 3  # the last pack holds all three: the history came back
    assert len(stack_of(model)) == 0
    assert [c["metrics"] for c in resumed["checkpoints"]] == [c["metrics"] for c in whole["checkpoints"]]
    assert [c["timing"]["pack_parameters"] for c in resumed["checkpoints"]] == [3 * 4 * 32 + 2 * 4] * 3
    assert resumed["timing"]["pack_params_per_edit"] == whole["timing"]["pack_params_per_edit"]


# ----- bad requests: a typed error before any training ------------------------------------------

@pytest.fixture
def nothing_expensive(monkeypatch):
    """Training and locality sampling fail the test if they start."""
    def started(*args, **kwargs):
        raise AssertionError("expensive work started before the request was checked")
    monkeypatch.setattr(basis, "teacher_forced", started)
    monkeypatch.setattr(baft, "sample_texts", started)
    monkeypatch.setattr(baft, "layer_states", started)


def edit(**fields) -> Edit:
    return Edit(**{**EDIT.__dict__, **fields})


BAD = [  # (id, method, requests, settings, regex)
    ("rank-over-hidden", "reft", [EDIT], {"rank": 33}, r"rank=33: give an integer from 1 to the hidden size 32"),
    ("rank-zero", "baft", [EDIT], {"rank": 0}, r"rank=0"),
    ("layer-99", "reft", [EDIT], {"layer": 99}, r"layer=99 gives layers \[99\], out of range: the model has 3"),
    ("layer-depth-1", "baft", [EDIT], {"layer": 1.0}, r"layer=1.0 gives layers \[3\]"),
    ("positions-word", "reft", [EDIT], {"positions": "last"}, r"positions='last' does not parse: write \"f\{n\}\+l"),
    ("positions-empty", "baft", [EDIT], {"positions": "f0+l0"}, r"positions='f0\+l0' selects no token"),
    ("empty-target", "reft", [edit(target_new="")], {}, r"edit 'e0': target_new must be a non-empty string"),
    ("blank-target", "baft", [edit(target_new=" ")], {}, r"target_new must be a non-empty string"),
    ("no-requests", "baft", [], {}, r"give a non-empty list of Edit requests"),
    ("empty-locality", "baft", [EDIT], {"locality_texts": ()}, r"locality_texts=\(\): give a non-empty list"),
    ("locality-one-string", "baft", [EDIT], {"locality_texts": "text"}, r"locality_texts='text'"),
    ("no-locality-samples", "baft", [EDIT], {"locality_samples": 0}, r"locality_samples=0"),
    ("contrast-one-string", "baft", [EDIT], {"contrast_subjects": "Tokyo"}, r"contrast_subjects='Tokyo': give a list"),
    ("contrast-blank", "baft", [EDIT], {"contrast_subjects": ["Tokyo", " "]}, r"contrast_subjects=\['Tokyo', ' '\]"),
    ("siblings-negative", "baft", [EDIT], {"sibling_contrasts": -1}, r"sibling_contrasts=-1: give a number"),
    ("gate-steps-negative", "baft", [EDIT], {"gate_steps": -1}, r"gate_steps=-1: give a number of steps"),
    ("margin-one-half", "baft", [EDIT], {"gate_margin": 0.7}, r"gate_margin=0.7: give a number in \(0, 0.5\]"),
    ("floor-one", "baft", [EDIT], {"gate_floor": 1}, r"gate_floor=1: give a number in \[0, 1\)"),
    ("floor-of-reft", "reft", [EDIT], {"gate_floor": 0.5}, r"reft has no setting \['gate_floor'\]"),
    ("shared-under-rank", "baft", [EDIT], {"shared_bases": 2}, r"shared_bases=2: give 0 \(an intervention per edit\) "
                                                               r"or a number of shared bases of at least rank=4"),
    ("shared-float", "baft", [EDIT], {"shared_bases": 8.0}, r"shared_bases=8.0"),
    ("retention-negative", "baft", [EDIT], {"retention_weight": -1}, r"retention_weight=-1: give a weight"),
    ("unknown-setting", "reft", [EDIT], {"gate_steps": 10}, r"reft has no setting \['gate_steps'\]"),
]


@pytest.mark.parametrize("method, requests, settings, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_fails_before_training(tokenizer, nothing_expensive, method, requests, settings, match):
    model = tiny(tokenizer)
    with untouched(model), raises_exactly(EditRequestError, match):
        make_pack(method, model, tokenizer, requests, settings, progress=False)


def test_a_prompt_without_subject_slot_is_fine(tokenizer):
    model = tiny(tokenizer)
    pack = make_pack("reft", model, tokenizer, [edit(prompt="Danielle Darrieux speaks")], {"steps": 1},
                     progress=False)
    assert pack.edits[0].prompt == "Danielle Darrieux speaks"
