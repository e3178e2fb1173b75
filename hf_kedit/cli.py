"""The `kedit` command line."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kedit", description="Knowledge edits as shareable adapter packs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="edit a fact on the default model, save, reload, remove")
    _model_options(p)
    p.add_argument("--out", default="demo-pack", help="where to save the pack")
    p.add_argument("--overwrite", action="store_true", help="replace a pack already in --out")

    p = sub.add_parser("info", help="what a pack holds")
    p.add_argument("pack", help="a local folder or a Hub repo id")
    p.add_argument("--revision")

    p = sub.add_parser("push", help="upload a pack folder to the Hub")
    p.add_argument("pack")
    p.add_argument("repo_id")
    p.add_argument("--branch")
    p.add_argument("--private", action="store_true")

    p = sub.add_parser("push-stats", help="upload a model's key statistics (ROME, MEMIT) to the Hub for reuse")
    p.add_argument("repo_id")
    _model_options(p)
    p.add_argument("--layers", required=True, type=_layer_list, help="comma-separated layer indices, e.g. 4,5,6")
    p.add_argument("--tokens", type=int, default=20_000, help="how many tokens the statistics read")
    p.add_argument("--corpus", default=None, help="a text file (paragraphs); default: text the model samples")
    p.add_argument("--branch")
    p.add_argument("--private", action="store_true")

    p = sub.add_parser("train-mend", help="train a MEND editor for a model on a data file of edits (once per model)")
    _model_and_data(p)
    p.add_argument("--held-out", action="append", default=[], metavar="FORMAT:PATH",
                   help="cases to evaluate on later: training edits of their subjects are left out (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting")
    p.add_argument("--out", default=None, help="also write the editor into this folder")
    p.add_argument("--push", default=None, metavar="REPO_ID", help="also push the editor to this Hub repo")

    p = sub.add_parser("pull", help="download a pack from the Hub into a folder")
    p.add_argument("repo_id")
    p.add_argument("dir")
    p.add_argument("--revision")

    p = sub.add_parser("export-peft", help="write a weight_delta pack as a PEFT LoRA adapter folder")
    p.add_argument("pack")
    p.add_argument("dir")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in dir")
    _compaction(p)

    p = sub.add_parser("export-gguf", help="write a pack as the llama.cpp file that serves it (a LoRA adapter, or a "
                       "control vector for a uniform steering pack)")
    p.add_argument("pack")
    p.add_argument("out", help="the file to write, e.g. edits.gguf")
    p.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    _compaction(p)

    p = sub.add_parser("edit", help="make one pack for the cases of a data file")
    p.add_argument("--method", required=True)
    _model_and_data(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting")
    p.add_argument("--out", required=True, help="the pack folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a pack already in --out")
    p.add_argument("--on", action="append", default=[], metavar="PACK",
                   help="a pack to make the new one on, attached first: an earlier batch of a sequence (repeatable)")
    p.add_argument("--history", default=None, metavar="FILE",
                   help="the sequence's history (alphaedit, ultraedit, baft with shared_bases): read if the file "
                        "exists, started if not, and written back with this batch's edits once the pack is written")

    p = sub.add_parser("eval", help="score a model, with packs or a method, on a data file")
    _model_and_data(p)
    p.add_argument("--pack", action="append", default=[], help="a pack to attach (repeatable)")
    p.add_argument("--method", default=None, help="a method to edit with, or a baseline (unedited, icl)")
    p.add_argument("--mode", default="single", help="single, batch or sequential")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method setting")
    p.add_argument("--metrics", default=None, help="comma-separated subset of the metrics")
    _sequence(p)
    p.add_argument("--out", required=True, help="the JSON file to write")

    p = sub.add_parser("bench", help="several methods side by side on the same cases")
    _model_and_data(p)
    p.add_argument("--methods", required=True,
                   help="comma-separated, e.g. unedited,icl,lora; NAME@VARIANT runs NAME with the settings "
                        "--set NAME@VARIANT.KEY=VALUE, to compare settings side by side")
    p.add_argument("--modes", default="single", help="comma-separated modes for methods that make packs")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method setting")
    p.add_argument("--metrics", default=None, help="comma-separated subset of the metrics")
    _sequence(p)
    p.add_argument("--out", required=True, help="the folder to write results.json, results.md and plots into")
    p.add_argument("--resume", action="store_true", help="keep the results --out already holds for the same "
                   "cases and settings (a run cut short) and run only the methods it lacks; a sequential "
                   "run goes on from the last pack it kept in --out/state")
    p.add_argument("--processes", type=int, default=1, help="split the cases across this many processes "
                   "(accelerate launch; single mode), one results.json as from one process")

    p = sub.add_parser("trace", help="causal tracing of a fact: where the model reads it (heatmap PNG)")
    _model_options(p)
    p.add_argument("--prompt", required=True, help="the fact's prompt, e.g. 'The mother tongue of Danielle Darrieux is'")
    p.add_argument("--subject", required=True)
    p.add_argument("--kind", default="hidden", help="hidden (restore hidden states) or mlp (MLP outputs)")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--out", default="trace.png")

    p = sub.add_parser("playground", help="a page in the browser: make an edit, compare answers, switch packs")
    _model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from .errors import KeditError

    try:
        return COMMANDS[args.command](args)
    except (KeditError, OSError, ValueError) as e:  # OSError: missing files, a port in use, the Hub
        print(f"kedit {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(args.out, args.model, overwrite=args.overwrite, device_map=args.device_map,
                         offload_folder=args.offload_folder) else 1


def _info(args) -> int:
    from .pack import EditPack

    pack = EditPack.from_pretrained(args.pack, revision=args.revision)
    base = pack.base_model
    print(f"pack:        {args.pack}" + (f" @ {pack.revision}" if pack.revision else ""))
    print(f"kind:        {pack.kind}")
    print(f"method:      {pack.method} {pack.hyperparameters}")
    print(f"base model:  {base.get('name_or_path')} ({base.get('model_type')}, {base.get('num_hidden_layers')} "
          f"layers, hidden {base.get('hidden_size')}); fingerprints {len(base.get('fingerprint', {}))} module(s)")
    print(f"tensors:     {len(pack.tensors)}, {pack.nbytes} bytes")
    print(f"edits:       {len(pack.edits)}")
    for e in pack.edits:
        print(f"  {e.id}: {e.text} {e.target_true or '?'} -> {e.target_new}")
    return 0


def _push(args) -> int:
    from .pack import EditPack

    sha = EditPack.from_pretrained(args.pack).push_to_hub(args.repo_id, branch=args.branch, private=args.private)
    print(f"pushed {args.pack} to {args.repo_id} at commit {sha}")
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated layer indices, e.g. 4,5,6") from None


def _push_stats(args) -> int:
    from .methods.locate.stats import push_stats

    model, tokenizer = _loaded(args)
    sha = push_stats(model, tokenizer, args.layers, args.repo_id, corpus=args.corpus, n_tokens=args.tokens,
                     branch=args.branch, private=args.private)
    corpus = f" --set stats_corpus={args.corpus}" if args.corpus else ""
    print(f"pushed the key statistics of layers {args.layers} to {args.repo_id} at commit {sha}; edit with "
          f"--set stats_source={args.repo_id} --set stats_tokens={args.tokens}{corpus}")
    return 0


def _train_mend(args) -> int:
    from .evaluate.cases import training_edits
    from .evaluate.datasets import read_cases
    from .methods.learned.mend import MENDTrainingConfig, train_mend
    from .methods.learned.store import cached_editor_dir, push_editor

    held_out = [c for spec in args.held_out for c in read_cases(*_format_and_path(spec))]
    examples = training_edits(_cases(args), held_out)
    model, tokenizer = _loaded(args)
    config = MENDTrainingConfig(**parse_settings(args.set))
    editor = train_mend(model, tokenizer, examples, config, data_name=args.data)
    folder = cached_editor_dir(model, editor.targets)
    print(f"trained a MEND editor on {len(examples) - config.val_edits} edits, validated on {config.val_edits} "
          f"({len(held_out)} held-out cases' subjects left out); cached in {folder}")
    if args.out:
        shutil.copytree(folder, args.out, dirs_exist_ok=True)
        print(f"copied it to {args.out}")
    if args.push:
        print(f"pushed it to {args.push} at commit {push_editor(folder, args.push)}; edit with "
              f"--set editor_source={args.push}")
    return 0


def _pull(args) -> int:
    from .pack.hub import pull_folder
    from .pack import PACK_FILES, read_pack

    folder = pull_folder(args.repo_id, args.dir, revision=args.revision, allow_patterns=list(PACK_FILES))
    read_pack(folder)  # the files arrived whole and valid
    print(f"pulled {args.repo_id} into {folder}")
    return 0


def _compaction(p) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rank", type=int, help="compact each weight's change to this rank (truncated SVD)")
    group.add_argument("--share", type=float, help="compact each weight's change to the rank that keeps this "
                       "share of its squared norm, e.g. 0.99")


def _export_gguf(args) -> int:
    from .pack import EditPack

    pack = EditPack.from_pretrained(args.pack)
    out = pack.export_gguf(args.out, overwrite=args.overwrite, rank=args.rank, share=args.share)
    if pack.kind == "weight_delta":
        print(f"wrote a llama.cpp LoRA adapter to {out} (llama-cli -m BASE.gguf --lora {out})")
    else:
        print(f"wrote a llama.cpp control vector to {out} (llama-cli -m BASE.gguf --control-vector {out})")
    return 0


def _export_peft(args) -> int:
    from .pack import EditPack

    out = EditPack.from_pretrained(args.pack).export_peft(args.dir, overwrite=args.overwrite, rank=args.rank,
                                                          share=args.share)
    print(f"wrote a PEFT LoRA adapter to {out}")
    return 0


def _model_options(p) -> None:
    p.add_argument("--model", default="default", help='"default", a local folder or a Hub id')
    p.add_argument("--device-map", default=None, type=_device_map,
                   help='where the layers go, as transformers\' from_pretrained takes it: "auto", "balanced", '
                        '"sequential", a device ("cpu", "cuda:0"), or a JSON object of module name -> device '
                        '("disk" offloads to --offload-folder)')
    p.add_argument("--offload-folder", default=None, help="where layers the device map puts on disk are kept")


def _device_map(text: str):
    if not text.lstrip().startswith("{"):
        return text
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--device-map {text!r} is not valid JSON: {e}") from None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"--device-map {text!r}: give a JSON object of module name -> device")
    return mapping


def _loaded(args):
    """(model, tokenizer) as the command's --model, --device-map and --offload-folder say."""
    from .models import load_model

    return load_model(args.model, device_map=args.device_map, offload_folder=args.offload_folder)


