"""The web chat (``tools/chat_ui.py``): a Gradio page over :class:`fusion.generate.Chat`.

One fused model is loaded once and shared; every browser session gets its own :class:`WebSession`
(a ``Chat`` with its KV cache and condition frames, an output folder for its images and
transcript), created on its first message and dropped when the page is closed. A message runs
``Chat.send`` in a worker thread while the page's generator streams what it produces: the
assistant's text token by token, a progress line while the DiT samples (step k of n), each drawn
image at the point of the conversation where ``<|bov|>`` was emitted. Requests go through
Gradio's queue (``concurrency`` at once; 1 on a CPU); a model-wide semaphore of the same size
guards the model even against a cancelled request whose thread is still finishing. A request whose
page is closed (or cleared) is cancelled at the next token or sampler step; its session is thrown
away, the shared model is untouched.

Bad input never reaches the page as a traceback: a file that is not an image, a zero-byte or
truncated image, an image whose header declares more than ``max_image_pixels`` (refused before
decoding, as the data loader does), an empty message or one over the MLLM's context budget each
give one line in the page's status, and the conversation is as it was before the message.
"""

from __future__ import annotations

import html
import logging
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fusion.errors import CheckpointError, UnifuseError
from fusion.generate import NEGATIVES, Chat, ForceTokens, GenerationSettings, resolve_negative

log = logging.getLogger(__name__)

#: the toy world's phrasings (fusion/toyworld/conversations.py), offered as one-click examples for a toy-world model
TOY_EXAMPLES = ["Draw a red circle at the top left.", "Please draw a blue square at the bottom right and a green triangle at the top left.",
                "Show me a yellow square at the centre.", "What is two plus three?"]
TOY_EDIT = "Make the red circle blue."


class Cancelled(Exception):
    """Raised inside a running ``Chat.send`` when its page was closed or cleared."""


#: the :class:`GenerationSettings` fields the settings panel controls, in the panel's order
PANEL = ("steps", "guidance", "image_guidance", "seed", "negative", "max_images_per_turn", "max_new_tokens")


