"""One self-contained HTML page from a capture: the template with style, script and data inlined.

Nothing in the page refers to anything outside it (no URL, no font, no library), so it opens
from `file://` with no network. Text from the capture reaches the page only inside JSON
blocks (`data.script_json`) and is put on screen by the script as text (`textContent`,
canvas `fillText`), never as markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from importlib import resources
from pathlib import Path

from capture.format import CaptureReader

from ..output_files import write_atomically
from .data import PageData, collect, script_json

PAGE_GENERATOR = "latentmas view"


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _inline_script(text: str) -> str:
    """Script source that cannot end its own `<script>` element early."""
    return text.replace("</script", "<\\/script").replace("<!--", "<\\!--")


def render_page(page: PageData, source_path: str = "") -> str:
    """The HTML text of the page for `page` (see data.collect)."""
    blobs = "\n".join(f'<script type="application/json" id="lm-h{i}">{script_json(h)}</script>'
                      for i, h in enumerate(page.handoffs))
    title = f"{page.meta['source']} · LatentMAS viewer"
    script = _inline_script(_asset("viewer.js"))
    # The page's policy runs this one script only (by its hash): no inline handler, no fetch, no image.
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    parts = {
        "script_hash": f"'sha256-{digest}'",
        "title": html.escape(title),
        "source": html.escape(source_path, quote=True),
        "style": _asset("viewer.css").replace("</style", "<\\/style"),
        "meta": script_json(page.meta),
        "handoffs": blobs,
        "script": script,
    }
    # One pass over the template: text put in is never searched for placeholders again.
    return re.sub(r"\{\{(\w+)\}\}", lambda match: parts[match.group(1)], _asset("page.html"))


def build_page(reader: CaptureReader, problems: set[int] | None = None, transitions: list[str] | None = None,
               cmap: str | None = None) -> str:
    """The viewer page of the selected problems and hand-offs of an open capture."""
    return render_page(collect(reader, problems, transitions, cmap), str(reader.path.resolve()))


def write_page(text: str, out: Path) -> None:
    """Write the page atomically (a reader never sees half a page)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def page_source(path: Path) -> str | None:
    """The capture path an existing viewer page was written from, or None when it is no such page."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    marker = '<meta name="latentmas-capture" content="'
    start = head.find(marker)
    if start < 0:
        return None
    start += len(marker)
    return html.unescape(head[start:head.find('"', start)])
