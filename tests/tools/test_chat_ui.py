"""The web chat as a person uses it: ``tools/chat_ui.py`` on a tiny fused model, driven in headless Chromium
(Debian's ``chromium`` + ``chromium-driver`` through selenium; nothing downloads a browser)."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.tools.test_train import env

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="browser tests need Debian's chromium and chromium-driver "
                                                                       "(apt-get install -y chromium chromium-driver; .ci/run does it)")


def ui(*overrides, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "tools" / "chat_ui.py"), *overrides], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fused(tiny_dir, tmp_path_factory):
    """An untrained tiny fused model (Cosmos + last_mlp) and an MLLM-only export, saved to disk."""
    from fusion.model import FusedModel
    from tests.conftest import compose_config

    root = tmp_path_factory.mktemp("chat_ui")
    FusedModel.build(compose_config([f"tiny_dir={tiny_dir}", "stage=align", "generator=tiny_cosmos", "connector=last_mlp"])) \
        .save_pretrained(root / "fused")
    FusedModel.build(compose_config([f"tiny_dir={tiny_dir}", "stage=sft"])).save_pretrained(root / "mllm_only")
    return root


def test_a_missing_or_mllm_only_model_is_refused_before_the_server_starts(fused, tmp_path):
    p = ui(f"model={tmp_path / 'nothing'}", "port=0", f"output_dir={tmp_path}")
    assert p.returncode == 2 and f"{tmp_path / 'nothing'}: no unifuse.json" in p.stderr and "web chat:" not in p.stdout
    p = ui(f"model={fused / 'mllm_only'}", "port=0", f"output_dir={tmp_path}")
    assert p.returncode == 2 and f"{fused / 'mllm_only'}: this fused model has no generator part" in p.stderr
    assert "Traceback" not in p.stderr and "web chat:" not in p.stdout
    p = ui(f"model={fused / 'fused'}", "auth=nocolon", f"output_dir={tmp_path}")
    assert p.returncode == 2 and "auth: expected user:password" in p.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(fused, tmp_path_factory):
    """tools/chat_ui.py on a free loopback port; <|bov|> forced at decode step 1 of every turn (the tiny model never emits it)."""
    out = tmp_path_factory.mktemp("chat_ui_out")
    port = free_port()
    p = subprocess.Popen([sys.executable, str(REPO / "tools" / "chat_ui.py"), f"model={fused / 'fused'}", f"port={port}", f"output_dir={out}",
                          "force_image_at=1", "steps=2", "examples=toy"], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in p.stdout], daemon=True).start()
    log, deadline = [], time.time() + 240
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert p.poll() is None, "".join(log)[-3000:]
            continue
        log.append(line)
        if line.startswith("web chat: "):
            break
    else:
        p.kill()
        pytest.fail("the server did not start: " + "".join(log)[-3000:])
    assert f"http://127.0.0.1:{port}/" in log[-1]
    yield {"url": f"http://127.0.0.1:{port}/", "out": out, "proc": p, "log": log}
    p.terminate()
    p.wait(timeout=30)


def browser(download_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    o = Options()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1700", "--disable-gpu"):
        o.add_argument(a)
    o.add_experimental_option("prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(DRIVER), options=o)
    d.set_page_load_timeout(60)
    return d


class Page:
    """What a person does on the page."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By
        driver.get(url)
        self.wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#message textarea"), 60, "the message box")

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = cond()
            if got:
                return got
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; status: {self.status()!r}")

    def status(self) -> str:
        el = self.d.find_elements(self.By.ID, "status")
        return el[0].text if el else ""

    def clear_box(self) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.d.find_element(self.By.CSS_SELECTOR, "#message textarea")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        self.wait_for(lambda: box.get_attribute("value") == "", 10, "an empty message box")

    def set_text(self, text: str) -> None:
        box = self.d.find_element(self.By.CSS_SELECTOR, "#message textarea")
        self.d.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
                              box, text)

    def attach(self, path: Path) -> None:
        before = len(self.d.find_elements(self.By.CSS_SELECTOR, "#message .thumbnail-item, #message .thumbnail-image"))
        field = self.d.find_element(self.By.CSS_SELECTOR, "#message input[type=file]")
        self.d.execute_script("arguments[0].value = '';", field)  # chromedriver adds to a multiple input's earlier picks; a person's pick replaces them
        field.send_keys(str(path))
        self.wait_for(lambda: len(self.d.find_elements(self.By.CSS_SELECTOR, "#message .thumbnail-item, #message .thumbnail-image")) > before,
                      30, f"the upload of {path.name}")

    def send(self, text: str, done: str, timeout: float = 120) -> str:
        if len(text) > 200:  # a very long message: pasted, not typed key by key; its last character typed
            self.set_text(text[:-1])
            text = text[-1]
        self.d.find_element(self.By.CSS_SELECTOR, "#message textarea").send_keys(text)
        before = self.status()
        self.d.find_element(self.By.CSS_SELECTOR, "#message button.submit-button").click()
        return self.wait_for(lambda: (s := self.status()) != before and done in s and s, timeout, f"status containing {done!r}")

    def rows(self, who: str) -> list:
        return self.d.find_elements(self.By.CSS_SELECTOR, f"#history .message-row.{who}-row")

    def images(self) -> list:
        return self.d.find_elements(self.By.CSS_SELECTOR, "#history img")


