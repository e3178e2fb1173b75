"""Does llama.cpp serve a pack as transformers does? ROME edits of the first N
CounterFact cases, made as one pack on the default model, exported with
`EditPack.export_gguf`; on every prompt of those cases (the edit, its
paraphrases, its neighbours) the next token of llama.cpp on the default model's
own Q4_1 file with the adapter against that of transformers on the dequantized
weights with the pack attached, and the same without the edits. Needs
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
from hf_kedit.methods.locate.rome import rome_edit
from hf_kedit.models import default_gguf

from bench_setup import arguments, prepared, write_results


def transformers_next(model, tokenizer, prompts: list[str]) -> list[int]:
    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax().item()
                for p in tqdm(prompts, desc="transformers")]


def llama_cpp_next(lora: Path | None, prompts: list[str]) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(default_gguf()), lora_path=lora and str(lora), n_ctx=512, n_threads=2,
                          seed=0, verbose=False, logits_all=True)  # logits_all: eval fills llm.scores
    out = []
    for p in tqdm(prompts, desc="llama.cpp"):
        llm.reset()
        llm.eval(llm.tokenize(p.encode(), add_bos=False, special=False))
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
    return out


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", default="../shared/data/counterfact.json")
    p.add_argument("--cases", type=int, default=20)
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    cases = read_cases("counterfact", args.data, limit=args.cases)
    groups = {m: [probe.prompt for c in cases for probe in c.probes[m]] for m in ("efficacy", "generality", "locality")}
    prompts = [q for group in groups.values() for q in group]
    pack = rome_edit(model, tokenizer, [e for c in cases for e in c.edits])
    rows, results, base_differs = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        adapter = pack.export_gguf(Path(tmp) / "edits.gguf")
        for name, lora in (("unedited", None), ("rome pack", adapter)):
            if lora:
                load_edits(model, pack, name="rome")
            ours = transformers_next(model, tokenizer, prompts)
            if lora:
                remove_edits(model, "rome")
            theirs = llama_cpp_next(lora, prompts)
            same = [a == b for a, b in zip(ours, theirs)]
            per_group, start = {}, 0
            for group, texts in groups.items():
                per_group[group] = sum(same[start:start + len(texts)]) / len(texts)
                start += len(texts)
            differ = [{"prompt": q, "transformers": tokenizer.decode(a), "llama.cpp": tokenizer.decode(b),
                       **({"unedited models differ too": base_differs[i]} if base_differs else {})}
                      for i, (q, a, b, ok) in enumerate(zip(prompts, ours, theirs, same)) if not ok]
            also = sum(d.get("unedited models differ too", False) for d in differ)
            results[name] = {"agreement": sum(same) / len(same), "per_group": per_group, "differing": differ}
            rows.append(f"| {name} | {sum(same) / len(same):.3f} | "
                        + " | ".join(f"{per_group[g]:.2f}" for g in groups)
                        + f" | {len(differ)}" + (f" ({also} where the unedited models differ too)" if lora else "")
                        + " |")
            base_differs = [not ok for ok in same]
    table = "\n".join(["| model | top-1 agreement, all prompts | edit prompts | paraphrases | neighbours | differ |",
                       "|---|---|---|---|---|---|", *rows]) + (
        f"\n\n{len(prompts)} prompts of the first {args.cases} CounterFact cases; llama.cpp on "
        f"{default_gguf().name} (Q4_1) against transformers on its dequantized weights.\n")
    write_results(out, table, {"cases": args.cases, "prompts": len(prompts), "results": results})


if __name__ == "__main__":
    main()
