"""Click commands `analyze` and `compare` (registered into `latentmas`).

Heavy imports (pandas, matplotlib, seaborn, scipy) happen inside the commands. Every failure the
user can cause ends as one line `Error: ...` and a non-zero exit code.
"""

from __future__ import annotations

from pathlib import Path

import click

from render.options import check_problems

_CAPTURE = click.Path(dir_okay=False, path_type=Path)
_COMMON = [
    click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Output folder. Default: a folder named after the capture(s) under charts/."),
    click.option("--problems", default=None, callback=check_problems, metavar="SPEC",
                 help="Problem numbers, e.g. 1-5,9 (default: all committed)."),
    click.option("--transitions", default=None, metavar="NAMES",
                 help="Hand-offs, e.g. planner_to_critic,critic_to_refiner (default: all present)."),
    click.option("--show", type=int, default=2, show_default=True,
                 help="The first SHOW problems also get per-problem figures."),
    click.option("--jobs", "-j", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Worker processes reading the capture(s) (0: one per core)."),
    click.option("--figures/--no-figures", default=True, show_default=True,
                 help="Draw the figures (--no-figures: tables and JSON only)."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _warn(line: str) -> None:
    click.echo(line, err=True)


@click.command("analyze")
@click.argument("capture", type=_CAPTURE)
@_apply(_COMMON)
@click.option("--layer", type=int, default=None,
              help="Layer of the top tokens and strips (default: num_layers // 2, the one kNN ranks by).")
@click.option("--top", "top", type=int, default=10, show_default=True,
              help="K highest and K lowest columns per hand-off.")
@click.option("--all-layers", is_flag=True, help="Top and bottom tokens at every layer too.")
@click.option("--strip-scale", type=click.Choice(["strip", "handoff", "capture"]), default="handoff",
              show_default=True, help="Colour range of the single-layer strips: each strip's own, every hand-off "
                                      "of the same name, or the whole capture.")
def analyze_command(capture, out, problems, transitions, show, jobs, figures, no_progress, layer, top, all_layers,
                    strip_scale):
    """Profiles, distributions, top tokens, bands and hotspots of one capture: CSV, JSON and figures."""
    if top < 1:
        raise click.BadParameter(f"must be at least 1, got {top}", param_hint="'--top'")
    if show < 0:
        raise click.BadParameter(f"must be 0 or more, got {show}", param_hint="'--show'")
    from capture.format import CaptureError

    from .analyze import analyze_capture
    from .report import write_analysis

    try:
        result = analyze_capture(capture, problems=problems, transitions=transitions, layer=layer, top=top,
                                 all_layers=all_layers, show=show, strip_scale=strip_scale, jobs=jobs,
                                 progress=not no_progress, warn=_warn)
        folder, written = write_analysis(result, out, progress=not no_progress, figures=figures)
    except CaptureError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        raise click.Abort() from None
    n_problems = len(result.settings["problems"])
    click.echo(f"Analysed {n_problems} problem{'s' if n_problems != 1 else ''} of {capture}: "
               f"{len(written)} files in {folder}")
    for line in result.readout_lines():
        click.echo(line)


@click.command("compare")
@click.argument("capture_a", type=_CAPTURE)
@click.argument("capture_b", type=_CAPTURE)
@_apply(_COMMON)
def compare_command(capture_a, capture_b, out, problems, transitions, show, jobs, figures, no_progress):
    """Compare two captures of the same problems (e.g. kNN off vs on) by original cache position."""
    if show < 0:
        raise click.BadParameter(f"must be 0 or more, got {show}", param_hint="'--show'")
    from capture.format import CaptureError

    from .compare import compare_captures
    from .report import write_comparison

    try:
        result = compare_captures(capture_a, capture_b, problems=problems, transitions=transitions, show=show,
                                  jobs=jobs, progress=not no_progress, warn=_warn)
        folder, written = write_comparison(result, out, progress=not no_progress, figures=figures)
    except CaptureError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        raise click.Abort() from None
    verdict = "identical" if result.identical else (
        f"max |B - A| {result.table['max_abs_diff'].max():.4g} over common columns, "
        f"{int(result.table['only_a'].sum())} columns in A only, {int(result.table['only_b'].sum())} in B only")
    click.echo(f"Compared {result.table['problem'].nunique()} problems: {verdict}; {len(written)} files in {folder}")
