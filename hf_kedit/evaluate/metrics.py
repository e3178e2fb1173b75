"""The metrics, each scored three ways where it is defined:

- `cmp`: probability comparison, as in the ROME paper: the answer's mean token
  NLL is lower than the contrast's (efficacy, generality, robustness: new beats
  old; locality: the neighbour's true answer still beats the new target);
- `tf`: teacher-forced token accuracy, as EasyEdit computes it (locality: the
  share of argmax tokens unchanged by the edit);
- `gen`: greedy generation: the continuation starts with an answer after
  normalising case and whitespace (locality: the continuation is the same as
  before the edit).
Each case's score is the mean over its probes; `fluency` holds `entropy`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from statistics import mean

from tqdm.auto import tqdm

from .cases import Case, Probe
from .scoring import Forced, Scorer

# The doubt prompt of the SAKE reference code (the model is told the new answer is
# wrong and asked again). The paper's appendix lists a second one that could not
# be recovered here; pass your own list as `doubt_templates`.
DOUBT_TEMPLATES = ("{prompt} {new}??? No, it can't be, This contradicts my understanding. It is pretty clear "
                   "that the answer to '{prompt}' is something else. Rethink and give the correct answer:",)
LOCALITY_FALLBACK_TOKENS = 5


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def ngram_entropy(text: str) -> float:
    """EasyEdit's fluency: entropies (bits) of the bigram and trigram distributions
    of the words, weighted 2/3 and 4/3, averaged."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        values.append(weight * entropy)
    return mean(values)


def with_robustness(case: Case, templates=DOUBT_TEMPLATES) -> Case:
    """The case with its `robustness` probes: each edit's doubt prompts."""
    probes = [Probe(t.format(prompt=e.text, new=e.target_new), [e.target_new], e.target_true)
              for e in case.edits for t in templates]
    return Case(case.id, case.edits, {**case.probes, "robustness": probes}, case.generation_prompts)


def in_context(case: Case, context: str) -> Case:
    """The case with `context` before every prompt (in-context editing)."""
    probes = {m: [Probe(context + p.prompt, p.answers, p.contrast) for p in group] for m, group in case.probes.items()}
    prompts = [context + p for p in case.generation_prompts or [e.text for e in case.edits]]
    return Case(case.id, case.edits, probes, prompts)


def is_locality(metric: str) -> bool:
    return metric.split("/")[0] == "locality"


def reference_answers(scorer: Scorer, cases: list[Case], progress: bool = False) -> dict[str, dict]:
    """What locality compares against, per case and locality metric, computed once
    on the unedited model: the argmax tokens on its answers and its greedy
    continuation (with the argmax tokens along it). The continuations of all
    cases are generated together; each case's answers and continuations are read
    alone, as `score_cases` reads them after the edit."""
    wanted = [(case.id, metric, probe) for case in cases for metric, probes in case.probes.items()
              if is_locality(metric) for probe in probes]
    lengths = [len(scorer.answer_ids(p.answers[0])) if p.answers else LOCALITY_FALLBACK_TOKENS for _, _, p in wanted]
    generated = scorer.generate([p.prompt for _, _, p in wanted], lengths,
                                desc="pre-edit continuations" if progress else None)
    continuations = {}
    for (case_id, metric, _), tokens, n in zip(wanted, generated, lengths):
        continuations.setdefault((case_id, metric), []).append(tokens[:n] or [scorer.tokenizer.eos_token_id])
    references = {}
    for case in tqdm(cases, desc="pre-edit answers", disable=not progress):
        references[case.id] = {}
        for metric, probes in case.probes.items():
            if not is_locality(metric):
                continue
            prompts = [p.prompt for p in probes]
            continuation = continuations.get((case.id, metric), [])
            answers = [p.answers[0] if p.answers else c for p, c in zip(probes, continuation)]
            on_answers, along = _read_locality(scorer, prompts, answers, continuation)
            references[case.id][metric] = {
                "answers": answers, "answer_argmax": [f.predicted for f in on_answers],
                "continuation": continuation, "continuation_argmax": [f.predicted for f in along],
            }
    return references


