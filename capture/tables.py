"""Captures as labelled tables for notebooks: a hand-off as an `xarray.DataArray`, the
problems as a `pandas.DataFrame`.

Needs the optional extra `[notebook]` (xarray, pandas); they are imported when a function
is called, so `capture` itself never needs them. No torch. Reads only through the public
`CaptureReader` / `Handoff` API (the HDF5 layout stays in `format.py`).
"""

from __future__ import annotations

import importlib

import numpy as np

EXTRA = 'pip install "latentmas[notebook]"'


class MissingExtra(ImportError):
    """An optional package that a conversion needs is not installed; the message is one line."""


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{module} is not installed; it comes with the notebook extra: {EXTRA}") from None


def segment_labels(segments, num_columns: int) -> tuple[list[str], list[str]]:
    """(agent, kind) of every column [T] from a hand-off's segments; "" where no segment covers it."""
    agents, kinds = [""] * num_columns, [""] * num_columns
    for seg in segments:
        for column in range(max(0, int(seg.start)), min(num_columns, int(seg.stop))):
            agents[column], kinds[column] = seg.agent, seg.kind
    return agents, kinds


def handoff_to_xarray(handoff):
    """`handoff.layer_similarities` [num_layers, T] as a float32 DataArray with dims ("layer", "column")
    (captures store float16 by default; float32 keeps means and sums accurate).

    Coordinates: `layer` and `column` (0-based indices), and along `column`: `position` (the
    original cache position; kNN filtering leaves gaps), `token` (text, "<latent>" for latent
    steps), `agent` and `kind` (the segment the column belongs to) and `segment` ("planner latent").
    Group by segment with `da.groupby("segment").mean()`.
    """
    xr = _require("xarray")
    values = np.asarray(handoff.layer_similarities, dtype=np.float32)
    num_layers, num_columns = values.shape
    agents, kinds = segment_labels(handoff.segments, num_columns)
    segments = [f"{a} {k}" if a else "" for a, k in zip(agents, kinds)]
    along = "column"
    return xr.DataArray(
        values, dims=("layer", along), name=handoff.name,
        coords={
            "layer": np.arange(num_layers),
            along: np.arange(num_columns),
            "position": (along, np.asarray(handoff.positions, dtype=np.int64)),
            "token": (along, np.asarray(list(handoff.tokens), dtype=object)),
            "agent": (along, np.asarray(agents, dtype=object)),
            "kind": (along, np.asarray(kinds, dtype=object)),
            "segment": (along, np.asarray(segments, dtype=object)),
        },
        attrs={"from_agent": handoff.from_agent, "to_agent": handoff.to_agent},
    )


def handoff_column_name(name: str, occurrence: int = 1) -> str:
    """Column of `problems_table` holding T of a hand-off: 'T planner_to_critic' ('… #2' when it recurs)."""
    return f"T {name}" + (f" #{occurrence}" if occurrence > 1 else "")


def problems_table(reader):
    """One row per committed problem, in file order, indexed by `number`.

    Columns: question, gold, prediction (str), correct (pandas "boolean", <NA> when unknown),
    num_handoffs, and one column per hand-off name with its T (cache columns), e.g.
    'T planner_to_critic' (<NA> for a problem without that hand-off).
    """
    pd = _require("pandas")
    rows, handoff_columns = [], {}
    for number in reader.problem_numbers:
        problem = reader.problem(number)
        row = {"number": problem.number, "question": problem.question, "gold": problem.gold,
               "prediction": problem.prediction, "correct": problem.correct,
               "num_handoffs": len(problem.handoff_names)}
        seen: dict[str, int] = {}
        for name, width in zip(problem.handoff_names, problem.handoff_columns):
            seen[name] = seen.get(name, 0) + 1
            column = handoff_column_name(name, seen[name])
            handoff_columns.setdefault(column, None)
            row[column] = width
        rows.append(row)
    base = ["number", "question", "gold", "prediction", "correct", "num_handoffs"]
    table = pd.DataFrame(rows, columns=[*base, *handoff_columns])
    table["correct"] = table["correct"].astype("boolean")
    for column in handoff_columns:
        table[column] = table[column].astype("Int64")
    table["number"] = table["number"].astype("int64")
    return table.set_index("number")
