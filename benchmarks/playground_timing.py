"""How long `kedit playground` takes to start, and an edit made on its page
against the same edit through `kedit edit`, on --model (the default model
unless told), driven in Debian's Chromium by Playwright.

- start: from launching `kedit playground` to its page answering HTTP, --starts
  times after one start not counted (the first run converts the default model
  once per machine; its time is reported apart);
- the edit: the demo's fact (Danielle Darrieux's mother tongue, French -> English)
  with --method and its default settings. On the page: from the click on "Make
  pack" to the pack made and attached, and to the answers redrawn. Through
  `kedit edit` (one CounterFact-format case of the same fact): the whole command.
  Page and command alternate (A B A B), --edits pairs, after one of each not
  counted (it fills the key-statistics cache both read).

Prints a Markdown table; writes results.json, results.md, playground.png (the
page after an edit) and progress.png (the page while the pack is made) into --out.

    python benchmarks/playground_timing.py --starts 3 --edits 3 --out docs/bench/playground
"""
from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hf_kedit.demo import DEMO_EDIT

from bench_setup import arguments, write_results

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def start_server(model: str, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    """`kedit playground` serving on `port`, and the seconds until its page answered."""
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "hf_kedit.cli", "playground", "--model", model, "--port",
                               str(port)], stdout=log.open("a"), stderr=subprocess.STDOUT)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server, time.perf_counter() - began
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"kedit playground exited; see {log}")
            time.sleep(0.1)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_case_file(folder: Path) -> Path:
    """The demo's fact as a one-record CounterFact file, for `kedit edit`."""
    record = {"case_id": 0, "requested_rewrite": {
        "prompt": DEMO_EDIT.prompt, "subject": DEMO_EDIT.subject,
        "target_new": {"str": DEMO_EDIT.target_new}, "target_true": {"str": DEMO_EDIT.target_true}},
        "paraphrase_prompts": [], "neighborhood_prompts": [], "generation_prompts": []}
    path = folder / "darrieux.json"
    path.write_text(json.dumps([record]))
    return path


def command_edit(model: str, method: str, data: Path, out: Path) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hf_kedit.cli", "edit", "--method", method, "--model", model, "--data",
                    f"counterfact:{data}", "--out", str(out), "--overwrite"], check=True, capture_output=True)
    return time.perf_counter() - began


def page_edit(page, method: str, shot: Path | None = None) -> tuple[float, float]:
    """(seconds to the pack attached, seconds to the answers redrawn) for one edit
    made on the page; the pack is forgotten afterwards. With `shot`, a screenshot
    of the page while the pack is made."""
    from playwright.sync_api import expect

    edited = page.locator("#answers tbody tr").first.locator("td").nth(2)
    base = page.locator("#answers tbody tr").first.locator("td").nth(1).inner_text()
    expect(edited).to_have_text(base)
    page.locator("#method input").click()
    page.get_by_role("option", name=method, exact=True).click()
    began = time.perf_counter()
    page.locator("#make").click()
    if shot:
        page.wait_for_timeout(1500)
        page.screenshot(path=shot, full_page=True)
    expect(page.locator("#status")).to_contain_text("Made and attached pack", timeout=600_000)
    made = time.perf_counter() - began
    expect(edited).not_to_have_text(base, timeout=600_000)
    shown = time.perf_counter() - began
    return made, shown


def forget(page) -> None:
    from playwright.sync_api import expect

    page.locator("#forget").click()
    expect(page.locator("#status")).to_contain_text("Forgot pack", timeout=60_000)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    from playwright.sync_api import sync_playwright

    p = arguments(__doc__, out=None)
    p.add_argument("--method", default="rome")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--edits", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kedit-playground-bench-"))
    log = work / "playground.log"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium: apt-get install chromium")

    starts = []
    for run in range(args.starts + 1):
        server, seconds = start_server(args.model, free_port(), log)
        starts.append(seconds)
        stop(server)
        print(f"start {run}: {seconds:.1f} s" + (" (not counted)" if run == 0 else ""))

    data = one_case_file(work)
    port = free_port()
    server, _ = start_server(args.model, port, log)
    pairs = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#answers tbody tr", timeout=120_000)
            for run in range(args.edits + 1):
                made, shown = page_edit(page, args.method, shot=out / "progress.png" if run == 0 else None)
                if run == args.edits:
                    page.screenshot(path=out / "playground.png", full_page=True)
                forget(page)
                command = command_edit(args.model, args.method, data, work / "pack")
                pairs.append({"page_made": made, "page_shown": shown, "command": command})
                print(f"edit {run}: page {made:.1f} s to the pack, {shown:.1f} s to the answers; kedit edit "
                      f"{command:.1f} s" + (" (not counted)" if run == 0 else ""))
            browser.close()
    finally:
        stop(server)
    counted = pairs[1:]
    results = {"model": args.model, "method": args.method, "first_start_s": starts[0],
               "start_s": summary(starts[1:]),
               "page_made_s": summary([r["page_made"] for r in counted]),
               "page_shown_s": summary([r["page_shown"] for r in counted]),
               "command_s": summary([r["command"] for r in counted]),
               "page_over_command": summary([r["page_shown"] / r["command"] for r in counted]),
               "pairs": pairs}

    def cell(key):
        s = results[key]
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    table = "\n".join([
        f"| {args.model}, {args.method} | median (min-max) |", "|---|---|",
        f"| `kedit playground` start, first | {starts[0]:.1f} s |",
        f"| `kedit playground` start, later ({args.starts} runs) | {cell('start_s')} s |",
        f"| page: click to pack attached ({args.edits} runs) | {cell('page_made_s')} s |",
        f"| page: click to answers shown | {cell('page_shown_s')} s |",
        f"| `kedit edit`, the whole command | {cell('command_s')} s |",
        f"| page (answers shown) / `kedit edit`, pair by pair | {cell('page_over_command')} |"])
    write_results(out, table, results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