def score_cases(scorer: Scorer, cases: list[Case], references: dict, desc: str | None = None) -> dict[str, dict]:
    """Every metric but fluency of each case: case id -> metric -> {"cmp", "tf",
    "gen"} (None where undefined), for cases that share the model's state. The
    answers and contrasts of all cases are read in one batched pass and the
    undecided generations in one more; each case's locality answers and
    continuations are read alone, in the batches its reference was read in, so
    an edit that changes nothing there scores exactly 1."""
    # plans: (case, metric, probes, the indices of their contrasts' readings in `pairs`, and for
    # locality the case's own readings, else the indices of the answers' readings)
    pairs, plans = [], []

    def ask(prompt, answer) -> int:
        pairs.append((prompt, answer))
        return len(pairs) - 1

    for case in tqdm(cases, desc=desc and f"{desc} (locality)", disable=not desc or len(cases) == 1):
        for metric, group in case.probes.items():
            if not group:
                continue
            rivals = [ask(p.prompt, p.contrast) if p.contrast and (p.answers or not is_locality(metric)) else None
                      for p in group]
            if is_locality(metric):
                ref = references[case.id][metric]
                read = _read_locality(scorer, [p.prompt for p in group], ref["answers"], ref["continuation"])
                plans.append((case, metric, group, rivals, read))
            else:
                plans.append((case, metric, group, rivals, [ask(p.prompt, p.answers[0]) for p in group]))
    readings = scorer.forced(pairs, desc=desc and f"{desc} (answers)")
    answered = [(p, readings[i]) for _, metric, group, _, main in plans if not is_locality(metric)
                for p, i in zip(group, main)]
    success = iter(_generation_success(scorer, [p for p, _ in answered], [f for _, f in answered],
                                       desc and f"{desc} (generations)"))
    scores = {case.id: {} for case in cases}
    for case, metric, group, rivals, own in plans:
        rival = [readings[i] if i is not None else None for i in rivals]
        if is_locality(metric):
            scores[case.id][metric] = _locality(own, rival, references[case.id][metric])
        else:
            main = [readings[i] for i in own]
            contrasted = [i for i, r in enumerate(rival) if r is not None]
            scores[case.id][metric] = {
                "cmp": mean(main[i].nll < rival[i].nll for i in contrasted) if contrasted else None,
                "tf": mean(f.accuracy for f in main),
                "gen": mean(next(success) for _ in group),
            }
    for case in cases:
        for family in ("portability", "locality"):
            _aggregate_groups(scores[case.id], family, case.probes)
    return scores


def fluency(scorer: Scorer, cases: list[Case], prompts_per_case: int = 1, tokens: int = 32,
            desc: str | None = None) -> list[float]:
    """Per case, the mean n-gram entropy of greedy generations from its
    generation prompts (its edit prompts if it has none); one batched pass."""
    prompts = [(i, p) for i, c in enumerate(cases)
               for p in (c.generation_prompts or [e.text for e in c.edits])[:prompts_per_case]]
    texts = [scorer.decode(g) for g in scorer.generate([p for _, p in prompts], tokens, desc)]
    return [mean(ngram_entropy(t) for (i, _), t in zip(prompts, texts) if i == k) for k in range(len(cases))]


def _generation_success(scorer: Scorer, probes: list[Probe], main: list[Forced],
                        desc: str | None = None) -> list[bool]:
    """Does greedy decoding start with an answer? The forced pass decides most
    probes: if every answer token is the argmax, greedy decoding writes that
    answer; if the first argmax token cannot begin any answer, it writes none.
    Only the rest are generated."""
    success, undecided = [], []
    for i, (p, f) in enumerate(zip(probes, main)):
        first = normalise(scorer.decode(f.predicted[:1]))
        answers = [normalise(a) for a in p.answers]
        if f.accuracy == 1.0:
            success.append(True)
        elif first and not any(a.startswith(first) or first.startswith(a) for a in answers):
            success.append(False)
        else:
            success.append(None)
            undecided.append(i)
    if undecided:
        lengths = [max(len(scorer.answer_ids(a)) for a in probes[i].answers) + 2 for i in undecided]
        for i, g in zip(undecided, scorer.generate([probes[i].prompt for i in undecided], lengths, desc)):
            text = normalise(scorer.decode(g))
            success[i] = any(says(text, normalise(a)) for a in probes[i].answers)
    return success


def says(text: str, answer: str) -> bool:
    """Whether normalised `text` starts with `answer` as a whole: "arabia" does not
    say the alias "ar", "ar." and "ar is" do."""
    return text.startswith(answer) and not text[len(answer):len(answer) + 1].isalnum()


def _locality(read, rival: list, ref: dict) -> dict:
    on_answers, along = read
    contrasted = [i for i, r in enumerate(rival) if r is not None]
    return {
        "cmp": mean(on_answers[i].nll < rival[i].nll for i in contrasted) if contrasted else None,
        "tf": mean(_share_equal(f.predicted, before) for f, before in zip(on_answers, ref["answer_argmax"])),
        # Greedy decoding reproduces the old continuation exactly when the argmax along
        # it is unchanged at every step, so no generation is needed after the edit.
        "gen": mean(f.predicted == before for f, before in zip(along, ref["continuation_argmax"])),
    }


def _read_locality(scorer: Scorer, prompts, answers, continuations):
    # One call, the same before and after the edit: identical batches give identical
    # numerics, so an edit that changes nothing scores exactly 1.
    readings = scorer.forced(list(zip(prompts, answers)) + list(zip(prompts, continuations)))
    return readings[:len(prompts)], readings[len(prompts):]


def _share_equal(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(b)


def _aggregate_groups(scores: dict, family: str, probes: dict) -> None:
    """`portability` over all `portability/<group>` probes (weighted by probe count)."""
    groups = [m for m in scores if m.startswith(family + "/")]
    if not groups or family in scores:
        return
    weights = {m: len(probes[m]) for m in groups}
    total = {}
    for kind in ("cmp", "tf", "gen"):
        defined = [(scores[m][kind], weights[m]) for m in groups if scores[m][kind] is not None]
        total[kind] = sum(v * w for v, w in defined) / sum(w for _, w in defined) if defined else None
    scores[family] = total
