"""Writing an analysis or a comparison: its folder (never another run's), CSV tables, JSON and figures."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from ..output_files import write_atomically
from .source import AnalysisError

DEFAULT_ROOT = Path("charts")
ANALYSIS_JSON = "analysis.json"
COMPARE_JSON = "compare.json"


def _identity(captures: Iterable) -> list[str]:
    return [str(Path(c).resolve()) for c in captures]


def _owner(folder: Path, marker: str) -> list[str] | None:
    """The captures whose results `folder` holds (from its JSON), None when it holds none."""
    try:
        stored = json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return None
    captures = stored.get("captures") if isinstance(stored, dict) else None
    return [str(c) for c in captures] if isinstance(captures, list) else None


def output_folder(captures, marker: str, out: Path | None = None) -> Path:
    """Where the results of `captures` go.

    Default: charts/<stem>/analysis/ (one capture) or charts/compare_<a>_vs_<b>/ (two); when that
    folder already holds the results of other captures (same stem, other folder), '_2', '_3', ... is
    added. An explicit `out` holding other captures' results is refused (one line).
    """
    wanted = _identity(captures)
    if out is not None:
        out = Path(out)
        owner = _owner(out, marker)
        if owner is not None and owner != wanted:
            raise AnalysisError(f"{out} holds the results of {', '.join(owner)}; pass another --out")
        return out
    stems = [Path(c).stem or "capture" for c in captures]
    for attempt in range(1, 1000):
        suffix = "" if attempt == 1 else f"_{attempt}"
        if len(stems) == 1:
            folder = DEFAULT_ROOT / f"{stems[0]}{suffix}" / "analysis"
        else:
            folder = DEFAULT_ROOT / f"compare_{stems[0]}_vs_{stems[1]}{suffix}"
        owner = _owner(folder, marker)
        if owner is None and folder.exists() and any(folder.iterdir()):
            continue  # something else lives there
        if owner is None or owner == wanted:
            return folder
    raise AnalysisError(f"no free output folder under {DEFAULT_ROOT} for {', '.join(stems)}; pass --out")


def _make(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnalysisError(f"cannot create output folder {folder}: {error.strerror or error}") from None


def write_tables(folder: Path, tables: dict) -> list[Path]:
    """Each DataFrame to `folder/<name>` (CSV, no index)."""
    written = []
    for name, table in tables.items():
        written.append(write_atomically(folder / name, lambda tmp, table=table: table.to_csv(tmp, index=False)))
    return written


def write_json(path: Path, data: dict, captures) -> Path:
    data = {"captures": _identity(captures), **data}
    text = json.dumps(data, indent=1, default=_plain, allow_nan=False)
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def _plain(value):
    """JSON for numpy scalars and paths (NaN was already turned into null by the tables' to_json)."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_figures(folder: Path, figures, count: int, progress: bool = True, dpi: float = 100) -> list[Path]:
    """Save (file name, Figure) pairs as PNG, dropping each after it is written."""
    from tqdm import tqdm

    from render.figures import save_figure

    written = []
    with tqdm(total=count, desc="figures", unit="fig", file=sys.stderr, disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for name, fig in figures:
            written.append(write_atomically(folder / name,
                                            lambda tmp, fig=fig: save_figure(fig, tmp, "png", dpi)))
            bar.update(1)
    return written


def _clean_json(data):
    """NaN and infinities -> None, recursively (JSON has no NaN)."""
    import math

    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _clean_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean_json(v) for v in data]
    return data


def write_analysis(result, out: Path | None = None, progress: bool = True,
                   figures: bool = True) -> tuple[Path, list[Path]]:
    """Write an `Analysis` (tables, analysis.json and, with `figures`, the figures); returns (folder, files)."""
    folder = output_folder([result.capture], ANALYSIS_JSON, out)
    _make(folder)
    write_json(folder / ANALYSIS_JSON, {"status": "being written"}, [result.capture])  # claims the folder
    written = write_tables(folder, {
        "layer_segment_profile.csv": result.profile,
        "layer_segment_profile_per_problem.csv": result.profile_per_problem,
        "distributions.csv": result.distributions,
        "top_tokens.csv": result.top_tokens,
        "top_tokens_by_string.csv": result.top_tokens_by_string,
        "bands.csv": result.bands,
        "band_layers.csv": result.band_layers,
        "band_segments.csv": result.band_segments,
        **({"readout_agents.csv": result.readout_agents, "readout_tokens.csv": result.readout_tokens,
            "readout_entropy.csv": result.readout_entropy} if result.has_readout else {}),
    })
    if figures:
        written += write_figures(folder, result.figures(), result.num_figures, progress)
    written.append(write_json(folder / ANALYSIS_JSON, _clean_json(result.summary()), [result.capture]))
    return folder, written


def write_comparison(result, out: Path | None = None, progress: bool = True,
                     figures: bool = True) -> tuple[Path, list[Path]]:
    """Write a `Comparison` (tables, compare.json and, with `figures`, the figures); returns (folder, files)."""
    folder = output_folder([result.a, result.b], COMPARE_JSON, out)
    _make(folder)
    write_json(folder / COMPARE_JSON, {"status": "being written"}, [result.a, result.b])  # claims the folder
    tables = {"compare.csv": result.table, "compare_layers.csv": result.layers}
    if result.knn is not None:
        tables.update({"knn_dropped.csv": result.knn.dropped, "knn_summary.csv": result.knn.summary,
                       "knn_dropped_by_segment.csv": result.knn.by_segment})
    written = write_tables(folder, tables)
    if figures:
        written += write_figures(folder, result.figures(), result.num_figures, progress)
    written.append(write_json(folder / COMPARE_JSON, _clean_json(result.summary()), [result.a, result.b]))
    return folder, written
