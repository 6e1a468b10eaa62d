"""`latentmas info`: what a capture holds (run metadata, then one row per committed problem).

`describe(path)` builds the text, `describe_json(path)` the same as a JSON-able dict for
scripts, `describe_problem(path, number)` one problem's hand-offs; `info_command` prints
them. Text from the file is shown as text: control characters (terminal escape
sequences, newlines) are replaced before anything reaches the terminal. No torch.
"""

from __future__ import annotations

import json
import re
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
# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def safe(value, width: int | None = None) -> str:
    """`value` as one line of plain text for a terminal: every control character shown as `\\xNN`/`\\uNNNN`,
    cut to `width` characters with an ellipsis."""
    text = " ".join(str(value).split())
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _lookup(attrs: dict, config: dict, keys) -> object:
    for key in keys:
        for source in (attrs, config):
            if key in source and source[key] not in (None, ""):
                return source[key]
    return None


def _correct_text(correct) -> str:
    return {True: "yes", False: "no", None: "?"}[correct]


def describe(path) -> str:
    """The text `info` prints: run metadata, then one row per committed problem."""
    from capture.format import CaptureReader

    lines = []
    with CaptureReader(path) as reader:
        attrs, config = reader.attrs, reader.config
        used = {"schema_version", "config"}
        lines.append(f"Capture: {safe(reader.path)}")
        lines.append(f"  {'schema':<13} {attrs.get('schema_version')}")
        for label, keys in _FIELDS:
            value = _lookup(attrs, config, keys)
            used.update(keys)
            if label == "layers":
                value = f"{reader.num_layers} ({reader.similarity_dtype} similarities)"
            elif label == "similarity" and value is None:
                value = "seed (not recorded; assumed)"
            if value is not None:
                lines.append(f"  {label:<13} {safe(value, 60)}")
            elif label in _ALWAYS:
                lines.append(f"  {label:<13} (not recorded)")
        knn = {k: v for k, v in {**config, **attrs}.items() if k.lower().startswith("knn")}
        used.update(knn)
        knn_text = ", ".join(f"{safe(k)}={safe(v, 20)}" for k, v in sorted(knn.items())) or "(not recorded)"
        lines.append(f"  {'kNN':<13} {knn_text}")
        if config:
            lines.append(f"  {'config':<13} {safe(json.dumps(config, sort_keys=True), 100)}")
        finished = reader.finished_at
        lines.append(f"  {'finished':<13} {safe(finished) if finished else 'no (still running, or stopped early)'}")
        summary = reader.summary
        if summary:
            lines.append(f"  {'summary':<13} {safe(json.dumps(summary, sort_keys=True), 100)}")
        others = {k: v for k, v in attrs.items() if k not in used}
        for key in sorted(others):
            lines.append(f"  {safe(key, 13):<13} {safe(others[key], 60)}")
        problems = reader.problems()
        lines.append(f"  {'problems':<13} {len(problems)} committed")
        lines.append("")
        header = f"{'problem':>7}  {'gold':<14} {'prediction':<14} {'correct':<7}  hand-offs (T)"
        lines.append(header)
        lines.append("-" * len(header))
        for p in problems:
            handoffs = ", ".join(f"{safe(name)} {width}" for name, width in zip(p.handoff_names, p.handoff_columns))
            lines.append(f"{p.number:>7}  {safe(p.gold, 14):<14} {safe(p.prediction, 14) or '-':<14} "
                         f"{_correct_text(p.correct):<7}  {handoffs or '-'}")
        if not problems:
            lines.append("(no committed problems yet)")
    return "\n".join(lines)


def describe_json(path) -> dict:
    """What `info --json` prints: {"path", "attrs", "config", "finished_at", "summary", "num_layers",
    "similarity_dtype", "problems": [{"number", "question", "gold", "prediction", "correct",
    "handoffs": [{"name", "columns"}]}]}. Strings are the file's, unchanged (JSON escapes them)."""
    from capture.format import CaptureReader

    with CaptureReader(path) as reader:
        return {
            "path": str(reader.path), "attrs": reader.attrs, "config": reader.config,
            "finished_at": reader.finished_at, "summary": reader.summary, "num_layers": reader.num_layers,
            "similarity_dtype": reader.similarity_dtype,
            "problems": [{"number": p.number, "question": p.question, "gold": p.gold, "prediction": p.prediction,
                          "correct": p.correct,
                          "handoffs": [{"name": n, "columns": t} for n, t in zip(p.handoff_names, p.handoff_columns)]}
                         for p in reader.problems()],
        }


def describe_problem(path, number: int) -> str:
    """One problem: its question and answers, then each hand-off with its shape, value range,
    NaN and ±Inf cells, and segments, then each agent's latent readout as a line (when the file has one)."""
    import numpy as np

    from capture.format import CaptureReader

    with CaptureReader(path) as reader:
        p = reader.problem(number)
        lines = [f"Problem {p.number} of {safe(reader.path)}",
                 f"  {'question':<11} {safe(p.question, 200)}",
                 f"  {'gold':<11} {safe(p.gold, 60)}",
                 f"  {'prediction':<11} {safe(p.prediction, 60) or '-'}",
                 f"  {'correct':<11} {_correct_text(p.correct)}", ""]
        for place, handoff in enumerate(reader.handoffs(number)):
            values = handoff.layer_similarities.astype(np.float64)
            finite = values[np.isfinite(values)]
            value_range = f"[{finite.min():.3f}, {finite.max():.3f}]" if finite.size else "(no finite values)"
            layers, width = values.shape
            flags = [f"{handoff.nan_cells} NaN"] if handoff.nan_cells else []
            if handoff.infinite_cells:
                flags.append(f"{handoff.infinite_cells} ±Inf (not similarities)")
            lines.append(f"  {place}: {safe(handoff.name)}  {layers} layers x T = {width}  values {value_range}"
                         + (f"  {', '.join(flags)}" if flags else ""))
            for seg in handoff.segments:
                lines.append(f"       columns {seg.start}-{seg.stop}: {safe(seg.agent, 30)} {safe(seg.kind, 10)}")
        if not p.handoff_names:
            lines.append("  (no hand-offs)")
        from .readout import latent_steps, readout_lines

        readout = readout_lines(latent_steps(reader, number)) if reader.readout_top_k else []
        if readout:
            lines += ["", "  latent readout (each step's most likely next token):"]
            lines += [f"    {line}" for line in readout]
    return "\n".join(lines)


@click.command("info")
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object (for scripts).")
@click.option("--problem", "problem", type=int, default=None, metavar="N",
              help="Show problem N: its question and answers, and each hand-off's shape, range, NaN/±Inf cells "
                   "and segments.")
def info_command(capture, as_json, problem):
    """Show a capture's run metadata and its problems with their hand-offs."""
    from capture.format import CaptureError
    from capture.text import one_line
    try:
        if as_json:
            data = describe_json(capture)
            if problem is not None:
                data["problems"] = [p for p in data["problems"] if p["number"] == problem]
                if not data["problems"]:
                    describe_problem(capture, problem)  # raises the one-line "has no problem N"
            text = json.dumps(data, ensure_ascii=True, sort_keys=True)
        elif problem is not None:
            text = describe_problem(capture, problem)
        else:
            text = describe(capture)
    except CaptureError as error:
        raise click.ClickException(safe(error)) from None
    except (OSError, KeyError, ValueError) as error:
        raise click.ClickException(f"{safe(capture)} could not be read ({safe(one_line(error))})") from None
    click.echo(text)
