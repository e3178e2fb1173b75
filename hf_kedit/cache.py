"""Where hf_kedit keeps what it computes once and reuses (the converted default
model, key statistics, trained editors): `$HF_KEDIT_CACHE`, else `$HF_HOME/hf_kedit`."""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants


def cache_root() -> Path:
    """The folder under which each kind of cached artifact has its own subfolder.

    Example:
        >>> cache_root() / "stats"
        PosixPath('/home/me/.cache/huggingface/hf_kedit/stats')
    """
    return Path(os.environ.get("HF_KEDIT_CACHE") or Path(constants.HF_HOME) / "hf_kedit")