@needs_browser
def test_chat_in_a_browser_two_turns_upload_download_and_isolation(server, tmp_path):
    dl = tmp_path / "downloads"
    dl.mkdir()
    d = browser(dl)
    try:
        page = Page(d, server["url"])
        t0 = time.time()
        status = page.send("Draw a red circle at the top left.", "turn 1 done")
        first_image_s = time.time() - t0
        assert "1 image(s) drawn" in status
        assert len(page.images()) == 1 and len(page.rows("user")) == 1
        upload = tmp_path / "mine.png"
        Image.new("RGB", (48, 40), (20, 160, 40)).save(upload)
        page.attach(upload)
        assert "2 image(s)" not in page.send("Make the circle blue.", "turn 2 done")
        user_text = [r.text for r in page.rows("user") if r.text.strip()]
        assert user_text == ["Draw a red circle at the top left.", "Make the circle blue."]  # 2 user turns
        assert len(page.images()) == 3  # drawn, uploaded, drawn: each where it happened
        d.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 10_000
        link = next(a for a in d.find_elements(page.By.CSS_SELECTOR, "#downloads a") if a.get_attribute("download") == "transcript.json")
        link.click()
        got = page.wait_for(lambda: (dl / "transcript.json").is_file() and (dl / "transcript.json").read_text(), 30, "the download")
        segs = json.loads(got)["segments"]
        kinds = [(s["turn"], s["role"], s["kind"]) for s in segs]
        assert [k for k in kinds if k[1] == "user"] == [(1, "user", "text"), (2, "user", "image"), (2, "user", "text")]
        assert [k for k in kinds if k[2] == "image" and k[1] == "assistant"] == [(1, "assistant", "image"), (2, "assistant", "image")]
        assert len(segs) == len(page.rows("user")) + len(page.rows("bot"))  # every segment of the page, and nothing else
        assert {s["path"] for s in segs if s["kind"] == "image"} == {"turn01_assistant_1.png", "turn02_user_1.png", "turn02_assistant_1.png"}
    finally:
        d.quit()

    d2 = browser(dl)  # a second browser: its own session
    try:
        page = Page(d2, server["url"])
        assert page.rows("user") == [] and page.rows("bot") == [] and page.images() == []
        example = next(e for e in d2.find_elements(page.By.CSS_SELECTOR, "button, td, .example")
                       if e.text.strip() == "Draw a red circle at the top left.")
        example.click()  # the toy world's examples row fills the box with one click
        box = d2.find_element(page.By.CSS_SELECTOR, "#message textarea")
        page.wait_for(lambda: box.get_attribute("value") == "Draw a red circle at the top left.", 10, "the example in the box")
        assert len(page.send("", "turn 1 done").strip()) > 0
        assert len(page.rows("user")) == 1  # turn 1 of its own conversation, not turn 3 of the other
    finally:
        d2.quit()
    print(f"first image on the page after {first_image_s:.1f} s (tiny model, steps=2)")