class WebSession:
    """One browser session: its own Chat over the shared model, and a folder for its images and transcript."""

    def __init__(self, app: ChatApp):
        self.app = app
        self.id = uuid.uuid4().hex[:12]
        self.dir = app.out / "sessions" / f"session-{time.strftime('%Y%m%d-%H%M%S')}-{self.id}"
        self.cancelled = threading.Event()
        self.closed = False
        self.busy = threading.Lock()
        self.chat = self._new_chat()
        self._saved: dict[int, str] = {}  # id(segment) -> its PNG in self.dir
        self.files: list[str] = []

    def _new_chat(self) -> Chat:
        a = self.app
        return Chat(a.model, GenerationSettings(**{k: v for k, v in a.defaults.items() if k in GenerationSettings.__dataclass_fields__}),
                    system=a.system)

    def close(self) -> None:
        """The page was closed or cleared: stop what runs and free the conversation's memory (KV cache, latents) now, not when
        Gradio drops the closed session's state an hour later. Its files stay on disk."""
        self.cancelled.set()
        self.closed = True
        if self.busy.acquire(blocking=False):  # nothing running: free now; else the running request frees it as it ends
            try:
                self._free()
            finally:
                self.busy.release()

    def _free(self) -> None:
        self.chat = None
        self._saved.clear()

    # ------------------------------------------------------------------ one message
    def apply(self, **values: Any) -> None:
        """Set panel settings (names from :data:`PANEL`) for the next message."""
        s = self.chat.settings
        for name, value in values.items():
            setattr(s, name, value)
        self.chat.negative = resolve_negative(s.negative, self.chat.model.trained_negative)

    def send(self, text: str, files: list[str], events: queue.Queue) -> None:
        """``Chat.send`` in this thread, reporting ("text", piece), ("progress", (k, n)) and the end ("done", None /
        ("error", message)) to ``events``. A failure after the assistant began leaves a chat that cannot go on: it is reset."""
        chat = self.chat

        def check() -> None:
            if self.cancelled.is_set():
                raise Cancelled()

        def on_text(piece: str) -> None:
            check()
            events.put(("text", piece))

        def on_progress(k: int, n: int) -> None:
            check()
            events.put(("progress", (k, n)))

        chat.on_text, chat.on_progress = on_text, on_progress
        if self.app.force_image_at is not None:  # testing: the tiny models never emit <|bov|> on their own
            k = self.app.force_image_at
            chat.logits_processor = ForceTokens({k: chat.mllm.bov_token_id, k + 2: chat.mllm.end_of_turn_id})
        n_before = len(chat.segments)
        try:
            with self.app.model_slots:
                check()
                chat.send(text, files)
            events.put(("done", None))
        except Cancelled:
            log.info("session %s: request cancelled (page closed or cleared)", self.id)
            if len(chat.segments) != n_before:
                self.reset()  # a half-written turn is not a conversation to go on from
            events.put(("error", "cancelled"))
        except UnifuseError as e:  # bad input: the chat is as it was unless the assistant had begun
            if len(chat.segments) != n_before:
                self.reset()
                events.put(("error", f"{e} (the conversation was reset)"))
            else:
                events.put(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - the page gets one line, the server log the traceback, the server lives
            log.exception("session %s: request failed", self.id)
            self.reset()
            events.put(("error", f"internal error ({type(e).__name__}: {e}); the conversation was reset"))
        finally:
            chat.on_text = chat.on_progress = None
            if self.closed:
                self._free()

    def reset(self) -> None:
        if self.closed:
            return self._free()
        self.chat = self._new_chat()
        self._saved.clear()
        self.files = []

    # ------------------------------------------------------------------ display
    def image_path(self, seg) -> str:
        key = id(seg)
        if key not in self._saved:
            self.dir.mkdir(parents=True, exist_ok=True)
            k = sum(1 for s in self.chat.segments[: self.chat.segments.index(seg) + 1] if s.kind == "image" and s.turn == seg.turn
                    and s.role == seg.role)
            path = self.dir / f"turn{seg.turn:02d}_{seg.role}_{k}.png"
            display_copy(seg.image).save(path)  # what the page shows; the transcript and downloads keep the image as drawn
            self._saved[key] = str(path)
        return self._saved[key]

    def history(self, pending_user: dict | None = None, streaming: str = "", status: str | None = None) -> list[dict]:
        """The Chatbot's messages: one per segment, in conversation order (the text being decoded last)."""
        out: list[dict] = []
        for seg in (self.chat.segments if self.chat is not None else []):
            if seg.kind == "text":
                out.append({"role": seg.role, "content": seg.text})
            else:
                out.append({"role": seg.role, "content": {"path": self.image_path(seg), "alt_text": f"{seg.role} image, turn {seg.turn}"}})
        if pending_user is not None:
            for f in pending_user.get("files", []):
                out.append({"role": "user", "content": {"path": f}})
            out.append({"role": "user", "content": pending_user.get("text", "")})
        if streaming:
            out.append({"role": "assistant", "content": streaming})
        return out

    def write_transcript(self) -> list[str]:
        """transcript.html / .json / .md and every PNG, written by the toolkit's transcript writer; the files to offer."""
        from fusion.transcript import write_transcript

        if not self.chat.segments:
            return []
        folder = self.dir / "transcript"
        if folder.exists():
            shutil.rmtree(folder)
        meta = {"model": str(self.app.model_path), "settings": {name: getattr(self.chat.settings, name) for name in PANEL},
                "negative": self.chat.negative}
        write_transcript(self.chat.segments, folder, title="unifuse web chat", meta=meta)
        return [str(folder / "transcript.html"), str(folder / "transcript.json")] + sorted(str(p) for p in folder.glob("*.png"))


class ChatApp:
    """The shared model and settings behind every session's page."""

    def __init__(self, model, model_path: str, out: str | Path, defaults: dict[str, Any], system: str | None = None,
                 concurrency: int = 1, force_image_at: int | None = None, examples: list[dict] | None = None):
        if model.generator is None or model.connector is None:
            raise CheckpointError(f"{model_path}: this fused model has no {'generator' if model.generator is None else 'connector'} part "
                                  "(an MLLM-only stage-1 export?), so it cannot draw images: give a stage-2 final/ folder")
        self.model, self.model_path = model, model_path
        self.out = Path(out)
        (self.out / "sessions").mkdir(parents=True, exist_ok=True)  # served to the pages (with the examples), nothing else under out
        self.defaults = defaults
        self.system = system
        self.concurrency = concurrency
        self.model_slots = threading.BoundedSemaphore(concurrency)
        self.force_image_at = force_image_at
        self.examples = examples or []
        self.sessions: dict[str, WebSession] = {}


def toy_examples(out: Path) -> list[dict]:
    """One-click examples from the toy world's phrasings: drawing requests, a question, and an edit of an image
    (a toy-world scene written to ``out``)."""
    from fusion.toyworld.scenes import Obj, make_scene, render

    out.mkdir(parents=True, exist_ok=True)
    img = out / "example_red_circle.png"
    if not img.is_file():
        render(make_scene([Obj("circle", "red", 0, 0)])).save(img)
    return [{"text": t, "files": []} for t in TOY_EXAMPLES] + [{"text": TOY_EDIT, "files": [str(img)]}]


def is_toy_world_model(manifest: dict) -> bool:
    """Whether a fused model was trained on the toy world (its recorded data path is a ``make_toy`` split)."""
    cfg = manifest.get("config") or {}
    return "toyworld" in str((cfg.get("data") or {}).get("path", ""))


CSS = """
#status {min-height: 1.5em; padding: 0 .5em}
#status .error {color: #b00020; font-weight: 600}
"""


def build(app: ChatApp):
    """The Gradio Blocks of the page."""
    import gradio as gr

    d = app.defaults

    def session_of(state: WebSession | None) -> WebSession:
        return state if state is not None else WebSession(app)

    def respond(message, state, steps, guidance, image_guidance, seed, negative, max_images, max_tokens, request: gr.Request):
        sess = session_of(state if state is None or not state.closed else None)
        if request is not None and request.session_hash:
            app.sessions[request.session_hash] = sess  # for unload: the page closed
        message = message or {}
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in (message.get("files") or [])]
        log.info("session %s: message of %d characters, %d upload(s)", sess.id, len(text), len(files))
        if not text:
            yield sess.history(), status_html("the message is empty: type what you want (images alone need a request too)", True), \
                message, gr.update(), sess
            return
        if not sess.busy.acquire(blocking=False):
            yield sess.history(), status_html("still answering the previous message", True), message, gr.update(), sess
            return
        finished = False
        try:
            sess.cancelled.clear()
            sess.apply(steps=int(steps), guidance=float(guidance), image_guidance=float(image_guidance), seed=int(seed or 0), negative=negative,
                       max_images_per_turn=int(max_images), max_new_tokens=int(max_tokens))
            events: queue.Queue = queue.Queue()
            worker = threading.Thread(target=sess.send, args=(text, files, events), daemon=True, name=f"chat-{sess.id}")
            pending = {"text": text, "files": files}
            yield sess.history(pending), status_html("waiting for the model" if app.concurrency == 1 else "thinking"), \
                {"text": "", "files": []}, gr.update(), sess
            streamed, n0, drawing = "", len(sess.chat.segments), None
            t0 = time.monotonic()
            worker.start()
            while True:
                try:
                    kind, value = events.get(timeout=0.25)
                except queue.Empty:
                    if worker.is_alive() or not events.empty():
                        continue
                    kind, value = "error", "internal error: the request ended without an answer (see the server log)"
                    break
                if kind == "text":
                    streamed += value
                    drawing = None
                elif kind == "progress":
                    if drawing is None:
                        streamed = ""  # the text before <|bov|> is a segment now
                    drawing = value
                else:
                    break
                started = len(sess.chat.segments) > n0
                line = f"drawing an image: sampler step {drawing[0]} of {drawing[1]}" if drawing else "writing"
                yield sess.history(None if started else pending, streamed), status_html(line), gr.update(), gr.update(), sess
            worker.join()
            finished = True
            if kind == "error":  # the message goes back into the box, less an upload the error names, to fix and send again
                keep = [f for f in files if f not in value]
                for f in files:
                    value = value.replace(f, Path(f).name)  # the upload's own name, not the server's copy of it
                yield sess.history(), status_html(value, True), {"text": text, "files": keep} if value != "cancelled" else gr.update(), \
                    gr.update(value=sess.files or None), sess
                return
            sess.files = sess.write_transcript()
            n_img = sum(1 for s in sess.chat.segments if s.turn == sess.chat.turn and s.role == "assistant" and s.kind == "image")
            finished = True
            took = time.monotonic() - t0
            log.info("session %s: turn %d answered in %.1f s (%d image(s) drawn)", sess.id, sess.chat.turn, took, n_img)
            yield sess.history(), status_html(f"turn {sess.chat.turn} done: {n_img} image(s) drawn in {took:.1f} s"), gr.update(), \
                gr.update(value=sess.files), sess
        finally:  # also when Gradio drops this generator because the page went away: the request stops too
            if not finished:
                sess.cancelled.set()
            sess.busy.release()
            if sess.closed:  # a worker still running holds its own reference to the chat
                sess._free()

    def clear(state, request: gr.Request):
        if state is not None:
            state.close()
        if request is not None:
            app.sessions.pop(request.session_hash, None)
        return [], status_html("new conversation"), {"text": "", "files": []}, gr.update(value=None), None

    def closed(request: gr.Request):
        """The page was closed or reloaded (Gradio's heartbeat ended): cancel what its session runs, forget it."""
        sess = app.sessions.pop(request.session_hash, None) if request is not None else None
        if sess is not None:
            log.info("session %s: page closed", sess.id)
            sess.close()

    with gr.Blocks(title="unifuse chat") as page:
        gr.Markdown(f"### unifuse: interleaved chat with `{html.escape(str(app.model_path))}`")
        state = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)  # also when it expires
        bot = gr.Chatbot(label="conversation", elem_id="history", height=640, group_consecutive_messages=False)
        status = gr.HTML(status_html("ready"), elem_id="status")
        box = gr.MultimodalTextbox(placeholder="Type a message; drop or attach images", file_count="multiple", elem_id="message",
                                   show_label=False, submit_btn=True)
        if app.examples:
            gr.Examples(examples=[[e] for e in app.examples], inputs=[box], label="examples (toy world)")
        with gr.Row():
            new = gr.Button("New conversation", elem_id="clear", variant="secondary")
        files = gr.File(label="transcript (html, json) and images", file_count="multiple", interactive=False, elem_id="downloads")
        with gr.Accordion("settings", open=False):
            steps = gr.Slider(1, max(100, d["steps"]), value=d["steps"], step=1, label="sampler steps")
            guidance = gr.Slider(1.0, max(15.0, d["guidance"]), value=d["guidance"], step=0.5, label="text guidance")
            image_guidance = gr.Slider(1.0, max(5.0, d["image_guidance"]), value=d["image_guidance"], step=0.1, label="image guidance (1: off)")
            seed = gr.Number(value=d["seed"], precision=0, label="seed (image i: seed + i)")
            negative = gr.Dropdown(list(NEGATIVES), value=d["negative"], label="guidance negative (auto: what stage 2 trained with)")
            max_images = gr.Slider(0, max(8, d["max_images_per_turn"]), value=d["max_images_per_turn"], step=1, label="max images per turn")
            max_tokens = gr.Slider(1, max(2048, d["max_new_tokens"]), value=d["max_new_tokens"], step=1, label="max new tokens per turn")
        controls = [steps, guidance, image_guidance, seed, negative, max_images, max_tokens]
        outputs = [bot, status, box, files, state]
        send_event = box.submit(respond, [box, state, *controls], outputs, show_progress="hidden")
        new.click(clear, [state], outputs, cancels=[send_event])
        bot.clear(clear, [state], outputs, cancels=[send_event])  # the conversation's own trash button: a new conversation too
        page.unload(closed)
    page.queue(default_concurrency_limit=app.concurrency)
    return page


DISPLAY_SIDE = 256


def display_copy(image):
    """An image small enough to be a blur when the browser scales it (a 64 px toy image) enlarged with sharp pixels to
    about ``DISPLAY_SIDE``; larger images as they are."""
    from PIL import Image

    k = DISPLAY_SIDE // max(1, min(image.size))
    return image.resize((image.width * k, image.height * k), Image.NEAREST) if k > 1 else image


def status_html(text: str, error: bool = False) -> str:
    cls = "error" if error else "info"
    return f'<div class="{cls}">{"error: " if error else ""}{html.escape(text)}</div>'
