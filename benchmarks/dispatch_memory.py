"""Editing a model spread by accelerate, on the default model: one edit of each
of --methods made with the model on the CPU and with its later half of layers
on disk (a device map, `load_model(..., device_map=, offload_folder=)`); the
packs compared tensor by tensor, and each edit's peak resident memory.

Each (method, placement) runs in a process of its own, so its peak is its own:
the kernel's high-water mark of the process's resident memory (`VmHWM`, reset
at exec; `ru_maxrss` is not, and carries the parent's peak into a child). The
loaded weights are pages of the mmapped checkpoint, resident once touched, so
resident memory is also split, sampled every 10 ms, into anonymous memory (what
the process allocated: activations, gradients, copies) and file-backed pages
(the checkpoint's, clean and reclaimable). Figures are ratios to the bytes of
the model's weights, above the process's baseline (interpreter and libraries,
before the model is loaded). The key statistics and context templates are made
once beforehand, as a user's second edit finds them. Prints a Markdown table;
writes results.json and results.md into --out.

    python benchmarks/dispatch_memory.py --methods rome,baft,sake --out docs/bench/dispatch-memory
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_setup import arguments, write_results

EDIT = ("darrieux", "Danielle Darrieux", "The mother tongue of {} is", "English", "French")


def half_on_disk(num_layers: int) -> dict:
    """A device map of the default model (Llama's module names) with its later half of layers on disk."""
    return {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
            **{f"model.layers.{i}": "cpu" if i < num_layers // 2 else "disk" for i in range(num_layers)}}


def memory_status() -> dict:
    """This process's resident memory from Linux's /proc/self/status, in bytes: VmHWM, RssAnon, RssFile."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(key + r":\s+(\d+) kB", status).group(1)) * 1024
            for key in ("VmHWM", "RssAnon", "RssFile")}


class PeakSampler:
    """The largest anonymous and file-backed resident memory seen, sampled every 10 ms in a thread."""

    def __init__(self):
        self.peaks = memory_status()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        while True:
            now = memory_status()
            self.peaks = {key: max(self.peaks[key], now[key]) for key in now}
            time.sleep(0.01)


def child(method: str, placement: str, out: Path) -> None:
    """One edit in this process: writes the pack's tensors and the memory figures into `out`."""
    from safetensors.torch import save_file

    from hf_kedit import Edit
    from hf_kedit.methods import make_pack
    from hf_kedit.models import load_model

    baseline = memory_status()
    sampler = PeakSampler()
    device_map, offload = None, None
    if placement == "half on disk":
        from transformers import AutoConfig

        from hf_kedit.models import default_cache_dir
        layers = AutoConfig.from_pretrained(default_cache_dir()).num_hidden_layers
        device_map, offload = half_on_disk(layers), tempfile.mkdtemp(prefix="kedit-offload-")
    model, tokenizer = load_model("default", device_map=device_map, offload_folder=offload)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    start = time.perf_counter()
    pack = make_pack(method, model, tokenizer, [Edit(*EDIT)], progress=False)
    seconds = time.perf_counter() - start
    time.sleep(0.05)  # one more sample after the edit
    peaks = sampler.peaks
    save_file({k: v.contiguous() for k, v in pack.tensors.items()}, str(out / "pack.safetensors"))
    (out / "memory.json").write_text(json.dumps({"weights_bytes": weights, "baseline": baseline, "peaks": peaks,
                                                 "edit_seconds": seconds,
                                                 "fingerprint": pack.base_model["fingerprint"]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
        return
    p = arguments(__doc__, out=None)
    p.add_argument("--methods", default="rome,baft,sake")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import load_file

    from hf_kedit import Edit
    from hf_kedit.methods import make_pack
    from hf_kedit.models import load_model

    model, tokenizer = load_model(args.model)
    methods = args.methods.split(",")
    for method in methods:  # statistics, templates and any other once-per-model work, as a second edit finds them
        make_pack(method, model, tokenizer, [Edit(*EDIT)], progress=False)
    del model
    rows, results = [], {}
    for method in methods:
        for placement in ("on the CPU", "half on disk"):
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([sys.executable, __file__, "--child", method, placement, tmp], check=True)
                figures = json.loads((Path(tmp) / "memory.json").read_text())
                figures["tensors"] = load_file(str(Path(tmp) / "pack.safetensors"))
            results[(method, placement)] = figures
        plain, disk = results[(method, "on the CPU")], results[(method, "half on disk")]
        diff = max((disk["tensors"][k] - v).abs().max().item() for k, v in plain["tensors"].items())
        same = sorted(plain["tensors"]) == sorted(disk["tensors"]) and plain["fingerprint"] == disk["fingerprint"]
        weights = plain["weights_bytes"]
        for placement, f in (("on the CPU", plain), ("half on disk", disk)):
            base, peaks = f["baseline"], f["peaks"]
            rows.append({"method": method, "placement": placement, "edit_seconds": f["edit_seconds"],
                         "peak_mb": peaks["VmHWM"] / 2 ** 20, "baseline_mb": base["VmHWM"] / 2 ** 20,
                         "peak_over_weights": (peaks["VmHWM"] - base["VmHWM"]) / weights,
                         "anonymous_over_weights": (peaks["RssAnon"] - base["RssAnon"]) / weights,
                         "file_backed_over_weights": (peaks["RssFile"] - base["RssFile"]) / weights,
                         "same_pack": same, "max_abs_difference": diff})
    lines = ["| method | placement | s per edit | peak RSS (MB) | (peak − baseline) / weights "
             "| anonymous memory added / weights | file-backed pages added / weights "
             "| same pack as on the CPU (largest difference) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['placement']} | {r['edit_seconds']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['peak_over_weights']:.2f} | {r['anonymous_over_weights']:.2f} | "
                     f"{r['file_backed_over_weights']:.2f} | "
                     + ("–" if r["placement"] == "on the CPU" else
                        f"{'yes' if r['same_pack'] else 'no'} ({r['max_abs_difference']:.1e})") + " |")
    table = "\n".join(lines) + (f"\n\nThe model's weights: {weights / 2 ** 20:.0f} MB (float32); the process's "
                                f"baseline before loading: {rows[0]['baseline_mb']:.0f} MB; torch "
                                f"{torch.__version__}. One edit per process; peak: VmHWM; anonymous and "
                                f"file-backed: the largest RssAnon and RssFile sampled every 10 ms, above "
                                f"the baseline's.\n")
    write_results(out, table, {"rows": rows, "weights_bytes": weights})


if __name__ == "__main__":
    main()
