"""``report.html``: the markdown report rendered by Python-Markdown, pictures embedded as base64 PNG.

One file that can be mailed or attached to a review: no external image, script, font or style sheet.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #e8eef6; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; font-size: 85%; }
h1 { border-bottom: 2px solid #2a5599; }
"""


def embed_images(body: str, folder: Path) -> str:
    """Replace ``src="name.png"`` by a ``data:`` URI of the file in ``folder`` (absent files stay links)."""
    def inline(match: re.Match) -> str:
        path = folder / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode("ascii")}"'
    return re.sub(r'src="([^":/]+\.png)"', inline, body)


def write_html(markdown_text: str, title: str, folder: Path, path: Path) -> None:
    """Render ``markdown_text`` to a self-contained page at ``path``; pictures are read from ``folder``."""
    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"], output_format="html")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{embed_images(body, folder)}\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
