"""The `latentmas` command: run, capture, render, info. Also what `python run.py` calls.

Each subcommand is imported only when used, so `latentmas render` never
imports torch and `--help` is quick.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import click

from .config import KNN_STRATEGIES, PROMPTS, RunConfig
from .methods import METHODS
from .similarity import MODES as SIMILARITY_MODES

TASKS = ("gsm8k", "gpqa", "medqa", "arc_easy", "arc_challenge", "aime2024", "aime2025")


class LazyGroup(click.Group):
    """A click group whose subcommands live in modules imported on first use."""

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


def _option(*names, **kwargs):
    """An option spelled as in the seed (`--model_name`) that also accepts `--model-name`."""
    dashed = [n.replace("_", "-") for n in names if "_" in n]
    return click.option(*names, *dashed, **kwargs)


RUN_OPTIONS = [
    _option("--method", type=click.Choice(METHODS), default="latent_mas", show_default=True,
            help="baseline: one agent; text_mas: agents pass text; latent_mas: agents share a KV cache."),
    _option("--model_name", default="tiny-qwen3", show_default=True,
            help="Hugging Face model id or local folder; 'tiny-qwen3' is the built-in offline model."),
    _option("--task", type=click.Choice(TASKS), default="gsm8k", show_default=True),
    _option("--data_file", type=click.Path(exists=True, dir_okay=False), default=None,
            help="Local JSONL/JSON with the dataset's own fields. Default: the hub, else bundled samples."),
    _option("--max_samples", type=click.IntRange(min=-1), default=-1, show_default=True,
            help="Number of problems; -1 = all."),
    _option("--prompt", type=click.Choice(PROMPTS), default="sequential", show_default=True,
            help="Agent topology."),
    _option("--think", is_flag=True, help="Let agents open a <think> block (Qwen3 thinking mode)."),
    _option("--latent_steps", type=click.IntRange(min=0), default=10, show_default=True,
            help="Latent steps per non-judger agent."),
    _option("--latent_space_realign", is_flag=True,
            help="Map hidden states back to the input-embedding space before feeding them in."),
    _option("--max_new_tokens", type=click.IntRange(min=1), default=2048, show_default=True),
    _option("--temperature", type=click.FloatRange(min=0), default=0.6, show_default=True,
            help="0 = greedy."),
    _option("--top_p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True),
    _option("--generate_bs", type=click.IntRange(min=1), default=1, show_default=True,
            help="Problems per batch."),
    _option("--seed", type=int, default=42, show_default=True),
    _option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    _option("--text_mas_context_length", type=click.IntRange(min=1), default=2048, show_default=True,
            help="text_mas: most tokens of earlier agents' text passed on."),
    _option("--knn_filter", is_flag=True, help="Trim the shared cache before each hand-off."),
    _option("--knn_percentage", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
            help="Fraction of cached tokens kept, in (0, 1]."),
    _option("--knn_min_keep", type=click.IntRange(min=0), default=5, show_default=True,
            help="The most recent tokens always kept."),
    _option("--knn_strategy", type=click.Choice(KNN_STRATEGIES), default="top", show_default=True,
            help="Which older tokens to keep: most similar, least similar, or random."),
    _option("--knn_score", type=click.Choice(SIMILARITY_MODES), default="seed", show_default=True,
            help="The similarity (middle layer) that ranks tokens for --knn_strategy top/bottom. query and "
                 "attention cost a scoring pass: the incoming prompt is run on the cache up to the middle "
                 "layer before the trim, then the cache is put back."),
    _option("--random_weights", is_flag=True,
            help="Benchmarks: build the model from its config with seeded random weights (no weights needed)."),
    _option("--ignore_eos", is_flag=True, help="Benchmarks: always decode max_new_tokens."),
    click.option("--fast_decode/--plain_decode", "--fast-decode/--plain-decode", "fast_decode", default=None,
                 help="Run decoding and latent steps on a static KV buffer replayed as a CUDA graph "
                      "(default: on CUDA only)."),
    _option("--output_dir", type=click.Path(file_okay=False), default="runs", show_default=True,
            help="Per-problem results (JSONL) and summary go to OUTPUT_DIR/<run name>/."),
]

CAPTURE_OPTIONS = [
    _option("--capture_file", type=click.Path(dir_okay=False), default=None,
            help="HDF5 file for the hand-off similarities. Default: captures/<run name>.h5."),
    _option("--transitions", default=None,
            help="Hand-offs to capture, comma separated (planner_to_critic,critic_to_refiner,"
                 "refiner_to_judger, the default), or 'all'."),
    _option("--similarity", type=click.Choice(SIMILARITY_MODES), default="seed", show_default=True,
            help="How a query is compared with cached keys. seed: mean prompt embedding vs head-averaged keys "
                 "(cosine); query: the incoming agent's real attention queries vs its GQA group's keys "
                 "(cosine); attention: the attention weight each cached token gets from the prompt."),
    _option("--capture_dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True),
    _option("--overwrite", is_flag=True, help="Start the capture file afresh instead of resuming it."),
]


def _apply(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _config(params: dict) -> RunConfig:
    fields = set(RunConfig.__dataclass_fields__)
    return RunConfig(**{k: v for k, v in params.items() if k in fields})


def _execute(cfg: RunConfig, capture: bool, params: dict, render_kinds: tuple[str, ...] = ()):
    """Run (and capture, and render); turn every known failure into a one-line click error."""
    from capture.format import CaptureError
    from capture.recorder import parse_transitions

    from .distributed import is_main_process
    from .models import ModelLoadError
    from .runner import default_capture_file, run
    from .tasks import TaskDataError

    try:
        transitions = parse_transitions(params.get("transitions"))
        capture_file = None
        if capture:
            capture_file = Path(params.get("capture_file") or default_capture_file(cfg))
        summary = run(cfg, capture_file=capture_file, transitions=transitions,
                      overwrite=params.get("overwrite", False), output_dir=params["output_dir"],
                      capture_dtype=params.get("capture_dtype", "float16"))
    except (ModelLoadError, TaskDataError, CaptureError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    if not is_main_process():  # under torchrun, rank 0 alone reports (and renders the merged capture)
        return summary
    click.echo(json.dumps(summary))
    if render_kinds:
        from render import render_capture

        written = render_capture(capture_file, out_dir="charts", kinds=render_kinds)
        click.echo(f"{len(written)} heatmaps written to {Path('charts').resolve()}/", err=True)
    return summary


@click.command("run")
@_apply(RUN_OPTIONS + CAPTURE_OPTIONS)
@_option("--show_heatmaps", is_flag=True,
         help="latent_mas: capture, then draw the multi-layer heatmap of every hand-off into charts/.")
@_option("--show_heatmaps_singlelayer", is_flag=True,
         help="latent_mas: capture, then draw the middle-layer strip of every hand-off into charts/.")
def run_command(show_heatmaps, show_heatmaps_singlelayer, **params):
    """Solve a task with LatentMAS (or a baseline) and print a one-line JSON summary.

    Add --capture_file or a --show_heatmaps flag to capture the hand-offs too.
    """
    cfg = _config(params)
    kinds = tuple(k for k, on in (("multi", show_heatmaps), ("single", show_heatmaps_singlelayer)) if on)
    if kinds and cfg.method != "latent_mas":
        raise click.UsageError(
            "--show_heatmaps/--show_heatmaps_singlelayer need --method latent_mas: heatmaps show the shared "
            f"KV cache, and {cfg.method} has none")
    _execute(cfg, capture=bool(kinds) or params.get("capture_file") is not None, params=params, render_kinds=kinds)


@click.command("capture")
@_apply(RUN_OPTIONS + CAPTURE_OPTIONS)
def capture_command(**params):
    """Run latent_mas and stream every hand-off's [layers x tokens] similarities into an HDF5 file.

    Rerunning the same command resumes: finished problems are kept and skipped.
    Draw the figures later, anywhere, with `latentmas render FILE`.
    """
    cfg = _config(params)
    if cfg.method != "latent_mas":
        raise click.UsageError(f"capture needs --method latent_mas ({cfg.method} shares no KV cache)")
    _execute(cfg, capture=True, params=params)


main = LazyGroup(
    name="latentmas",
    help="LatentMAS agents sharing a KV cache, and heatmaps of what each agent reads.\n\n"
         "Capture on a GPU (`latentmas capture`), render anywhere (`latentmas render`).",
    lazy={"render": "render.cli:render_command", "info": "render.info:info_command",
          "analyze": "render.analysis.cli:analyze_command",
          "compare": "render.analysis.cli:compare_command"},
)
main.add_command(run_command)
main.add_command(capture_command)
