"""Chat with a saved fused model: text as it is produced, images as PNGs, a transcript.

Run as:
    python tools/generate.py model=outputs/demo/align/final prompt="Draw a red circle."
    python tools/generate.py model=... prompt="Move the circle to the left." image=circle.png
    python tools/generate.py model=... conversation=chat.jsonl [conversation_line=2]

The guidance negative defaults to negative=auto: what stage 2 trained as a dropped text
(the model's manifest, guidance_negative: null or duogen); negative=duogen|null overrides it
(a warning names both when it differs from training).

Writes into the run folder (hydra.run.dir): one PNG per image (user and generated),
transcript.md, transcript.html (self-contained, images inline) and transcript.json. The
transcript is written only when every turn has finished.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs
from fusion.errors import ConfigError, DataError

register_configs()


def user_turns(path: str, line: int, fmt: str = "unifuse") -> list[tuple[str, list]]:
    """(text, images) of every user turn of one conversation line (any data.format; hf: the row). Other lines
    may be bad; a bad chosen line raises its own DataError (file:line and kind)."""
    from fusion.formats import iter_samples

    for item in iter_samples(path, fmt):
        if item.line != line:
            continue
        if isinstance(item, DataError):
            raise item
        turns = []
        for m in item.messages:
            if m["role"] != "user":
                continue
            text = " ".join(i["text"] for i in m["content"] if i["type"] == "text")
            if not text.strip():
                raise DataError(f"user turn {len(turns) + 1} has no text (a request must say what to do with its images)", path, line,
                                kind="schema")
            turns.append((text, [i["image"] for i in m["content"] if i["type"] == "image"]))
        if not turns:
            raise DataError("the conversation has no user turn", path, line, kind="schema")
        return turns
    raise DataError(f"no conversation on line {line}", path)


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    from omegaconf import OmegaConf

    OmegaConf.to_object(cfg)  # run the schema's checks
    if (cfg.prompt is None) == (cfg.conversation is None):
        raise ConfigError("give either prompt=\"...\" (with optional image=...) or conversation=<file.jsonl>")
    from fusion.data import set_max_image_pixels
    from fusion.generate import Chat, GenerationSettings
    from fusion.transcript import write_transcript

    set_max_image_pixels(cfg.max_image_pixels)

    attached = [] if cfg.image is None else [str(cfg.image)] if isinstance(cfg.image, str) else [str(x) for x in cfg.image]
    turns = [(cfg.prompt, attached)] if cfg.prompt is not None else user_turns(cfg.conversation, cfg.conversation_line, cfg.conversation_format)
    for text, _ in turns:
        if not text or not text.strip():
            raise DataError("the prompt is empty")
    settings = GenerationSettings(**{k: cfg[k] for k in GenerationSettings.__dataclass_fields__ if k in cfg and k != "max_condition_frames"})

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    chat = Chat.load(cfg.model, device=cfg.device, settings=settings, system=cfg.system, on_text=stream)
    from fusion import faults

    for turn, (text, images) in enumerate(turns, start=1):
        print(f"\n[user] {text}" + (f" (+{len(images)} image(s))" if images else ""))
        sys.stdout.write("[assistant] ")
        new = chat.send(text, images)
        drawn = [s for s in new if s.kind == "image" and s.role == "assistant"]
        print(f"\n  ({len(drawn)} image(s) drawn)")
        faults.maybe_signal("kill_after_turn", turn)  # reliability tests: an interrupted chat
    page = write_transcript(chat.segments, cfg.output_dir, title=f"unifuse: {Path(cfg.model).name}",
                            meta={"model": cfg.model, "settings": settings.__dict__, "negative": chat.negative,  # auto, resolved
                                  "mllm_tokens": chat.state.length,
                                  "tokens_forwarded": chat.state.tokens_forwarded})
    print(f"transcript: {page}")


if __name__ == "__main__":
    main()
