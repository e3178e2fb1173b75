"""Does llama.cpp serve a pack as transformers does? ROME edits of the first N
CounterFact cases, made as one pack on the default model, exported with
`EditPack.export_gguf`; on every prompt of those cases (the edit, its
paraphrases, its neighbours) the next token of llama.cpp on the default model's
own Q4_1 file with the adapter against that of transformers on the dequantized
weights with the pack attached, and the same without the edits. Then the same
for control vectors: per case, a uniform ActAdd pack of its edit acting on
decoder layer --site's output (default: the last layer), exported as a control
vector that llama.cpp applies through `llama_set_adapter_cvec`, against
transformers with that pack attached, on the case's own prompts. Needs
llama-cpp-python (make test-llama-cpp installs it). Prints a Markdown table;
writes results.json and results.md into --out.

    python benchmarks/llama_cpp_agreement.py --cases 20 --out docs/bench/llama-cpp-agreement
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import llama_cpp
import torch
from tqdm.auto import tqdm

from hf_kedit import load_edits, remove_edits
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.methods import make_pack
from hf_kedit.methods.locate.rome import rome_edit
from hf_kedit.models import default_gguf
from hf_kedit.pack.gguf import set_control_vector

from bench_setup import arguments, prepared, write_results

GROUPS = ("efficacy", "generality", "locality")


def transformers_next(model, tokenizer, prompts: list[str]) -> list[int]:
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax().item() for p in prompts]


def served(lora: Path | None = None) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(default_gguf()), lora_path=lora and str(lora), n_ctx=512, n_threads=2,
                           seed=0, verbose=False, logits_all=True)  # logits_all: eval fills llm.scores


def llama_cpp_next(llm: llama_cpp.Llama, prompts: list[str]) -> list[int]:
    out = []
    for p in prompts:
        llm.reset()  # no KV cache reused across prompts (or across control vectors)
        llm.eval(llm.tokenize(p.encode(), add_bos=False, special=False))
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
    return out


def agreement_row(name: str, tokenizer, prompts: dict[str, list[str]], ours: list[int], theirs: list[int],
                  base_differs: list[bool] | None) -> tuple[str, dict]:
    """The table row and results entry of one comparison over every group's prompts."""
    flat = [q for group in GROUPS for q in prompts[group]]
    same = [a == b for a, b in zip(ours, theirs)]
    per_group, start = {}, 0
    for group in GROUPS:
        per_group[group] = sum(same[start:start + len(prompts[group])]) / len(prompts[group])
        start += len(prompts[group])
    differ = [{"prompt": q, "transformers": tokenizer.decode(a), "llama.cpp": tokenizer.decode(b),
               **({"unedited models differ too": base_differs[i]} if base_differs else {})}
              for i, (q, a, b, ok) in enumerate(zip(flat, ours, theirs, same)) if not ok]
    also = sum(d.get("unedited models differ too", False) for d in differ)
    row = (f"| {name} | {sum(same) / len(same):.3f} | " + " | ".join(f"{per_group[g]:.2f}" for g in GROUPS)
           + f" | {len(differ)}" + (f" ({also} where the unedited models differ too)" if base_differs else "") + " |")
    return row, {"agreement": sum(same) / len(same), "per_group": per_group, "differing": differ}


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--site", type=int, default=None, help="the decoder layer the control vectors act on "
                   "(default: the last)")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    site = model.config.num_hidden_layers - 1 if args.site is None else args.site
    cases = read_cases("counterfact", args.data, limit=args.cases)
    groups = {m: [probe.prompt for c in cases for probe in c.probes[m]] for m in GROUPS}
    prompts = [q for group in groups.values() for q in group]
    pack = rome_edit(model, tokenizer, [e for c in cases for e in c.edits])
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = pack.export_gguf(Path(tmp) / "edits.gguf")
        unedited = transformers_next(model, tokenizer, prompts)
        base = llama_cpp_next(served(), prompts)
        row, results["unedited"] = agreement_row("unedited", tokenizer, groups, unedited, base, None)
        rows.append(row)
        base_differs = [a != b for a, b in zip(unedited, base)]
        with_pack = load_edits(model, pack, name="rome")
        ours = transformers_next(with_pack, tokenizer, prompts)
        remove_edits(model, "rome")
        row, results["rome pack"] = agreement_row("rome pack (LoRA adapter)", tokenizer, groups, ours,
                                                  llama_cpp_next(served(adapter), prompts), base_differs)
        rows.append(row)

        # Control vectors: one uniform ActAdd pack per case, switched in one llama.cpp context.
        llm, ours, theirs = served(), {g: [] for g in GROUPS}, {g: [] for g in GROUPS}
        settings = {"site": site, "subject_gate": False, "apply": "every"}
        for case in tqdm(cases, desc="control vectors"):
            steering = make_pack("actadd", model, tokenizer, case.edits, settings, progress=False)
            vector = steering.export_gguf(Path(tmp) / f"{case.id}.gguf")
            set_control_vector(llm, vector)
            load_edits(model, steering, name="actadd")
            for g in GROUPS:
                texts = [probe.prompt for probe in case.probes[g]]
                ours[g] += transformers_next(model, tokenizer, texts)
                theirs[g] += llama_cpp_next(llm, texts)
            remove_edits(model, "actadd")
        set_control_vector(llm, None)
        ours, theirs = ([t for g in GROUPS for t in side[g]] for side in (ours, theirs))
        row, results["actadd control vectors"] = agreement_row(
            f"actadd, site {site} (control vector)", tokenizer, groups, ours, theirs, base_differs)
        rows.append(row)
        moved = sum(a != b for a, b in zip(ours, unedited))
        results["actadd control vectors"].update({"site": site, "transformers answers moved by the pack": moved,
                                                  "cleared vector agrees with the unedited llama.cpp":
                                                  llama_cpp_next(llm, prompts[:20]) == base[:20]})
    table = "\n".join(["| model | top-1 agreement, all prompts | edit prompts | paraphrases | neighbours | differ |",
                       "|---|---|---|---|---|---|", *rows]) + (
        f"\n\n{len(prompts)} prompts of the first {args.cases} CounterFact cases; llama.cpp on "
        f"{default_gguf().name} (Q4_1) against transformers on its dequantized weights. The control vectors "
        f"(one per case, on its own prompts) moved transformers' next token on {moved} of the {len(prompts)} "
        "prompts.\n")
    write_results(out, table, {"cases": args.cases, "prompts": len(prompts), "results": results})


if __name__ == "__main__":
    main()
