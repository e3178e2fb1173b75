"""Work split across processes (accelerate's process group, gloo on CPU): two
processes spawned inside the test stand for `accelerate launch --num_processes 2`."""
import json
import os
import socket
from pathlib import Path

import pytest
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


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact.json"
BENCH = dict(methods=["unedited", "lora"], settings={"lora": {"steps": 3}})


def bench_in_process(rank: int, world: int, port: int, tokenizer_dir: str, out: str) -> None:
    """One process of the group: the bench of BENCH on 5 cases, written by the first process into `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from hf_kedit.evaluate.bench import run_bench
    from hf_kedit.evaluate.datasets import read_cases
    from hf_kedit.evaluate.harness import EvalConfig
    from test_rome import tiny

    PartialState(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    run_bench(tiny(tokenizer), tokenizer, read_cases("counterfact", DATA, limit=5), BENCH["methods"],
              settings=BENCH["settings"], config=EvalConfig(fluency_tokens=4), out_dir=out, progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_two_processes_give_the_bench_of_one_case_by_case(default_model, tmp_path):
    from hf_kedit.evaluate.bench import run_bench
    from hf_kedit.evaluate.datasets import read_cases
    from hf_kedit.evaluate.harness import EvalConfig
    from test_rome import tiny

    tokenizer = default_model[1]
    mp.spawn(bench_in_process, nprocs=2, join=True,
             args=(2, free_port(), tokenizer.name_or_path, str(tmp_path / "two")))
    one = run_bench(tiny(tokenizer), tokenizer, read_cases("counterfact", DATA, limit=5), BENCH["methods"],
                    settings=BENCH["settings"], config=EvalConfig(fluency_tokens=4), out_dir=tmp_path / "one",
                    progress=False)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert [r["method"] for r in two] == [r["method"] for r in one]
    for a, b in zip(one, two):
        assert b["timing"]["processes"] == 2 and b["case_ids"] == a["case_ids"]
        assert b["per_case"] == json.loads(json.dumps(a["per_case"]))
        assert b["metrics"] == json.loads(json.dumps(a["metrics"]))
        assert len(b["timing"]["edit_seconds_per_pack"]) == len(a["timing"]["edit_seconds_per_pack"])


def test_modes_that_edit_cases_together_do_not_split(monkeypatch):
    from hf_kedit.evaluate import bench

    class TwoProcesses:
        num_processes, is_main_process = 2, True

    monkeypatch.setattr(bench, "process_state", lambda: TwoProcesses())
    with pytest.raises(ValueError, match="do not split"):
        bench.run_bench(None, None, [], ["unedited", "lora"], modes=("single", "batch"))


def test_processes_relaunches_the_command_without_itself():
    from hf_kedit.cli import launch_command

    argv = ["bench", "--model", "default", "--processes", "2", "--methods", "rome", "--out", "b", "--processes=2"]
    command = launch_command(argv, 2)
    launched = command[command.index("hf_kedit.cli") + 1:]
    assert launched == ["bench", "--model", "default", "--methods", "rome", "--out", "b"]
    assert command[command.index("--num_processes") + 1] == "2"


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_kedit_bench_processes_2_writes_one_result(default_model, tmp_path):
    from hf_kedit.cli import main as kedit
    from test_rome import tiny

    tokenizer = default_model[1]
    tiny(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["bench", "--model", str(tmp_path / "model"), "--methods", "unedited", "--metrics",
              "efficacy,locality", "--data", f"counterfact:{DATA}", "--limit", "3"]
    assert kedit(common + ["--processes", "2", "--out", str(tmp_path / "two")]) == 0
    assert kedit(common + ["--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two[0]["timing"]["processes"] == 2 and two[0]["per_case"] == one[0]["per_case"]
