"""`latentmas info`: what a capture holds (run metadata, then one row per committed problem).

`describe(path)` builds the text; `info_command` prints it. No torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

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


