"""Shared-basis BaFT edit by edit: after each edit of a sequence of single-edit
batches (each pack replacing the last, as the harness does), how many of the
sequence's edits still give their target (teacher-forced top-1 of every target
token), which bases the new edit opened, how far the earlier edits' updates at
their keys moved, on how many tokens of `general_text.txt` some gate is open,
and that text's loss. Prints a Markdown table; writes results.json and
results.md into --out.

    python benchmarks/shared_bases_trace.py --data easyedit:../shared/data/counterfact_easyedit.json --edits 20 \\
        --bases 64 --out docs/bench/baft-shared-trace
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hf_kedit import load_edits, remove_edits
from hf_kedit.anatomy import anatomy_of
from hf_kedit.evaluate.datasets import read_cases
from hf_kedit.evaluate.general_ability import GENERAL_TEXT
from hf_kedit.evaluate.scoring import Scorer
from hf_kedit.kinds.basis_intervention import gate_weights, intervention_delta
from hf_kedit.methods import make_pack
from hf_kedit.methods.representation.core import layer_states
from hf_kedit.methods.representation.shared_bases import SharedBases

from bench_setup import arguments, prepared, write_results

PARTS = ("rotation", "source.weight", "source.bias", "gate.weight", "gate.bias")


def intervention_of(pack) -> tuple[int, dict]:
    layer = pack.kind_config["layers"][0]
    return layer, {part: pack.tensors[f"bases.layers.{layer}.{part}"] for part in PARTS}


def update_at(parts: dict, floor: float, h: torch.Tensor) -> torch.Tensor:
    gate = (parts["gate.weight"], parts["gate.bias"], torch.ones_like(parts["gate.bias"], dtype=torch.bool),
            torch.full_like(parts["gate.bias"], floor))
    return intervention_delta(h, parts["rotation"], parts["source.weight"], parts["source.bias"], gate)


def main() -> None:
    p = arguments(__doc__, out=None)
    p.add_argument("--data", required=True, help="FORMAT:PATH of a benchmark")
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--bases", type=int, default=64, help="shared_bases")
    args = p.parse_args()
    model, tokenizer, out = prepared(args)
    fmt, path = args.data.split(":", 1)
    edits = [c.edits[0] for c in read_cases(fmt, path, limit=args.edits)]
    text = GENERAL_TEXT.read_text()[:1500]
    ids = tokenizer(text, return_tensors="pt").input_ids
    history, rows, before = SharedBases(), [], None
    for i, edit in enumerate(tqdm(edits, desc="shared bases", unit="edit")):
        pack = make_pack("baft", model, tokenizer, [edit], {"shared_bases": args.bases}, progress=False,
                         history=history)
        if i:
            remove_edits(model, "shared")
        load_edits(model, pack, name="shared")
        layer, parts = intervention_of(pack)
        floor = pack.kind_config["gate_floor"]
        keys = history.tensors["keys"]
        updates = update_at(parts, floor, keys)
        moved = None
        if before is not None:
            size = before.norm(dim=-1)
            shift = (updates[:len(before)] - before).norm(dim=-1)
            moved = float((shift[size > 0] / size[size > 0]).max()) if (size > 0).any() else 0.0
        before = updates
        opened = (gate_weights(keys[-1:], parts["gate.weight"], parts["gate.bias"]) >= floor)[0]
        states = layer_states(model, tokenizer, anatomy_of(model).layer(layer), [text])
        open_tokens = int((gate_weights(states, parts["gate.weight"], parts["gate.bias"]) >= floor).any(-1).sum())
        readings = Scorer(model, tokenizer).forced([(e.text, e.target_new) for e in edits[:i + 1]])
        with torch.no_grad():
            loss = float(model(ids, labels=ids).loss)
        rows.append({"edits": i + 1, "holding": sum(r.accuracy == 1 for r in readings),
                     "opened": opened.nonzero().flatten().tolist(), "largest_move": moved,
                     "open_text_tokens": open_tokens, "text_tokens": len(states), "text_loss": loss})
    remove_edits(model, "shared")
    lines = ["| edits | edits giving their target | bases the new edit opened | largest move of an earlier "
             "update | text tokens with an open gate | text loss (nats/token) |", "|---|---|---|---|---|---|"]
    for r in rows:
        moved = "–" if r["largest_move"] is None else f"{r['largest_move']:.1e}"
        lines.append(f"| {r['edits']} | {r['holding']} | {len(r['opened'])} | {moved} | "
                     f"{r['open_text_tokens']} of {r['text_tokens']} | {r['text_loss']:.3f} |")
    table = "\n".join(lines) + f"\n\n{args.edits} single-edit batches of {args.data}, {args.bases} shared bases.\n"
    write_results(out, table, {"data": args.data, "bases": args.bases, "rows": rows})


if __name__ == "__main__":
    main()
