"""The `kedit` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kedit", description="Knowledge edits as shareable adapter packs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="edit a fact on the default model, save, reload, remove")
    p.add_argument("--model", default="default", help='"default", a local folder or a Hub id')
    p.add_argument("--out", default="demo-pack", help="where to save the pack")

    p = sub.add_parser("info", help="what a pack holds")
    p.add_argument("pack", help="a local folder or a Hub repo id")
    p.add_argument("--revision")

    p = sub.add_parser("push", help="upload a pack folder to the Hub")
    p.add_argument("pack")
    p.add_argument("repo_id")
    p.add_argument("--branch")
    p.add_argument("--private", action="store_true")

    p = sub.add_parser("pull", help="download a pack from the Hub into a folder")
    p.add_argument("repo_id")
    p.add_argument("dir")
    p.add_argument("--revision")

    p = sub.add_parser("export-peft", help="write a weight_delta pack as a PEFT LoRA adapter folder")
    p.add_argument("pack")
    p.add_argument("dir")

    args = parser.parse_args(argv)
    from .errors import KeditError

    try:
        return COMMANDS[args.command](args)
    except (KeditError, FileNotFoundError) as e:
        print(f"kedit {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _demo(args) -> int:
    from .demo import run_demo

    return 0 if run_demo(args.out, args.model) else 1


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


def _pull(args) -> int:
    from .hub import pull_folder
    from .pack import PACK_FILES, read_pack

    folder = pull_folder(args.repo_id, args.dir, revision=args.revision, allow_patterns=list(PACK_FILES))
    read_pack(folder)  # the files arrived whole and valid
    print(f"pulled {args.repo_id} into {folder}")
    return 0


def _export_peft(args) -> int:
    from .pack import EditPack

    out = EditPack.from_pretrained(args.pack).export_peft(args.dir)
    print(f"wrote a PEFT LoRA adapter to {out}")
    return 0


COMMANDS = {"demo": _demo, "info": _info, "push": _push, "pull": _pull, "export-peft": _export_peft}

if __name__ == "__main__":
    sys.exit(main())
