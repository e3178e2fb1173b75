"""The processes a run is split across: one, unless it was launched by
`accelerate launch` or torchrun, in which case accelerate's process group
(NCCL between GPUs, gloo between the CPU processes of a machine without an
accelerator). Work that splits (key statistics, evaluation) asks here."""
from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """accelerate's state of this run's processes (`process_index`,
    `num_processes`, `is_main_process`, `split_between_processes`, ...).

    Example:
        >>> state = process_state()
        >>> mine = texts[state.process_index::state.num_processes]
    """
    # Without cpu=True, accelerate forms no group of CPU processes on a machine without a GPU.
    return PartialState(cpu=not torch.cuda.is_available())
