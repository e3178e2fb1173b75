"""Facts stated in the prompt: the context the `icl` baseline puts before each
prompt of a case, the context `distill`'s teacher reads, and the facts the model
infers from an edit when it reads it there (`implied_edits`, extra training
prompts for any method)."""
from __future__ import annotations

import torch

from ..anatomy import input_device
from ..pack import Edit
from ..sampling import continuations, seeded

FACT_CONTEXT = "New Fact: {fact}\nPrompt: "
_WORD_TOKENS = 4  # at most this many tokens of an implied target
# An implied word's probability must rise by this much with the fact in context: a context
# shifts the odds of many function words a little, an inference moves one word a lot.
IMPLIED_GAIN = 0.3


def fact_context(edits: list[Edit]) -> str:
    """The edits as facts before a prompt, one line each.

    Example:
        >>> fact_context([Edit("e0", "Danielle Darrieux", "The mother tongue of {} is", "English")])
        'New Fact: The mother tongue of Danielle Darrieux is English.\\nPrompt: '
    """
    return "".join(FACT_CONTEXT.format(fact=f"{e.text} {e.target_new.strip()}.") for e in edits)


@torch.no_grad()
def teacher_continuations(model, tokenizer, edit: Edit, n: int, new_tokens: int, seed: int) -> list[str]:
    """`n` texts the model writes after the edit's subject with the fact in context
    (top-50 sampling, seeded), each starting with the subject."""
    if not n:
        return []
    with seeded(seed):
        texts = continuations(model, tokenizer, fact_context([edit]) + edit.subject, n, new_tokens, top_k=50)
    return [edit.subject + t for t in texts]


def aligned_positions(student: list[int], teacher: list[int], text: list[int]) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs that predict the same token of
    `text` after the same tokens of it: both rows end with `text`'s tokens as far
    back as they agree (the teacher's context can merge with the text's first
    token), and a position is paired when the token it reads is in that shared end."""
    shared = 0
    while shared < min(len(student), len(teacher), len(text)) and \
            student[-1 - shared] == teacher[-1 - shared] == text[-1 - shared]:
        shared += 1
    return [(len(student) - k - 1, len(teacher) - k - 1) for k in range(shared - 1, 0, -1)]


@torch.no_grad()
def implied_edits(model, tokenizer, edits: list[Edit], per_edit: int, new_tokens: int = 24,
                  seed: int = 0) -> list[Edit]:
    """Facts the model infers from each edit when it reads the edit in context, as
    edit requests of their own (up to `per_edit` per edit, id "{id}-implied-{k}").

    The model writes `2 * per_edit` texts after the subject with the fact in
    context (`teacher_continuations`), each cut at its first line break. In each,
    the first word after the subject that the model writes as its most likely
    token with the fact in context but not without it, and whose probability the
    context raises by at least `IMPLIED_GAIN`, is an implied fact: the text before
    it is the prompt, the word the new target, the model's own word without the
    context the old one ("Danielle Darrieux was born in" England, not Paris). The
    edit's own prompt is not one.

    Example:
        >>> implied_edits(model, tokenizer, [edit], per_edit=2)
        [Edit("e0-implied-0", "Danielle Darrieux", "{} was born in", "England", "Paris"), ...]
    """
    implied = []
    for edit in edits:
        found = []
        for text in teacher_continuations(model, tokenizer, edit, 2 * per_edit, new_tokens, seed):
            fact = _first_inference(model, tokenizer, edit, text.split("\n")[0])
            if fact and fact[0] != edit.prompt and fact[0] not in [f[0] for f in found]:
                found.append(fact)
            if len(found) == per_edit:
                break
        implied += [Edit(f"{edit.id}-implied-{k}", edit.subject, prompt, new, old)
                    for k, (prompt, new, old) in enumerate(found)]
    return implied


def _first_inference(model, tokenizer, edit: Edit, text: str) -> tuple[str, str, str] | None:
    """(prompt with "{}", new word, old word) at the first word of `text` after the
    subject that the model predicts with the fact in context and not without it."""
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    student, teacher = tokenizer(text).input_ids, tokenizer(fact_context([edit]) + text).input_ids
    pairs = aligned_positions(student, teacher, tokens)
    if not pairs:
        return None
    # One row a pass: a near tie resolves as it does when the prompt is read alone.
    without, with_fact = [model(input_ids=torch.tensor([row], device=input_device(model))).logits[0].float()
                          .softmax(-1) for row in (student, teacher)]
    subject_end = len(tokenizer(edit.subject).input_ids)  # the subject's tokens, BOS included where there is one
    for s, t in pairs:
        word = student[s + 1]
        if (s + 1 <= subject_end or not tokenizer.decode([word]).startswith(" ")
                or with_fact[t].argmax() != word or without[s].argmax() == word
                or with_fact[t, word] - without[s, word] < IMPLIED_GAIN):
            continue
        end = s + 2
        while end < len(student) and end - s - 1 < _WORD_TOKENS and tokenizer.decode([student[end]])[:1].isalnum():
            end += 1
        prompt = tokenizer.decode(student[:s + 1], skip_special_tokens=True).strip()
        new, old = tokenizer.decode(student[s + 1:end]).strip(), tokenizer.decode([int(without[s].argmax())]).strip()
        rest = prompt[len(edit.subject):]
        # A prompt that already holds the target's first word is the target being finished, not an inference.
        if prompt.startswith(edit.subject) and new and old and new.lower() != old.lower() \
                and edit.target_new.split()[0].lower() not in rest.lower().split():
            return "{}" + rest, new, old
    return None
