"""The `latentmas` command: run, capture, render, info, ... Also what `python run.py` calls.

Run settings are `RunConfig`'s fields (`options.py`); each subcommand that needs no model
(render, info, ...) lives in `render` and is imported only when used, so those never import
torch and `--help` is quick.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import click
import cloup

import latentmas

from ..config import RunConfig
from .options import apply_groups, missing_stack_message, option, run_settings

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": max(80, shutil.get_terminal_size().columns)}


class LazyGroup(cloup.Group):
    """A command group whose subcommands live in modules imported on first use."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


def _capture_options() -> list:
    return [
        option("--capture_file", type=click.Path(dir_okay=False), default=None,
               help="HDF5 file for the hand-off similarities. Default: captures/<run name>.h5."),
        option("--transitions", default=None, metavar="NAMES",
               help="Hand-offs to capture, comma separated, or 'all'. Default: planner_to_critic, "
                    "critic_to_refiner, refiner_to_judger."),
        option("--capture_dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
               help="Storage type of the similarity matrices."),
        option("--overwrite", is_flag=True, help="Start the capture file afresh instead of resuming it."),
    ]


def _output_options() -> list:
    return [
        option("--output_dir", type=click.Path(file_okay=False), default="runs", show_default=True,
               help="Per-problem results (JSONL) and summary go to OUTPUT_DIR/<run name>/."),
        option("--out", type=click.Path(file_okay=False), default="charts", show_default=True,
               help="Folder for the figures that --show_heatmaps and --show_heatmaps_singlelayer draw."),
    ]


def _groups(capture_only: bool) -> dict[str, list]:
    from ..methods import method_names

    override = {}
    if capture_only:  # capture watches the shared cache: only methods that have one are offered
        from .options import RegistryChoice
        override["method"] = option("--method", type=RegistryChoice(lambda: method_names(shares_cache=True)),
                                    default="latent_mas", show_default=True,
                                    help="The method whose hand-offs are captured (its agents share a KV cache).")
    groups = run_settings(override=override)
    groups["capture"] = _capture_options() + groups["capture"]
    groups["output"] = _output_options() + groups["output"]
    return groups


def _need_model_stack() -> None:
    """One line instead of a traceback when torch or transformers is missing (a render-only install)."""
    for name in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise click.ClickException(missing_stack_message(ModuleNotFoundError(name=name)))


def _execute(cfg: RunConfig, capture: bool, params: dict, render_kinds: tuple[str, ...] = ()):
    """Run (and capture, and render); turn every known failure into a one-line click error."""
    from capture.format import CaptureError
    from capture.selection import DEFAULT_TRANSITIONS, parse_transitions

    from ..models import ModelLoadError
    from ..prompts import AGENTS
    from ..tasks import TaskDataError
    from .distributed import is_main_process
    from .folders import writable_folder
    from .run import default_capture_file, run

    known = [f"{a}_to_{b}" for a, b in zip(AGENTS, AGENTS[1:])]
    out = Path(params.get("out") or "charts")
    try:
        if render_kinds and is_main_process():
            writable_folder(out, "--out")  # before the model loads, not after solving
        transitions = parse_transitions(params.get("transitions"), DEFAULT_TRANSITIONS, known)
        capture_file = Path(params.get("capture_file") or default_capture_file(cfg)) if capture else None
        summary = run(cfg, capture_file=capture_file, transitions=transitions,
                      overwrite=params.get("overwrite", False), output_dir=params["output_dir"],
                      capture_dtype=params.get("capture_dtype", "float16"))
    except (ModelLoadError, TaskDataError, CaptureError, ValueError) as error:
        from capture.text import one_line
        raise click.ClickException(one_line(error)) from None
    if not is_main_process():  # under torchrun, rank 0 alone reports (and renders the merged capture)
        return summary
    click.echo(json.dumps(summary))
    if render_kinds:
        from render import render_capture

        try:
            written = render_capture(capture_file, out_dir=out, kinds=render_kinds)
        except CaptureError as error:  # render's errors (RenderError is one) are one line
            raise click.ClickException(str(error)) from None
        click.echo(f"{len(written)} heatmaps written to {out.resolve()}/", err=True)
    return summary


# The seed's flags, and the figure kind each one draws.
SEED_FIGURE_FLAGS = {"show_heatmaps": "multi", "show_heatmaps_singlelayer": "single"}


@cloup.command("run", context_settings=CONTEXT)
@apply_groups(_groups(capture_only=False) | {"output": _output_options() + [
    option("--show_heatmaps", is_flag=True,
           help="latent_mas: capture, then draw the multi-layer heatmap of every hand-off into --out."),
    option("--show_heatmaps_singlelayer", is_flag=True,
           help="latent_mas: capture, then draw the middle-layer strip of every hand-off into --out."),
]})
def run_command(**params):
    """Solve a task with LatentMAS (or a baseline) and print a one-line JSON summary.

    Add --capture_file or a --show_heatmaps flag to capture the hand-offs too.
    """
    _need_model_stack()
    cfg = RunConfig.from_params(params)
    kinds = tuple(kind for flag, kind in SEED_FIGURE_FLAGS.items() if params.get(flag))
    if kinds and cfg.method != "latent_mas":
        raise click.UsageError(
            "--show_heatmaps/--show_heatmaps_singlelayer need --method latent_mas: heatmaps show the shared "
            f"KV cache, and {cfg.method} has none")
    _execute(cfg, capture=bool(kinds) or params.get("capture_file") is not None, params=params, render_kinds=kinds)


@cloup.command("capture", context_settings=CONTEXT)
@apply_groups(_groups(capture_only=True))
def capture_command(**params):
    """Run latent_mas and stream every hand-off's [layers x tokens] similarities into an HDF5 file.

    Rerunning the same command resumes: finished problems are kept and skipped.
    Draw the figures later, anywhere, with `latentmas render FILE`.
    """
    _need_model_stack()
    _execute(RunConfig.from_params(params), capture=True, params=params)


@cloup.command("modes", context_settings=CONTEXT)
def modes_command():
    """List the similarity modes: what their values are and their range."""
    _need_model_stack()
    from ..similarity import get_mode, mode_names

    for name in mode_names():
        mode = get_mode(name)
        low, high = mode.value_range
        prefill = ", reads the incoming prompt's prefill" if mode.needs_prefill else ""
        click.echo(f"{name:<10} {mode.label} in [{low:g}, {high:g}]{prefill}: {mode.description}")


main = LazyGroup(
    name="latentmas",
    context_settings=CONTEXT,
    help="LatentMAS agents sharing a KV cache, and heatmaps of what each agent reads.\n\n"
         "Capture on a GPU (`latentmas capture`), render anywhere (`latentmas render`).",
    lazy={"render": "render.cli:render_command", "info": "render.info:info_command",
          "view": "render.viewer.cli:view_command", "analyze": "render.analysis.cli:analyze_command",
          "compare": "render.analysis.cli:compare_command", "readout": "render.readout:readout_command"},
)

def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(f"latentmas {latentmas.__version__}")
        ctx.exit()


main.params.append(click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True,
                                callback=_print_version, help="Show the version and exit."))
main.add_command(run_command)
main.add_command(capture_command)
main.add_command(modes_command)
