"""A web chat with a saved fused model (Gradio; ``fusion/chat_ui.py``).

    python tools/chat_ui.py model=outputs/demo/align/final            # prints the local URL
    python tools/chat_ui.py model=outputs/demo/align/final port=7861 share=false steps=20 guidance=3.0

Type a message, attach or drop images, send: the assistant's text streams in, each image it draws
appears where it emitted ``<|bov|>``, with the sampler's progress while it draws. Every browser
session has its own conversation (KV cache and condition frames carry across turns); the model is
loaded once. The server binds 127.0.0.1 unless ``host=`` says otherwise; ``auth=user:password`` (or a
file of such lines) puts a login in front; ``share=true`` sends the traffic through Gradio's public relay.
A model folder that is missing or holds no generator / connector is refused before the server starts.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the server


import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fusion.cli import friendly_errors, setup_environment  # noqa: E402
from fusion.config import register_configs  # noqa: E402
from fusion.errors import ConfigError  # noqa: E402

register_configs()


def parse_auth(auth: str | None) -> list[tuple[str, str]] | None:
    """``user:password``, or a file with one such line per user (blank lines and # comments ignored)."""
    if auth is None:
        return None
    lines = Path(auth).read_text().splitlines() if Path(auth).is_file() else [auth]
    pairs = []
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            where = f"{auth}:{n}: " if Path(auth).is_file() else ""
            raise ConfigError(f"auth: {where}expected user:password")
        pairs.append((user, password))
    if not pairs:
        raise ConfigError(f"auth: {auth} holds no user:password line")
    return pairs


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@hydra.main(config_path="../conf", config_name="chat_ui", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own health checks, one line each
    OmegaConf.to_object(cfg)  # run the schema's checks
    auth = parse_auth(cfg.auth)
    from fusion.chat_ui import CSS, ChatApp, build, is_toy_world_model, toy_examples
    from fusion.data import set_max_image_pixels
    from fusion.model import FusedModel

    set_max_image_pixels(cfg.max_image_pixels)
    model = FusedModel.from_pretrained(cfg.model, device=cfg.device)  # a missing folder: CheckpointError naming it
    out = Path(cfg.output_dir)
    import json

    manifest = json.loads((Path(cfg.model) / "unifuse.json").read_text())
    toy = cfg.examples == "toy" or (cfg.examples == "auto" and is_toy_world_model(manifest))
    examples = toy_examples(out / "examples") if toy else []
    defaults = {k: cfg[k] for k in ("steps", "guidance", "image_guidance", "seed", "negative", "max_images_per_turn", "max_new_tokens")}
    app = ChatApp(model, cfg.model, out, defaults, system=cfg.system, concurrency=cfg.concurrency, force_image_at=cfg.force_image_at,
                  examples=examples)  # refuses an MLLM-only folder, naming what is missing
    page = build(app)
    port = cfg.port or free_port(cfg.host)
    page.launch(server_name=cfg.host, server_port=port, share=cfg.share, auth=auth, allowed_paths=[str((out / "sessions").resolve()), str((out / "examples").resolve())],
                max_file_size=int(cfg.max_upload_mb * 1024 * 1024), prevent_thread_lock=True, show_error=False, quiet=True, css=CSS)
    print(f"web chat: http://{cfg.host}:{port}/  (model {cfg.model}; Ctrl-C stops)", flush=True)
    if page.share_url:
        print(f"public share link (through Gradio's relay): {page.share_url}", flush=True)
    try:
        page.block_thread()
    except KeyboardInterrupt:
        page.close()


if __name__ == "__main__":
    main()
