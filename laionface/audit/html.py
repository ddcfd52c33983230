"""HTML pieces of the report: escaped text, tables and notes.

Every text that comes from the data (captions, URLs, domains, error messages, keys) goes through
`escape`; URLs are shown as text, never as links.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

# Bidirectional controls: they reorder the text around them (a caption could make a URL read
# backwards); shown as their code, like the control characters.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_INVISIBLE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}]")


def _show(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape(text: Any, limit: int | None = None) -> str:
    """Data as HTML text: truncated (before escaping, so no entity is cut), control and bidi
    characters shown as their code (\\u0000, \\u202e), then escaped."""
    text = "" if text is None else str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return html.escape(_INVISIBLE.sub(_show, text), quote=True)


def html_table(header: list[tuple[str, bool]], rows: list[list[str]], **attrs: str) -> str:
    """A table of already-escaped cells; header is (title, numeric) per column."""
    extra = "".join(f' {name.replace("_", "-")}="{escape(v)}"' for name, v in attrs.items())
    head = "".join(f"<th{' class=n' if numeric else ''}>{escape(t)}</th>" for t, numeric in header)
    body = []
    for row in rows:
        cells = "".join(
            f"<td{' class=n' if header[i][1] else ''}>{cell}</td>" for i, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table{extra}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


SETTING_CHARS = 300


def setting_value(value: Any) -> str:
    """A setting's value as escaped JSON text (long lists cut)."""
    return escape(json.dumps(value, default=str), SETTING_CHARS)


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def absent(stage: str) -> str:
    return note(f"No data: the {stage} stage has no output in this run folder.")
