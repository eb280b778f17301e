"""Transcripts of a chat: every image as a PNG, ``transcript.md`` and a self-contained ``transcript.html``.

The files are written into a temporary folder and moved into place only when all of them
exist, so a folder with a transcript is always a complete one.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import tempfile
from pathlib import Path

from fusion.generate import Segment


def write_transcript(segments: list[Segment], out_dir: str | Path, title: str = "unifuse chat", meta: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".transcript."))
    try:
        counts: dict[tuple[int, str], int] = {}
        md = [f"# {title}", ""]
        body = []
        last = None
        for seg in segments:
            if (seg.turn, seg.role) != last:
                md += ["", f"## Turn {seg.turn}: {seg.role}", ""]
                body.append(f'<h2 class="{seg.role}">Turn {seg.turn}: {seg.role}</h2>')
                last = (seg.turn, seg.role)
            if seg.kind == "text":
                md.append(seg.text)
                body.append(f'<p class="{seg.role}">{html.escape(seg.text)}</p>')
            else:
                k = counts.get((seg.turn, seg.role), 0) + 1
                counts[(seg.turn, seg.role)] = k
                name = f"turn{seg.turn:02d}_{seg.role}_{k}.png"
                seg.image.save(tmp / name)
                seg.path = str(out / name)
                md.append(f"![{seg.role} image {k} of turn {seg.turn}]({name})")
                buf = io.BytesIO()
                seg.image.save(buf, format="PNG")
                data = base64.b64encode(buf.getvalue()).decode()
                body.append(f'<img class="{seg.role}" alt="{name}" src="data:image/png;base64,{data}">')
        (tmp / "transcript.md").write_text("\n".join(md) + "\n")
        style = ("body{font-family:sans-serif;max-width:760px;margin:2em auto}h2{font-size:1em;color:#555}"
                 "p.assistant{background:#f3f6ff;padding:.5em}img{width:256px;image-rendering:pixelated;border:1px solid #ccc;margin:.2em}")
        (tmp / "transcript.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>\n")
        (tmp / "transcript.json").write_text(json.dumps({"meta": meta or {}, "segments": [
            {"turn": s.turn, "role": s.role, "kind": s.kind, "text": s.text, "path": Path(s.path).name if s.path else None}
            for s in segments]}, indent=2))
        from fusion import faults

        faults.maybe_signal("kill_in_transcript", 0)  # reliability tests: die with everything still in the hidden folder
        for f in tmp.iterdir():  # PNGs first, the transcript files last
            if f.suffix == ".png":
                shutil.move(str(f), out / f.name)
        for name in ("transcript.json", "transcript.md", "transcript.html"):
            shutil.move(str(tmp / name), out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "transcript.html"
