"""Click commands `render` and `info` (registered into `latentmas`; also `python -m render`).

Heavy imports (matplotlib, h5py) happen inside the commands, so `latentmas --help` stays fast.
Every failure the user can cause ends as one line `Error: ...` and a non-zero exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

DEFAULT_OUT = "charts"
_ALL_KINDS = {"multi": ("multi",), "single": ("single",), "both": ("multi", "single")}


def _check_cmap(ctx, param, value):
    if value is None:
        return value
    from .colormaps import UnknownColormap, check_cmap
    try:
        return check_cmap(value)
    except UnknownColormap as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


def _check_problems(ctx, param, value):
    from .batch import parse_problem_spec
    try:
        parse_problem_spec(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return value


@click.command("render")
@click.argument("captures", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", default=DEFAULT_OUT, show_default=True, type=click.Path(path_type=Path),
              help="Folder for the figures (with several captures, one sub-folder per capture).")
@click.option("--kind", type=click.Choice(sorted(_ALL_KINDS)), default="both", show_default=True,
              help="multi: all layers; single: the middle layer, min-max normalised.")
@click.option("--cmap", default=None, callback=_check_cmap, metavar="NAME",
              help="Colormap of the multi-layer heatmap (any matplotlib name). "
                   "Default: RdYlGn for cosine modes, viridis for attention.")
@click.option("--single-cmap", default="YlOrRd", show_default=True, callback=_check_cmap, metavar="NAME",
              help="Colormap of the single-layer strip.")
@click.option("--vmin", type=float, default=None, help="Low end of the colour scale (default -1; 0 for attention).")
@click.option("--vmax", type=float, default=None, help="High end of the colour scale (default 1; max for attention).")
@click.option("--problems", default=None, callback=_check_problems, metavar="SPEC",
              help="Problem numbers to draw, e.g. 1-5,9 (default: all committed).")
@click.option("--transitions", default=None, metavar="NAMES",
              help="Hand-offs to draw, e.g. planner_to_critic,critic_to_refiner (default: all present).")
@click.option("--dpi", type=click.IntRange(10, 600), default=100, show_default=True,
              help="Resolution; figure sizes in inches are fixed by T and the layer count.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default="png", show_default=True)
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=1, show_default=True,
              help="Worker processes (0: one per core).")
@click.option("--token-labels", is_flag=True, help="Write token strings as x tick labels where they fit.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def render_command(captures, out_dir, kind, cmap, single_cmap, vmin, vmax, problems, transitions, dpi, fmt, jobs,
                   token_labels, no_progress):
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
            paths = render_capture(capture, folder, kinds=_ALL_KINDS[kind], problems=problems,
                                   transitions=transitions, cmap=cmap, single_cmap=single_cmap, vmin=vmin,
                                   vmax=vmax, dpi=dpi, fmt=fmt, jobs=jobs, token_labels=token_labels,
                                   progress=not no_progress, warn=lambda line: click.echo(line, err=True))
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
    where = outputs[0] if len(set(outputs)) == 1 else f"{out_dir}/<capture>/"
    if written or not failures:
        noun = "figure" if written == 1 else "figures"
        click.echo(f"Wrote {written} {noun} to {where}")
    if failures:
        if len(failures) == 1:
            raise click.ClickException(failures[0])
        for line in failures[:-1]:
            click.echo(f"Error: {line}", err=True)
        raise click.ClickException(failures[-1])


def _output_dirs(captures, out_dir: Path) -> list[Path]:
    """One capture: `out_dir` itself; several: `out_dir/<file stem>` (made unique)."""
    if len(captures) == 1:
        return [out_dir]
    seen: dict[str, int] = {}
    folders = []
    for capture in captures:
        stem = Path(capture).stem or "capture"
        seen[stem] = seen.get(stem, 0) + 1
        folders.append(out_dir / (stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"))
    return folders


# -- info ----------------------------------------------------------------------------------

_FIELDS = (
    ("model", ("model_name", "model")),
    ("method", ("method",)),
    ("task", ("task", "dataset")),
    ("layers", ("num_layers",)),
    ("heads", ("num_heads", "num_attention_heads")),
    ("kv heads", ("num_key_value_heads", "num_kv_heads")),
    ("similarity", ("similarity",)),
    ("latent steps", ("latent_steps",)),
    ("prompt", ("prompt",)),
    ("started", ("started_at", "start_time", "created_at")),
)


_ALWAYS = {"model", "method", "heads", "latent steps", "started"}


def _lookup(attrs: dict, config: dict, keys) -> object:
    for key in keys:
        for source in (attrs, config):
            if key in source and source[key] not in (None, ""):
                return source[key]
    return None


def describe(path) -> str:
    """The text `info` prints: run metadata, then one row per committed problem."""
    from capture.format import CaptureReader
    from capture.text import shorten

    lines = []
    with CaptureReader(path) as reader:
        attrs = reader.attrs
        try:
            config = reader.config
        except (KeyError, ValueError):
            config = {}
        config = config if isinstance(config, dict) else {}
        used = {"schema_version", "config"}
        lines.append(f"Capture: {reader.path}")
        lines.append(f"  {'schema':<13} {attrs.get('schema_version')}")
        for label, keys in _FIELDS:
            value = _lookup(attrs, config, keys)
            used.update(keys)
            if label == "layers":
                value = f"{reader.num_layers} ({reader.similarity_dtype} similarities)"
            elif label == "similarity" and value is None:
                value = "seed (not recorded; assumed)"
            if value is not None:
                lines.append(f"  {label:<13} {shorten(value, 60)}")
            elif label in _ALWAYS:
                lines.append(f"  {label:<13} (not recorded)")
        knn = {k: v for k, v in {**config, **attrs}.items() if k.lower().startswith("knn")}
        used.update(knn)
        knn_text = ", ".join(f"{k}={shorten(v, 20)}" for k, v in sorted(knn.items())) or "(not recorded)"
        lines.append(f"  {'kNN':<13} {knn_text}")
        if config:
            lines.append(f"  {'config':<13} {shorten(json.dumps(config, sort_keys=True), 100)}")
        finished = reader.finished_at
        lines.append(f"  {'finished':<13} {finished if finished else 'no (still running, or stopped early)'}")
        summary = reader.summary
        if summary:
            lines.append(f"  {'summary':<13} {shorten(json.dumps(summary, sort_keys=True), 100)}")
        others = {k: v for k, v in attrs.items() if k not in used}
        for key in sorted(others):
            lines.append(f"  {key:<13} {shorten(others[key], 60)}")
        numbers = reader.problem_numbers
        lines.append(f"  {'problems':<13} {len(numbers)} committed")
        lines.append("")
        header = f"{'problem':>7}  {'gold':<14} {'prediction':<14} {'correct':<7}  hand-offs (T)"
        lines.append(header)
        lines.append("-" * len(header))
        for number in numbers:
            p = reader.problem(number)
            correct = {True: "yes", False: "no", None: "?"}[p.correct]
            handoffs = ", ".join(f"{name} {width}" for name, width in zip(p.handoff_names, p.handoff_columns)) or "-"
            lines.append(f"{number:>7}  {shorten(p.gold, 14):<14} {shorten(p.prediction, 14) or '-':<14} "
                         f"{correct:<7}  {handoffs}")
        if not numbers:
            lines.append("(no committed problems yet)")
    return "\n".join(lines)


@click.command("info")
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
def info_command(capture):
    """Show a capture's run metadata and its problems with their hand-offs."""
    from capture.format import CaptureError
    from capture.text import one_line
    try:
        text = describe(capture)
    except CaptureError as error:
        raise click.ClickException(str(error)) from None
    except (OSError, KeyError) as error:
        raise click.ClickException(f"{capture} could not be read ({one_line(error)})") from None
    click.echo(text)


@click.group("render", context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """LatentMAS render stage: heatmaps from capture files, on CPU."""


main.add_command(render_command)
main.add_command(info_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
