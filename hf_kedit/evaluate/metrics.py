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


def locality_reference(scorer: Scorer, case: Case) -> dict:
    """What locality compares against, computed once per case on the unedited
    model: per locality metric, the argmax tokens on its answers and its greedy
    continuation (with the argmax tokens along it)."""
    reference = {}
    for metric, probes in case.probes.items():
        if not is_locality(metric):
            continue
        prompts = [p.prompt for p in probes]
        lengths = [len(scorer.answer_ids(p.answers[0])) if p.answers else LOCALITY_FALLBACK_TOKENS for p in probes]
        continuations = scorer.generate(prompts, max(lengths))
        continuations = [c[:n] or [scorer.tokenizer.eos_token_id] for c, n in zip(continuations, lengths)]
        answers = [p.answers[0] if p.answers else c for p, c in zip(probes, continuations)]
        on_answers, along = _read_locality(scorer, prompts, answers, continuations)
        reference[metric] = {
            "answers": answers, "answer_argmax": [f.predicted for f in on_answers],
            "continuation": continuations, "continuation_argmax": [f.predicted for f in along],
        }
    return reference


def score_probes(scorer: Scorer, case: Case, reference: dict) -> dict[str, dict]:
    """Every metric of one case but fluency: metric -> {"cmp", "tf", "gen"} (None where undefined)."""
    scores = {m: _locality(scorer, group, reference[m]) for m, group in case.probes.items()
              if group and is_locality(m)}
    scores.update(_answers(scorer, {m: g for m, g in case.probes.items() if g and not is_locality(m)}))
    for family in ("portability", "locality"):
        _aggregate_groups(scores, family, case.probes)
    return scores


def fluency(scorer: Scorer, cases: list[Case], prompts_per_case: int = 1, tokens: int = 32) -> list[float]:
    """Per case, the mean n-gram entropy of greedy generations from its
    generation prompts (its edit prompts if it has none); one batched pass."""
    prompts = [(i, p) for i, c in enumerate(cases)
               for p in (c.generation_prompts or [e.text for e in c.edits])[:prompts_per_case]]
    texts = [scorer.decode(g) for g in scorer.generate([p for _, p in prompts], tokens)]
    return [mean(ngram_entropy(t) for (i, _), t in zip(prompts, texts) if i == k) for k in range(len(cases))]


def _answers(scorer: Scorer, groups: dict[str, list[Probe]]) -> dict:
    """cmp, tf and gen of the metrics whose probes have answers, in one forced pass."""
    probes = [p for g in groups.values() for p in g]
    readings = scorer.forced([(p.prompt, p.answers[0]) for p in probes]
                             + [(p.prompt, p.contrast) for p in probes if p.contrast])
    main, rivals = readings[:len(probes)], iter(readings[len(probes):])
    rival = [next(rivals) if p.contrast else None for p in probes]
    success = _generation_success(scorer, probes, main)
    scores, start = {}, 0
    for metric, group in groups.items():
        span = range(start, start + len(group))
        start += len(group)
        contrasted = [i for i in span if rival[i] is not None]
        scores[metric] = {
            "cmp": mean(main[i].nll < rival[i].nll for i in contrasted) if contrasted else None,
            "tf": mean(main[i].accuracy for i in span),
            "gen": mean(success[i] for i in span),
        }
    return scores


def _generation_success(scorer: Scorer, probes: list[Probe], main: list[Forced]) -> list[bool]:
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
        longest = max(len(scorer.answer_ids(a)) for i in undecided for a in probes[i].answers)
        for i, g in zip(undecided, scorer.generate([probes[i].prompt for i in undecided], longest + 2)):
            text = normalise(scorer.decode(g))
            success[i] = any(text.startswith(normalise(a)) for a in probes[i].answers)
    return success


def _locality(scorer: Scorer, probes: list[Probe], ref: dict) -> dict:
    prompts = [p.prompt for p in probes]
    on_answers, along = _read_locality(scorer, prompts, ref["answers"], ref["continuation"])
    contrasted = [(i, p) for i, p in enumerate(probes) if p.contrast and p.answers]
    rival = scorer.forced([(p.prompt, p.contrast) for _, p in contrasted]) if contrasted else []
    return {
        "cmp": mean(on_answers[i].nll < r.nll for (i, _), r in zip(contrasted, rival)) if contrasted else None,
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