def _model_and_data(p) -> None:
    _model_options(p)
    p.add_argument("--data", required=True, metavar="FORMAT:PATH",
                   help="counterfact, zsre, ripple, mquake, knowedit or easyedit, and a file")
    p.add_argument("--limit", type=int, default=None, help="the first N records (after --skip)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N records (e.g. held apart for tuning)")


def _sequence(p) -> None:
    p.add_argument("--batch-size", type=int, default=1, help="sequential mode: cases per pack")
    p.add_argument("--checkpoints", default="", help="sequential mode: comma-separated numbers of edits at which "
                   "to score, besides the end (e.g. 100,1000)")
    p.add_argument("--sample", type=int, default=None, help="sequential mode: score at most this many of the cases "
                   "edited so far at each checkpoint (a fixed random sample)")


def _cases(args):
    from .evaluate.datasets import read_cases

    fmt, path = _format_and_path(args.data)
    return read_cases(fmt, path, limit=None if args.limit is None else args.skip + args.limit)[args.skip:]


def _format_and_path(spec: str) -> tuple[str, str]:
    fmt, sep, path = spec.partition(":")
    if not sep:
        raise ValueError(f"{spec!r}: write FORMAT:PATH, e.g. counterfact:data/counterfact.json")
    return fmt, path


def parse_settings(pairs: list[str]) -> dict:
    """KEY=VALUE strings as a dict; values are read as JSON where they parse (numbers, true, lists)."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: write KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def _config(args):
    from .evaluate.harness import METRICS, EvalConfig

    return EvalConfig(metrics=tuple(args.metrics.split(",")) if args.metrics else METRICS,
                      pack_cases=args.batch_size, checkpoints=tuple(int(c) for c in args.checkpoints.split(",") if c),
                      checkpoint_sample=args.sample)


def _edit(args) -> int:
    from .attach import load_edits
    from .errors import EditRequestError
    from .methods import HISTORIES, make_pack, new_history
    from .pack.format import PACK_FILES, refuse_overwrite

    refuse_overwrite(Path(args.out), PACK_FILES, args.overwrite)  # before the edit, not after it
    history = None
    if args.history is not None:
        if args.method not in HISTORIES:
            raise EditRequestError(f"{args.method} keeps no history between batches (those that do: "
                                   f"{sorted(HISTORIES)}); leave out --history")
        path = Path(args.history)
        history = HISTORIES[args.method].load(path) if path.exists() else new_history(args.method)
    cases = _cases(args)
    model, tokenizer = _loaded(args)
    for earlier in args.on:
        load_edits(model, earlier, name=earlier, tokenizer=tokenizer)
    pack = make_pack(args.method, model, tokenizer, [e for c in cases for e in c.edits], parse_settings(args.set),
                     history=history)
    pack.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {len(pack.edits)} {args.method} edits to {args.out}")
    if history is not None:
        # written whole or not at all: a history cut short would continue the sequence wrongly
        partial = path.with_name(path.name + ".partial")
        history.save(partial)
        os.replace(partial, path)
        print(f"history of {history.n_edits} edits in {path}")
    return 0


def _eval(args) -> int:
    from .attach import load_edits
    from .evaluate.harness import evaluate, locality_references
    from .evaluate.report import markdown_table

    if args.pack and args.method:
        raise ValueError("give --pack or --method, not both")
    cases, config = _cases(args), _config(args)
    model, tokenizer = _loaded(args)
    references = locality_references(model, tokenizer, cases, config)  # before any pack changes the model
    for pack in args.pack:
        load_edits(model, pack, tokenizer=tokenizer)
    result = evaluate(model, tokenizer, cases, args.method or "unedited", args.mode, parse_settings(args.set), config,
                      references, args.model)
    if args.pack:
        result["method"], result["packs"] = "packs", args.pack
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table([result]))
    return 0


def _bench(args) -> int:
    from .evaluate.bench import run_bench
    from .evaluate.harness import known_methods

    methods = args.methods.split(",")
    unknown = [m for m in methods if m.partition("@")[0] not in known_methods()]
    if unknown:
        raise ValueError(f"unknown method {unknown}: choose from {known_methods()}")
    settings = {}
    for key, value in parse_settings(args.set).items():
        method, sep, name = key.partition(".")
        if not sep:
            raise ValueError(f"--set {key}=...: write METHOD.KEY=VALUE, e.g. lora.rank=2")
        settings.setdefault(method, {})[name] = value
    if args.processes > 1:
        return subprocess.run(launch_command(args.argv, args.processes)).returncode
    cases, config = _cases(args), _config(args)
    model, tokenizer = _loaded(args)
    run_bench(model, tokenizer, cases, methods, args.modes.split(","), settings, config, args.out, args.model,
              resume=args.resume)
    return 0


def launch_command(argv: list[str], processes: int) -> list[str]:
    """`accelerate launch` of this command line in `processes` processes, without
    its --processes (each launched process runs its share)."""
    import torch

    own, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            own.append(arg)
    # --multi_gpu is accelerate's launcher of several local processes, on GPUs or, without them, on the CPU.
    threads = [] if torch.cuda.is_available() else ["--num_cpu_threads_per_process",
                                                    str(max(1, (os.cpu_count() or 1) // processes))]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *threads,
            "-m", "hf_kedit.cli", *own]


def _playground(args) -> int:
    from .playground import launch

    launch(args.model, host=args.host, port=args.port, device_map=args.device_map,
           offload_folder=args.offload_folder)
    return 0


def _trace(args) -> int:
    from .trace import trace

    model, tokenizer = _loaded(args)
    result = trace(model, tokenizer, args.prompt, args.subject, kind=args.kind, samples=args.samples)
    result.plot(args.out)
    print(f"answer {result.answer!r}: p = {result.clean:.3f} clean, {result.corrupted:.3f} with the subject "
          f"corrupted; restoring the subject's last token recovers most at layer {result.best_layer()}; "
          f"heatmap: {args.out}")
    return 0


COMMANDS = {"demo": _demo, "trace": _trace, "info": _info, "push": _push, "push-stats": _push_stats, "pull": _pull,
            "train-mend": _train_mend,
            "export-peft": _export_peft, "export-gguf": _export_gguf, "edit": _edit, "eval": _eval, "bench": _bench,
            "playground": _playground}

if __name__ == "__main__":
    sys.exit(main())
