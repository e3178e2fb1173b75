"""Work split across processes (accelerate's process group, gloo on CPU): two
processes spawned inside the test stand for `accelerate launch --num_processes 2`."""
import os
import socket

import torch
import torch.multiprocessing as mp

CORPUS = [f"Note {i}: the weather in town number {i} was {'cold' if i % 3 else 'warm'} and the river ran high."
          for i in range(40)]
N_TOKENS = 333  # ends inside a batch, so the cut-off is shared between processes correctly or not at all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def statistics_in_process(rank: int, world: int, port: int, tokenizer_dir: str, cache: str, out: str) -> None:
    """One process of the group: the key statistics of layers 0 and 2 of the tiny model, written to `out` by rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_KEDIT_CACHE=cache, OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from hf_kedit.methods.locate.stats import key_second_moments
    from test_rome import tiny

    state = PartialState(cpu=True)
    assert state.num_processes == world
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    moments = key_second_moments(tiny(tokenizer), tokenizer, [0, 2], corpus=CORPUS, n_tokens=N_TOKENS,
                                 progress=False)
    if rank == 0:
        torch.save(moments, out)
    state.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_processes_compute_the_key_statistics_of_one(default_model, tmp_path, monkeypatch):
    from hf_kedit.methods.locate.stats import key_second_moments, stats_dir
    from test_rome import tiny

    tokenizer = default_model[1]
    mp.spawn(statistics_in_process, nprocs=2, join=True, args=(
        2, free_port(), tokenizer.name_or_path, str(tmp_path / "shared"), str(tmp_path / "two.pt")))
    two = torch.load(tmp_path / "two.pt")
    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "one"))
    one = key_second_moments(tiny(tokenizer), tokenizer, [0, 2], corpus=CORPUS, n_tokens=N_TOKENS, progress=False)
    for layer in (0, 2):
        torch.testing.assert_close(two[layer], one[layer], rtol=1e-5, atol=1e-7)
    # the processes wrote one cache entry per layer between them, whole, with the count of one process
    from safetensors import safe_open

    monkeypatch.setenv("HF_KEDIT_CACHE", str(tmp_path / "shared"))
    files = sorted(stats_dir().glob("*.safetensors"))
    assert len(files) == 2 and not list(stats_dir().glob("*.tmp"))
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata()["tokens_seen"] == str(N_TOKENS)
