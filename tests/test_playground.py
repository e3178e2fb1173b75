"""The playground: its session on a tiny random model with the default model's
tokenizer, then the page itself in a real browser (Debian's Chromium driven by
Playwright), served by `kedit playground` in another process."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from hf_kedit import stack_of
from hf_kedit.cli import main as kedit
from hf_kedit.errors import EditConflictError, EditRequestError, IncompatiblePackError, KeditError, PackFormatError
from hf_kedit.methods import LoRAConfig, make_pack
from hf_kedit.pack import CONFIG_NAME, Edit
from hf_kedit.playground.app import settings_text
from hf_kedit.playground.session import Playground, default_settings, parse_settings_json
from test_bad_input import raises_exactly, untouched
from tiny_models import tiny_inputs, tiny_llama_for

PROMPT = "The mother tongue of {} is"
EDIT_PROMPT = PROMPT.format("Danielle Darrieux")
OTHER = "The mother tongue of Jacques Chirac is"
LORA = {"steps": 60, "layer": 1}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As root on a closed network: no sandbox, and none of Chromium's background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def tiny_lm(tokenizer):
    return tiny_llama_for(tokenizer, hidden_size=64)  # wide enough for LoRA to move the greedy answer


@pytest.fixture
def session(tokenizer, one_thread):
    return Playground(tiny_lm(tokenizer), tokenizer)


def logits(model):
    with torch.no_grad():
        return model(tiny_inputs()).logits


def make(session, target="English", **kw):
    return session.make("lora", "Danielle Darrieux", PROMPT, target, "French", LORA, progress=False, **kw)


def test_an_edit_changes_the_edited_column_only_and_switching_it_off_restores_the_base(session):
    base = logits(session.model)
    first = session.answers([EDIT_PROMPT, OTHER], "English")
    assert [a.base for a in first] == [a.edited for a in first]
    name = make(session)
    assert name == "lora-1" and session.attached() == ["lora-1"] and list(session.packs) == ["lora-1"]
    edited = session.answers([EDIT_PROMPT, OTHER], "English")
    assert [a.base for a in edited] == [a.base for a in first]  # the base column never moves
    assert edited[0].edited != edited[0].base and edited[0].edited_p > 2 * edited[0].base_p
    session.switch(name, False)
    assert session.attached() == [] and list(session.packs) == ["lora-1"]  # held, not attached
    assert torch.equal(logits(session.model), base)
    assert [a.edited for a in session.answers([EDIT_PROMPT], "English")] == [first[0].base]
    session.switch(name, True)
    assert session.answers([EDIT_PROMPT], "English")[0].edited == edited[0].edited


def test_disable_all_shows_the_base_model_in_both_columns_and_keeps_the_packs(session):
    make(session)
    session.all_disabled = True
    answer = session.answers([EDIT_PROMPT], "English")[0]
    assert (answer.edited, answer.edited_p) == (answer.base, answer.base_p)
    assert session.attached() == ["lora-1"]
    session.all_disabled = False
    assert session.answers([EDIT_PROMPT], "English")[0].edited != answer.base


def test_each_pack_is_made_on_the_base_model_whatever_is_attached(session, tokenizer):
    make(session)
    second = session.make("lora", "Jacques Chirac", PROMPT, "German", None, LORA, progress=False)
    fresh = Playground(tiny_lm(tokenizer), tokenizer)
    fresh._count = 1  # the same edit id, so the packs compare tensor by tensor
    fresh.make("lora", "Jacques Chirac", PROMPT, "German", None, LORA, progress=False)
    ours, theirs = session.packs[second].tensors, fresh.packs["lora-2"].tensors
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_removing_edits_one_by_one_then_the_pack_is_gone_and_the_model_exact(session, tokenizer, tmp_path):
    base = logits(session.model)
    edits = [Edit("a", "Danielle Darrieux", PROMPT, "English"), Edit("b", "Jacques Chirac", PROMPT, "German")]
    make_pack("lora", session.model, tokenizer, edits, LORA, progress=False).save_pretrained(tmp_path / "two")
    name = session.load(str(tmp_path / "two"))
    assert name == str(tmp_path / "two") and [e.id for e in session.packs[name].edits] == ["a", "b"]
    with raises_exactly(KeditError, "held already"), untouched(session.model):
        session.load(str(tmp_path / "two"))
    session.remove_edit(name, "a")
    assert [e.id for e in session.packs[name].edits] == ["b"]
    assert [e.id for _, e in stack_of(session.model).edits()] == ["b"]
    session.switch(name, False)
    session.remove_edit(name, "b")  # detached: the held pack is cut, and with no edit left, let go
    assert session.packs == {} and session.attached() == []
    assert torch.equal(logits(session.model), base)


def test_the_newest_edit_of_a_fact_wins_only_when_asked(session):
    make(session)
    with raises_exactly(EditConflictError, "conflicting edits"), untouched(session.model):
        make(session, "German")
    assert list(session.packs) == ["lora-1"]
    with pytest.warns(UserWarning, match="newest edit wins"):
        name = make(session, "German", newest_wins=True)
    assert list(session.packs) == [name] and session.attached() == [name]  # lora-1 held only that edit


def _bad_folders(tmp_path, tokenizer, model):
    good = tmp_path / "good"
    make_pack("lora", model, tokenizer, [Edit("a", "Danielle Darrieux", PROMPT, "English")], LORA,
              progress=False).save_pretrained(good)
    broken_json = shutil.copytree(good, tmp_path / "broken-json")
    (broken_json / CONFIG_NAME).write_text('{"format_version": 1, "kind": ')
    no_weights = shutil.copytree(good, tmp_path / "no-weights")
    (no_weights / "kedit_model.safetensors").unlink()
    other_model = tmp_path / "other-model"
    smaller = tiny_llama_for(tokenizer, hidden_size=32)
    make_pack("lora", smaller, tokenizer, [Edit("a", "Danielle Darrieux", PROMPT, "English")], LORA,
              progress=False).save_pretrained(other_model)
    return {"broken-json": (PackFormatError, "kedit_config.json"), "no-weights": (PackFormatError, "missing"),
            "other-model": (IncompatiblePackError, "the pack expects"), "nowhere": (FileNotFoundError, "nowhere")}


def test_every_bad_input_is_a_typed_error_that_leaves_model_and_packs_as_they_were(session, tokenizer, tmp_path):
    make(session)
    session.switch("lora-1", False)
    make(session, "German")  # one held pack off, one on: neither may move
    held = {n: [e.id for e in p.edits] for n, p in session.packs.items()}
    for folder, (error, match) in _bad_folders(tmp_path, tokenizer, session.model).items():
        with raises_exactly(error, match), untouched(session.model):
            session.load(str(tmp_path / folder))
    calls = [
        (lambda: session.make("lora2", "Danielle Darrieux", PROMPT, "English"), EditRequestError, "unknown method"),
        (lambda: session.make("lora", "Danielle Darrieux", PROMPT, "English", settings={"ranks": 2}),
         EditRequestError, "no setting"),
        (lambda: session.make("lora", "Danielle Darrieux", PROMPT, " "), EditRequestError, "target_new"),
        (lambda: session.make("rome", "Danielle Darrieux", "no slot here", "English"), EditRequestError, "{}"),
        (lambda: session.load(" "), KeditError, "give a pack folder"),
        (lambda: session.load(str(session.save("lora-2", str(tmp_path / "copy")))), KeditError, "attached already"),
        (lambda: session.switch("nope", True), KeyError, "no pack named"),
        (lambda: session.switch("lora-1", True), EditConflictError, "conflicting edits"),
        (lambda: session.remove_edit("lora-1", "e9"), KeyError, "no edit"),
        (lambda: session.save("lora-1", str(tmp_path / "no-weights")), FileExistsError, "overwrite"),
        (lambda: session.answers([EDIT_PROMPT], ""), EditRequestError, "new target"),
        (lambda: session.trace(PROMPT, "Danielle Darrieux", kind="attention"), KeditError, "trace one of"),
    ]
    for call, error, match in calls:
        with raises_exactly(error, match), untouched(session.model):
            call()
        assert {n: [e.id for e in p.edits] for n, p in session.packs.items()} == held
    assert session.attached() == ["lora-2"]


def test_a_pack_pushed_from_the_session_loads_back_from_the_hub_at_its_commit(session, hub_server):
    make(session)
    edited = session.answers([EDIT_PROMPT], "English")[0].edited
    sha = session.push("lora-1", "me/playground-darrieux")
    session.forget("lora-1")
    assert session.packs == {} and session.answers([EDIT_PROMPT], "English")[0].edited != edited
    name = session.load("me/playground-darrieux", sha)
    assert name == f"me/playground-darrieux@{sha}" and session.attached() == [name]
    assert session.answers([EDIT_PROMPT], "English")[0].edited == edited


def test_the_card_and_the_trace(session):
    make(session)
    card = session.card("lora-1")
    assert card.startswith("# Knowledge edits (lora, 1 edit)") and "Danielle Darrieux" in card
    path = session.trace(PROMPT, "Danielle Darrieux", samples=2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_settings_box_shows_every_default_and_reads_json():
    assert default_settings("lora") == {"layer": 0.3, "rank": 1, "steps": 60, "lr": 0.02, "stop_loss": 0.05, "seed": 0,
                                       "joint": False}
    assert default_settings("rome")["context_templates"] == [[5, 5]]  # tuples as JSON writes them
    assert LoRAConfig(**default_settings("lora")) == LoRAConfig()
    assert parse_settings_json("") == {} and parse_settings_json('{"rank": 2}') == {"rank": 2}
    with raises_exactly(EditRequestError, "not JSON"):
        parse_settings_json('{"rank": 2')
    with raises_exactly(EditRequestError, "JSON object"):
        parse_settings_json("[1, 2]")
    with raises_exactly(EditRequestError, "unknown method"):
        default_settings("lora2")


# ----- the page, in a real browser ------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def page_url(tokenizer, tmp_path, hub_server):
    """`kedit playground` on a tiny model, in its own process; its URL."""
    pytest.importorskip("gradio", reason="the playground extra is not installed: pip install 'hf-kedit[playground]'")
    folder = tmp_path / "tiny"
    tiny_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = _free_port()
    log = (tmp_path / "playground.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "hf_kedit.cli", "playground", "--model", str(folder),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("kedit playground did not start:\n" + (tmp_path / "playground.log").read_text())
            time.sleep(0.3)
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the test extra)")
    if CHROMIUM is None:
        pytest.skip("no Chromium here: apt-get install chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_the_page_makes_a_pack_switches_it_saves_loads_pushes_and_shows_errors(page_url, browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(page_url)
    status = page.locator("#status")
    edited = page.locator("#answers tbody tr").first.locator("td").nth(2)  # the edit prompt, with packs
    expect(edited).not_to_be_empty(timeout=60_000)
    base_answer = page.locator("#answers tbody tr").first.locator("td").nth(1).inner_text()
    assert edited.inner_text() == base_answer

    # Another fact than the form's default one: the edit prompt's row follows the form.
    page.locator("#subject textarea").fill("Jacques Chirac")
    page.locator("#target-new textarea").fill("German")
    page.locator("#target-true textarea").fill("French")
    page.locator("#compare").click()
    first = page.locator("#answers tbody tr").first.locator("td")
    expect(first.nth(0)).to_have_text(OTHER, timeout=60_000)
    expect(page.locator("#answers thead")).to_contain_text("p(German)")
    base_answer = first.nth(1).inner_text()
    page.locator("#method input").click()
    page.get_by_role("option", name="lora", exact=True).click()
    settings = page.locator("#settings textarea")
    expect(settings).to_have_value(settings_text("lora"))  # every setting, at its default
    settings.fill(json.dumps(LORA))
    page.locator("#make").click()
    expect(status).to_contain_text("Made and attached pack lora-1", timeout=120_000)
    expect(edited).not_to_have_text(base_answer, timeout=60_000)
    edited_answer = edited.inner_text()
    expect(page.locator("#card")).to_contain_text("Knowledge edits (lora, 1 edit)")

    page.locator("#switches label", has_text="lora-1").click()  # off
    expect(status).to_contain_text("Attached: none")
    expect(edited).to_have_text(base_answer, timeout=60_000)
    page.locator("#switches label", has_text="lora-1").click()  # on again
    expect(edited).to_have_text(edited_answer, timeout=60_000)
    page.locator("#disable-all input").check()
    expect(edited).to_have_text(base_answer, timeout=60_000)
    page.locator("#disable-all input").uncheck()
    expect(edited).to_have_text(edited_answer, timeout=60_000)

    page.locator("#folder textarea").fill(str(tmp_path / "saved"))
    page.locator("#save").click()
    expect(status).to_contain_text("Saved pack lora-1")
    page.locator("#repo-id textarea").fill("me/page-darrieux")
    page.locator("#push").click()
    expect(status).to_contain_text("Pushed pack lora-1 to me/page-darrieux at commit")
    page.locator("#forget").click()
    expect(status).to_contain_text("Forgot pack lora-1")
    expect(edited).to_have_text(base_answer, timeout=60_000)

    page.locator("#source textarea").fill(str(tmp_path / "saved"))
    page.locator("#load").click()
    expect(status).to_contain_text(f"Loaded and attached pack {tmp_path / 'saved'}")
    expect(edited).to_have_text(edited_answer, timeout=60_000)

    bad = shutil.copytree(tmp_path / "saved", tmp_path / "bad")
    (bad / CONFIG_NAME).write_text("{not json")
    page.locator("#source textarea").fill(str(bad))
    page.locator("#load").click()
    expect(status).to_contain_text("PackFormatError")
    assert "Traceback" not in page.content()
    page.locator("#compare").click()
    expect(edited).to_have_text(edited_answer, timeout=60_000)  # the failed load changed nothing
    expect(page.locator("#packs")).to_contain_text(str(tmp_path / "saved"))
    expect(page.locator("#packs")).not_to_contain_text(str(bad))

    page.get_by_text("Causal tracing of the edit prompt").click()
    page.locator("#trace").click()
    expect(status).to_contain_text("Traced the edit prompt", timeout=120_000)
    expect(page.locator("#heatmap img")).to_be_visible()


def test_the_playground_command_without_gradio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert kedit(["playground", "--model", "default"]) == 2
    err = capsys.readouterr().err
    assert "MissingDependencyError" in err and "pip install 'hf-kedit[playground]'" in err


@pytest.mark.default_model
def test_the_docs_example_edits_the_default_model_through_a_session(capsys):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "playground.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    scope = {}
    exec(compile(code, "docs/playground.md", "exec"), scope)
    base, edited = capsys.readouterr().out.split(" p ")[0].split(" -> ")
    assert base.startswith("French") and edited.startswith("English")
    assert scope["session"].attached() == [] and list(scope["session"].packs) == [scope["name"]]


def test_the_playground_command_on_a_port_in_use_says_so(tokenizer, tmp_path, capsys):
    pytest.importorskip("gradio", reason="the playground extra is not installed: pip install 'hf-kedit[playground]'")
    tiny_lm(tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    capsys.readouterr()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert kedit(["playground", "--model", str(tmp_path / "tiny"), "--port", str(port)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert last.startswith("kedit playground: OSError: Cannot find empty port") and str(port) in last
