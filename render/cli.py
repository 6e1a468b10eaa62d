"""Click commands `render` and `info` (registered into `latentmas`; also `python -m render`).

Heavy imports (matplotlib, h5py) happen inside the commands, so `latentmas --help` stays fast.
Every failure the user can cause ends as one line `Error: ...` and a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import check_cmap, check_problems

DEFAULT_OUT = "charts"


def _kinds(ctx, param, value) -> tuple[str, ...]:
    """'both' -> the seed's two kinds; 'all' -> every registered kind; else comma-separated kind names."""
    from .kinds import kind_names

    if value == "both":
        return ("multi", "single")
    if value == "all":
        return kind_names()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in kind_names()]
    if unknown or not names:
        raise click.BadParameter(f"unknown figure kind {', '.join(unknown) or repr(value)}; choose from "
                                 f"{', '.join(kind_names())}, both or all", ctx=ctx, param=param)
    return names


def _finite(ctx, param, value):
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


@click.command("render")
@click.argument("captures", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(path_type=Path),
              help=f"Folder for the figures (with several captures, one sub-folder per capture). Default: "
                   f"{DEFAULT_OUT}/<capture file name without .h5>/, so two captures never overwrite each other.")
@click.option("--kind", "kinds", default="both", show_default=True, callback=_kinds, metavar="KINDS",
              help="Figure kinds, comma separated: multi (all layers), single (the middle layer, min-max "
                   "normalised), any other registered kind; both = multi,single; all = every kind.")
@click.option("--cmap", default=None, callback=check_cmap, metavar="NAME",
              help="Colormap of the multi-layer heatmap and other kinds (any matplotlib name). "
                   "Default: the similarity mode's own (RdYlGn for cosine modes, viridis for attention).")
@click.option("--single-cmap", default="YlOrRd", show_default=True, callback=check_cmap, metavar="NAME",
              help="Colormap of the single-layer strip.")
@click.option("--vmin", type=float, default=None, callback=_finite,
              help="Low end of the colour scale (default: the mode's, -1 for cosines, 0 for attention).")
@click.option("--vmax", type=float, default=None, callback=_finite,
              help="High end of the colour scale (default: the mode's, 1 for cosines, max for attention).")
@click.option("--problems", default=None, callback=check_problems, metavar="SPEC",
              help="Problem numbers to draw, e.g. 1-5,9 (default: all committed).")
@click.option("--transitions", default=None, metavar="NAMES",
              help="Hand-offs to draw, e.g. planner_to_critic,critic_to_refiner (default: all present).")
@click.option("--dpi", type=click.IntRange(10, 600), default=100, show_default=True,
              help="Resolution; figure sizes in inches are fixed by T and the layer count.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True)
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=1, show_default=True,
              help="Worker processes (0: one per core).")
@click.option("--token-labels", is_flag=True, help="Write token strings as x tick labels where they fit.")
@click.option("--x-axis", "x_axis", type=click.Choice(["column", "position"]), default="column", show_default=True,
              help="x tick labels: the hand-off's column numbers, or the original KV cache positions at those "
                   "columns (after kNN filtering positions have gaps, so kNN-off and kNN-on figures line up).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def render_command(captures, out_dir, kinds, cmap, single_cmap, vmin, vmax, problems, transitions, dpi, fmt, jobs,
                   token_labels, x_axis, no_progress):
    """Draw heatmaps of capture files (no model needed; re-run with other options at will)."""
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise click.BadParameter(f"--vmin ({vmin:g}) must be below --vmax ({vmax:g})",
                                 param_hint="'--vmin' / '--vmax'")
    from capture.format import CaptureError

    from .batch import RenderError, render_capture

    outputs = _output_dirs(captures, out_dir)
    written = 0
    failures = []
    for capture, folder in zip(captures, outputs):
        try:
            paths = render_capture(capture, folder, kinds=kinds, problems=problems,
                                   transitions=transitions, cmap=cmap, single_cmap=single_cmap,
                                   cmaps={k: cmap for k in kinds if k != "single"} if cmap else None, vmin=vmin,
                                   vmax=vmax, dpi=dpi, fmt=fmt, jobs=jobs, token_labels=token_labels,
                                   x_axis=x_axis, progress=not no_progress,
                                   warn=lambda line: click.echo(line, err=True))
        except RenderError as error:
            written += len(error.written)
            failures.append(str(error))
            continue
        except CaptureError as error:
            failures.append(str(error))
            continue
        except KeyboardInterrupt:
            raise click.Abort() from None
        written += len(paths)
    where = outputs[0] if len(set(outputs)) == 1 else f"{out_dir or DEFAULT_OUT}/<capture>/"
    if written or not failures:
        noun = "figure" if written == 1 else "figures"
        click.echo(f"Wrote {written} {noun} to {where}")
    if failures:
        if len(failures) == 1:
            raise click.ClickException(failures[0])
        for line in failures[:-1]:
            click.echo(f"Error: {line}", err=True)
        raise click.ClickException(failures[-1])


def _output_dirs(captures, out_dir: Path | None) -> list[Path]:
    """One capture: `out_dir` itself; several: `out_dir/<file stem>` (made unique). Without `out_dir`,
    every capture gets its own folder `charts/<file stem>/` (see `default_folder`)."""
    if out_dir is None:
        folders: list[Path] = []
        for capture in captures:
            folders.append(default_folder(Path(capture), taken=folders))
        return folders
    if len(captures) == 1:
        return [out_dir]
    seen: dict[str, int] = {}
    folders = []
    for capture in captures:
        stem = Path(capture).stem or "capture"
        seen[stem] = seen.get(stem, 0) + 1
        folders.append(out_dir / (stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"))
    return folders


RENDER_MARKER = "rendered_from.json"  # {"capture": "/abs/path.h5"}: whose figures a default folder holds


def default_folder(capture: Path, charts: Path = Path(DEFAULT_OUT), taken=()) -> Path:
    """`charts/<capture stem>/`, or `charts/<stem>_2/` and so on when that folder holds another capture
    file's figures or viewer page (same name, other folder), so two runs never overwrite each other.
    The folder is claimed by writing RENDER_MARKER into it (figures of the same capture are rewritten)."""
    import json

    from .viewer.page import page_source

    stem = capture.stem or "capture"
    source = str(capture.resolve())
    for n in range(1, 1000):
        folder = charts / (stem if n == 1 else f"{stem}_{n}")
        if folder in taken:
            continue
        try:
            owner = json.loads((folder / RENDER_MARKER).read_text(encoding="utf-8")).get("capture")
        except (OSError, ValueError, AttributeError):
            owner = page_source(folder / "viewer.html")
        if owner is None or owner == source:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / RENDER_MARKER).write_text(json.dumps({"capture": source}) + "\n", encoding="utf-8")
            except OSError as error:
                raise click.ClickException(f"cannot create output folder {folder}: {error.strerror or error}") \
                    from None
            return folder
    raise click.ClickException(f"too many figure folders for {stem} under {charts}; pass --out")


from .info import info_command  # noqa: E402


@click.group("render", context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """LatentMAS render stage: heatmaps from capture files, on CPU."""


main.add_command(render_command)
main.add_command(info_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
