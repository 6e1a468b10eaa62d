"""Render stage: capture files -> heatmap figures, on CPU, without torch or transformers.

Importing `render` is cheap: the public names below load their module (and matplotlib)
on first use. It never selects a matplotlib backend: figures draw on their own Agg canvas,
and in Jupyter a returned figure shows inline by itself.

    render_capture(path, out_dir="charts", ...) -> list[Path]   # every figure of a capture
    multi_layer_heatmap(layer_similarities, ...) -> Figure       # [num_layers, T] -> heatmap
    single_layer_strip(layer_similarities, ...) -> Figure        # middle layer, min-max normalised
    plot_handoff(handoff, kind="multi", ax=None, columns=None)    # either, from a capture's Handoff
        (ax=: draw into your own Axes or SubplotSpec; columns=(start, stop): a window, true column numbers)
    render_command, info_command                                 # click commands 'render' and 'info'
"""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {
    "render_capture": "batch",
    "RenderError": "batch",
    "RenderOptions": "batch",
    "figure_filename": "batch",
    "multi_layer_heatmap": "figures",
    "single_layer_strip": "figures",
    "plot_handoff": "figures",
    "NotebookFigure": "figures",
    "empty_figure": "figures",
    "normalise_row": "figures",
    "save_figure": "figures",
    "scale_for": "colormaps",
    "render_command": "cli",
    "info_command": "info",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
