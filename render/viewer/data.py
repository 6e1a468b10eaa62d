"""What the page embeds: run metadata, problems, and each hand-off encoded compactly.

Each hand-off becomes one JSON object (its own `<script type="application/json">` block,
parsed only when the page shows it):

    values     base64 of the [num_layers, T] matrix as little-endian float16, row-major
               (layer 0 first); float16 keeps cosines and attention weights in [-1, 1]
               to within 2**-12 (2.4e-4), NaN stays NaN.
    positions  [T] ints, the original cache positions.
    tokens     [T] strings.
    segments   [[agent, kind, start, stop], ...].
    readout    [T] of null or, for a latent column with a readout, {"tokens": [k strings], "probs": [k],
               "entropy": nats} (present only when the capture kept a readout).
    gaps       [[column, removed], ...] where kNN filtering removed positions (render.layout.find_gaps).
    vmin, vmax the similarity mode's own scale for this hand-off (render.colormaps.scale_for).
    min, max   the finite range of the values (null when none is finite).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import numpy as np
from matplotlib import colormaps

from capture.format import CaptureError, CaptureReader, Handoff
from render.colormaps import _GREY_CMAPS, DEFAULT_CMAP, DEFAULT_MODE, NAN_COLOR, NAN_COLOR_ON_GREY, scale_for
from render.figures import agent_color, pretty_handoff
from render.layout import find_gaps

# The colormaps the page offers (each a 256-step table); `--cmap` adds its own.
PALETTES = ("RdYlGn", "viridis", "magma", "coolwarm", "RdBu_r", "YlOrRd", "cividis", "gray")
PALETTE_STEPS = 256


class ViewerError(CaptureError):
    """Nothing to show, or a selection that matches nothing; the message is one line."""


@dataclass
class PageData:
    """meta: JSON-able run metadata and problems (no matrices); handoffs: one JSON-able dict per hand-off,
    in the order `meta["problems"][i]["handoffs"][j]["blob"]` numbers them."""

    meta: dict
    handoffs: list[dict] = field(default_factory=list)


def encode_float16(values: np.ndarray) -> str:
    """[num_layers, T] float -> base64 of its float16 little-endian bytes, row-major."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f2").tobytes()).decode("ascii")


def decode_float16(text: str, num_layers: int) -> np.ndarray:
    """The inverse of `encode_float16`: [num_layers, T] float16."""
    flat = np.frombuffer(base64.b64decode(text), dtype="<f2")
    return flat.reshape(num_layers, -1) if num_layers else flat.reshape(0, 0)


def palette(name: str) -> dict:
    """{"colors": "rrggbb" * 256, "nan": "#rrggbb"} of a matplotlib colormap."""
    rgb = colormaps[name](np.linspace(0.0, 1.0, PALETTE_STEPS))[:, :3]
    steps = np.rint(rgb * 255).astype(np.uint8)
    base = name[:-2] if name.endswith("_r") else name
    return {"colors": steps.tobytes().hex(), "nan": NAN_COLOR_ON_GREY if base.lower() in _GREY_CMAPS else NAN_COLOR}


def _hex(rgb) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _readout(handoff: Handoff) -> list:
    """Each column's latent readout for the hover (null where none); NaN entropy becomes null."""
    r = handoff.readout
    return [{"tokens": [str(t) for t in r.tokens[c]], "probs": [round(float(p), 4) for p in r.probs[c]],
             "entropy": round(float(r.entropy[c]), 4) if np.isfinite(r.entropy[c]) else None}
            if has else None for c, has in enumerate(r.has)]


def encode_handoff(handoff: Handoff, mode: str) -> dict:
    """One hand-off as the page embeds it (see the module docstring)."""
    values = np.asarray(handoff.layer_similarities, dtype=np.float32)
    scale = scale_for(mode, values)
    finite = values[np.isfinite(values)]
    gaps = find_gaps(handoff.positions)
    before = np.diff(np.concatenate([[0], np.asarray(handoff.positions, dtype=np.int64)])) - 1
    if len(handoff.positions):
        before[0] = max(int(handoff.positions[0]), 0)
    return {
        "values": encode_float16(values),
        "positions": [int(p) for p in handoff.positions],
        "tokens": [str(t) for t in handoff.tokens],
        "segments": [[s.agent, s.kind, int(s.start), int(s.stop),
                      _hex(agent_color(s.agent, s.kind))] for s in handoff.segments],
        "gaps": [[int(c), int(before[c])] for c in gaps.columns],
        **({"readout": _readout(handoff)} if handoff.readout is not None else {}),
        "vmin": scale.vmin, "vmax": scale.vmax, "label": scale.label,
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
    }


def collect(reader: CaptureReader, problems: set[int] | None = None, transitions: list[str] | None = None,
            cmap: str | None = None) -> PageData:
    """The page's data for the selected problems (numbers) and hand-offs (names); all by default.

    Raises ViewerError when the selection leaves nothing to show.
    """
    attrs = reader.attrs
    mode = str(attrs.get("similarity") or DEFAULT_MODE)
    numbers = reader.problem_numbers
    if not numbers:
        raise ViewerError(f"{reader.path} holds no committed problems yet")
    if problems is not None:
        absent = sorted(problems - set(numbers))
        numbers = [n for n in numbers if n in problems]
        if not numbers:
            from capture.format import number_ranges
            raise ViewerError(f"{reader.path} has no problem {number_ranges(absent)} "
                              f"(it holds {number_ranges(reader.problem_numbers)})")
    first = scale_for(mode, np.zeros((1, 1)))
    page = PageData(meta={
        "source": str(reader.path.name),
        "mode": mode,
        "model": str(attrs.get("model_name") or ""),
        "method": str(attrs.get("method") or ""),
        "numLayers": reader.num_layers,
        "cmap": cmap or first.cmap,
        "palettes": {name: palette(name) for name in dict.fromkeys([*PALETTES, first.cmap, cmap or DEFAULT_CMAP])},
        "problems": [],
    })
    wanted = set(transitions) if transitions is not None else None
    seen: set[str] = set()
    for number in numbers:
        summary = reader.problem(number)
        seen.update(summary.handoff_names)
        chosen = [i for i, name in enumerate(summary.handoff_names) if wanted is None or name in wanted]
        entry = {"number": number, "question": summary.question, "gold": summary.gold,
                 "prediction": summary.prediction, "correct": summary.correct, "handoffs": []}
        counts: dict[str, int] = {}
        for index, handoff in zip(chosen, reader.handoffs(number, chosen)):
            counts[handoff.name] = counts.get(handoff.name, 0) + 1
            entry["handoffs"].append({
                "name": handoff.name, "title": pretty_handoff(handoff.from_agent, handoff.to_agent),
                "index": index, "occurrence": counts[handoff.name], "columns": handoff.num_columns,
                "blob": len(page.handoffs)})
            page.handoffs.append(encode_handoff(handoff, mode))
        if entry["handoffs"]:
            page.meta["problems"].append(entry)
    if not page.handoffs:
        names = ", ".join(sorted(seen)) or "none"
        raise ViewerError(f"{reader.path} has no hand-off {', '.join(sorted(wanted or []))} in the selected "
                          f"problems (it has {names})")
    return page


def script_json(value) -> str:
    """JSON that is safe inside a `<script type="application/json">` block: no `<`, `>` or `&` appear
    literally, so no token text can close the block or open a comment."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
