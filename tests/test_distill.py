"""The distill method: the student's outputs without the fact in context approach
the teacher's with it on the texts it was trained on, and stay near the
unedited model's on unrelated text; the pack attaches, stacks and comes off like
every weight_delta pack; bad settings are refused before the model runs."""
import pytest
import torch
import torch.nn.functional as F

from hf_kedit import Edit, load_edits, remove_edits
from hf_kedit.errors import EditRequestError
from hf_kedit.methods import make_pack
from hf_kedit.methods.distill.distill import DistillConfig, teacher_texts
from hf_kedit.methods.in_context import aligned_positions, fact_context
from test_bad_input import raises_exactly, untouched
from test_rome import tiny

EDIT = Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
UNRELATED = "The weather in Paris is mild in spring, and the"
SETTINGS = {"layers": [1], "steps": 100, "lr": 2e-2, "samples": 2, "sample_tokens": 8, "locality_samples": 2,
            "locality_tokens": 12}

pytestmark = pytest.mark.usefixtures("one_thread")




def log_probs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(ids).logits[0].float(), -1)


def teacher_reading(model, tokenizer, text, context):
    """The teacher's log-probabilities (the model with `context`) at the positions of
    `text` that read the same tokens of it without the context, and those pairs."""
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    student, teacher = tokenizer(text).input_ids, tokenizer(context + text).input_ids
    pairs = aligned_positions(student, teacher, tokens)
    p_teacher = log_probs(model, torch.tensor([teacher]))[[t for _, t in pairs]]
    return p_teacher, pairs


def test_aligned_positions_pair_the_positions_that_read_the_same_end_of_the_text():
    # the teacher's context merged with the text's first token (5 became 4): only the shared end pairs
    assert aligned_positions([1, 5, 6, 7], [1, 9, 9, 4, 6, 7], [5, 6, 7]) == [(2, 4)]
    assert aligned_positions([1, 5, 6, 7], [1, 9, 5, 6, 7], [5, 6, 7]) == [(1, 2), (2, 3)]
    assert aligned_positions([1, 5], [1, 9, 4], [5]) == []


# The fraction of the teacher-student gap left after training, at most: a basis student acts only at the
# subject's last token of each text, so on this random model it closes less of the gap than LoRA factors.
@pytest.mark.parametrize("student, left", [("lora", 0.5), ("basis", 0.9)])
def test_the_student_learns_to_read_without_the_context_as_the_teacher_reads_with_it(tokenizer, student, left):
    # weights of a wider spread than a fresh model's, so that the context changes what it predicts
    model = tiny(tokenizer, initializer_range=0.1)
    context = fact_context([EDIT])
    config = DistillConfig(**SETTINGS)
    texts = teacher_texts(model, tokenizer, EDIT, config)
    assert len(texts) == 3 and texts[0] == "The mother tongue of Danielle Darrieux is English"
    assert all(t.startswith("Danielle Darrieux") for t in texts[1:])
    targets = []
    for text in texts:
        p_teacher, pairs = teacher_reading(model, tokenizer, text, context)
        targets.append((tokenizer(text).input_ids, p_teacher, [s for s, _ in pairs]))

    def mean_gap():
        kl = [F.kl_div(log_probs(model, torch.tensor([row]))[where], p, log_target=True, reduction="none").sum(-1)
              for row, p, where in targets]
        return torch.cat(kl).mean().item()
    unrelated = torch.tensor([tokenizer(UNRELATED).input_ids])
    base, before = log_probs(model, unrelated), mean_gap()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pack = make_pack("distill", model, tokenizer, [EDIT], {**SETTINGS, "student": student}, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "the method changed the model"
    if student == "lora":
        assert pack.kind == "weight_delta" and list(pack.kind_config["modules"]) == ["model.layers.1.mlp.down_proj"]
    else:
        assert pack.kind == "basis_intervention" and pack.kind_config["layers"] == [1]
        assert pack.kind_config["gate"] == "sigmoid_rms" and pack.hyperparameters["student"] == "basis"
    load_edits(model, pack, name="d")
    after = mean_gap()
    drift = F.kl_div(log_probs(model, unrelated), base, log_target=True, reduction="none").sum(-1).mean().item()
    remove_edits(model, "d")
    assert after < left * before, f"KL(teacher ‖ student) {before:.3f} -> {after:.3f}: the student did not learn"
    assert drift < 0.5 * before, f"unrelated text moved by {drift:.3f} against a gap of {before:.3f}"
    assert torch.equal(log_probs(model, unrelated), base)


@pytest.mark.parametrize("student", ["lora", "basis"])
def test_packs_of_two_edits_stack_and_come_off_one_edit_at_a_time(tokenizer, student):
    model = tiny(tokenizer)
    other = Edit("e1", "Marie Curie", "{} was born in", "Lyon", "Warsaw")
    ids = torch.tensor([tokenizer(EDIT.text).input_ids])
    base = log_probs(model, ids)
    pack = make_pack("distill", model, tokenizer, [EDIT, other], {**SETTINGS, "steps": 5, "student": student},
                     progress=False)
    load_edits(model, pack, name="d")
    both = log_probs(model, ids)
    remove_edits(model, "d", edit_ids=["e1"])
    load_edits(model, pack.select(["e1"]), name="e1 alone")
    assert torch.allclose(log_probs(model, ids), both, atol=1e-5)
    remove_edits(model, "d")
    remove_edits(model, "e1 alone")
    assert torch.equal(log_probs(model, ids), base)


@pytest.mark.parametrize("settings, match", [
    ({"layers": 0.3}, r"layers=0\.3: give a list"),
    ({"layers": []}, r"layers=\[\]: give a list"),
    ({"rank": 0}, r"rank=0: give an integer of at least 1"),
    ({"samples": -1}, r"samples=-1: give an integer of at least 0"),
    ({"lr": 0}, r"lr=0: give a positive number"),
    ({"locality_weight": float("nan")}, r"locality_weight=nan: give a non-negative number"),
    ({"layers": [7]}, r"layer"),
    ({"student": "ia3"}, r"student='ia3': give one of 'lora', 'basis'"),
    ({"student": "basis", "layers": [0, 1]}, r"layers=\[0, 1\]: a basis student intervenes at one layer"),
])
def test_bad_settings_are_refused_before_the_model_changes(tokenizer, settings, match):
    model = tiny(tokenizer)
    with untouched(model), raises_exactly(EditRequestError, match):
        make_pack("distill", model, tokenizer, [EDIT], settings, progress=False)


def test_distill_on_the_default_model_end_to_end(default_model, tmp_path):
    from hf_kedit.demo import NEIGHBOUR, greedy_answer

    model, tokenizer = default_model
    assert greedy_answer(model, tokenizer, EDIT.text).startswith("French")
    assert greedy_answer(model, tokenizer, NEIGHBOUR).startswith("French")
    ids = tokenizer(EDIT.text, return_tensors="pt").input_ids
    base = log_probs(model, ids)
    folder = make_pack("distill", model, tokenizer, [EDIT], progress=False).save_pretrained(tmp_path / "distill")
    assert torch.equal(log_probs(model, ids), base)
    load_edits(model, str(folder), name="d")
    try:
        assert greedy_answer(model, tokenizer, EDIT.text).startswith("English")
        assert greedy_answer(model, tokenizer, NEIGHBOUR).startswith("French")  # the neighbour keeps its answer
    finally:
        remove_edits(model, "d")
    assert torch.equal(log_probs(model, ids), base)
