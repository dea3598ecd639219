"""The self-contained results page of `muse search --html` (and the demo's search step).

One UTF-8 HTML file with inline CSS and every thumbnail inline as a base64 JPEG (`frame_jpegs`), so
the page can be mailed or opened anywhere. Each hit also gets a player (`<video preload="none">`,
nothing loaded until asked) and a link to its file at the moment (a `file://` URI with the media
fragment `#t=start,end`): they work where the page is opened beside the videos. Every text from the
index (ids, paths, captions, the query, notes) is HTML-escaped. A hit whose video cannot be decoded
still gets its row, with the reason instead of thumbnails; one whose file is gone says so.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from muse_pipeline.atomic import atomic_write_bytes
from muse_pipeline.search.moments import media_fragment, moment_label
from muse_pipeline.video.thumbnails import frame_jpegs

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
.note { background: #fff4d6; border: 1px solid #e0c060; padding: 0.6em; border-radius: 6px; }
.hit { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; margin-bottom: 0.8em; }
.meta { margin-bottom: 0.4em; } .score { font-weight: bold; } .path { color: #666; font-size: 0.9em; }
.caption { font-style: italic; } .strip img { margin-right: 4px; border-radius: 3px; } .err { color: #a00; }
.moment { font-weight: bold; color: #135; } video { max-width: 480px; display: block; margin-top: 0.4em; }
"""


def _file_uri(path: str) -> str | None:
    """The file:// URI of an absolute path (None for a relative one: no base to resolve it against)."""
    p = Path(path)
    return p.as_uri() if p.is_absolute() else None


def _thumbnails(path: str, n_frames: int, height: int, start: float | None = None,
                end: float | None = None) -> tuple[list[str], str | None]:
    """Base64 JPEGs of the frames, or ([], reason) if undecodable."""
    try:
        jpegs = frame_jpegs(path, n_frames, height, start, end)
    except Exception as exc:  # a missing or broken file still gets a row, with the reason
        return [], f"{type(exc).__name__}: {exc}"
    return [base64.b64encode(j).decode("ascii") for j in jpegs], None


def write_html(
    hits: Sequence[dict[str, Any]],
    out_html: Path | str,
    *,
    query: str | None = None,
    n_frames: int = 4,
    height: int = 96,
    note: str | None = None,
    extra_rows: Sequence[str] = (),
) -> Path:
    """Write the page of `hits` (`Searcher.search` dicts) to out_html (folders created); returns its path.

    note: a warning shown above the hits (e.g. RANDOM_INIT_NOTE); extra_rows: lines of plain text
    shown under the title (escaped).
    """
    title = f"muse search: {query}" if query else "muse search"
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
    ]
    if note:
        parts.append(f'<p class="note">{escape(note)}</p>')
    parts += [f"<p>{escape(line)}</p>" for line in extra_rows]
    if not hits:
        parts.append("<p>No results.</p>")
    for i, hit in enumerate(hits):
        start, end = hit.get("start"), hit.get("end")
        thumbs, error = _thumbnails(str(hit["path"]), n_frames, height, start or None, end)
        strip = "".join(
            f'<img src="data:image/jpeg;base64,{b64}" alt="frame {j + 1}" height="{height}">'
            for j, b64 in enumerate(thumbs)
        )
        if error:
            strip = f'<span class="err">no preview ({escape(error)})</span>'
        caption = hit.get("caption")
        label = moment_label(start, end)
        uri = _file_uri(str(hit["path"]))
        player = ""
        if hit.get("missing"):
            player = '<div class="err">the file no longer exists</div>'
        elif uri is not None:
            at = escape(uri + media_fragment(start, end), quote=True)
            player = (f'<video controls preload="none" src="{at}"></video>'
                      f'<a class="play" href="{at}">open at {escape(label)}</a>')
        parts.append(
            '<div class="hit"><div class="meta">'
            f'{hit.get("rank", i + 1)}. <span class="score">{float(hit["score"]):.4f}</span> '
            f'<span class="moment">{escape(label)}</span> {escape(str(hit["id"]))} '
            f'<span class="path">{escape(str(hit["path"]))}</span></div>'
            + (f'<div class="caption">{escape(str(caption))}</div>' if caption else "")
            + f'<div class="strip">{strip}</div>{player}</div>'
        )
    parts.append("</body></html>")
    out = Path(out_html)
    atomic_write_bytes(out, "\n".join(parts).encode("utf-8"))
    return out