@needs_browser
def test_bad_input_in_the_page_is_one_line_and_the_server_goes_on(server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(cut)
    cut.write_bytes(cut.read_bytes()[:60])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 M pixels in a small file
    d = browser(tmp_path)
    seen = {}
    try:
        page = Page(d, server["url"])
        for path, needle in ((notes, "does not decode"), (empty, "does not decode"), (cut, "does not decode"),
                             (bomb, "10000x10000 = 100,000,000 pixels, above data.max_image_pixels=89,478,485")):
            page.attach(path)
            status = page.send("Edit this.", "error:")
            assert needle in status and path.name in status, status
            seen[path.name] = status
            assert d.find_element(page.By.CSS_SELECTOR, "#message textarea").get_attribute("value") == "Edit this."  # kept to fix
            assert not d.find_elements(page.By.CSS_SELECTOR, "#message .thumbnail-item, #message .thumbnail-image")  # the bad file: off
            page.clear_box()
        seen["blank"] = page.send("   ", "error:")
        assert "the message is empty" in seen["blank"]
        seen["too long"] = page.send("word " * 5000, "error:")
        assert "over mllm.max_length=2048" in seen["too long"]
        assert len(d.find_element(page.By.CSS_SELECTOR, "#message textarea").get_attribute("value")) > 20_000  # kept, to shorten
        page.clear_box()
        assert page.rows("user") == [] and page.images() == []  # nothing bad entered the conversation
        assert "Traceback" not in d.page_source
        status = page.send("Draw a red circle at the top left.", "turn 1 done")  # the server still answers
        assert len(page.images()) == 1 and len(page.rows("user")) == 1
    finally:
        d.quit()
    assert server["proc"].poll() is None
    for k, v in seen.items():
        print(f"{k}: {v}")


def test_a_closed_session_cancels_its_request_and_the_shared_model_serves_the_next(fused, tmp_path):
    """What the page's close does (Gradio deletes the session's state and calls WebSession.close): the running request
    stops at its next sampler step, its model slot is released, another session is answered, histories stay apart."""
    from fusion.chat_ui import ChatApp, WebSession
    from fusion.model import FusedModel

    model = FusedModel.from_pretrained(fused / "fused")
    defaults = {"steps": 2, "guidance": 3.0, "image_guidance": 1.0, "seed": 0, "negative": "auto", "max_images_per_turn": 4,
                "max_new_tokens": 16}
    app = ChatApp(model, str(fused / "fused"), tmp_path, defaults, force_image_at=1)
    first = WebSession(app)
    first.apply(steps=10_000)
    events: queue.Queue = queue.Queue()
    worker = threading.Thread(target=first.send, args=("Draw a red circle at the top left.", [], events))
    worker.start()
    seen = []
    while not seen or seen[-1][0] != "progress":
        seen.append(events.get(timeout=120))
    first.close()  # the page is closed mid-drawing
    worker.join(timeout=60)
    assert not worker.is_alive()
    while not events.empty():
        seen.append(events.get())
    assert seen[-1] == ("error", "cancelled") and ("done", None) not in seen
    assert max(v[0] for k, v in seen if k == "progress") < 10_000

    second = WebSession(app)
    second.apply(steps=2)
    done: queue.Queue = queue.Queue()
    t = threading.Thread(target=second.send, args=("Draw a red circle at the top left.", [], done))
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the model slot of the cancelled request was never released"
    events2 = []
    while not done.empty():
        events2.append(done.get())
    assert events2[-1] == ("done", None)
    assert [(s.turn, s.role, s.kind) for s in second.chat.segments if s.kind == "image"] == [(1, "assistant", "image")]
    assert second.chat.turn == 1 and first.chat is None  # its own conversation; the closed one's memory is freed
