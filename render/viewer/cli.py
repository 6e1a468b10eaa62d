"""`latentmas view CAPTURE.h5`: write the capture's interactive viewer page (one offline HTML file)."""

from __future__ import annotations

from pathlib import Path

import click

from render.options import check_cmap, check_problems

DEFAULT_CHARTS = Path("charts")


def default_out(capture: Path, charts: Path = DEFAULT_CHARTS) -> Path:
    """`charts/<capture stem>/viewer.html`, or `charts/<stem>_2/…` and so on when that page was written
    from another capture file (a page of the same capture is rewritten)."""
    from .page import page_source

    stem = capture.stem or "capture"
    source = str(capture.resolve())
    for n in range(1, 1000):
        out = charts / (stem if n == 1 else f"{stem}_{n}") / "viewer.html"
        if not out.exists() or page_source(out) == source:
            return out
    raise click.ClickException(f"too many viewer pages for {stem} under {charts}; pass --out")


@click.command("view")
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (default: charts/<capture name>/viewer.html).")
@click.option("--problems", default=None, callback=check_problems, metavar="SPEC",
              help="Problem numbers to include, e.g. 1-5,9 (default: all committed).")
@click.option("--transitions", default=None, metavar="NAMES",
              help="Hand-offs to include, e.g. planner_to_critic,critic_to_refiner (default: all).")
@click.option("--cmap", default=None, callback=check_cmap, metavar="NAME",
              help="Colormap the page starts with (any matplotlib name; default: the similarity mode's).")
def view_command(capture, out, problems, transitions, cmap):
    """Write one self-contained HTML page to explore every problem and hand-off of CAPTURE
    (opens from file:// in any browser, no network, no Python needed to look at it)."""
    from capture.format import CaptureError, CaptureReader
    from capture.selection import parse_transitions

    from .page import build_page, write_page

    try:
        with CaptureReader(capture) as reader:
            text = build_page(reader, problems, parse_transitions(transitions), cmap)
    except CaptureError as error:
        raise click.ClickException(str(error)) from None
    out = out if out is not None else default_out(capture)
    try:
        write_page(text, out)
    except OSError as error:
        raise click.ClickException(f"cannot write {out}: {error.strerror or error}") from None
    size = len(text.encode("utf-8"))
    click.echo(f"Wrote the viewer page {out} ({size / 1e6:.2f} MB); open it in a browser")
