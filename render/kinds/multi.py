"""`multi`: every layer's similarity to every cached token (the seed's `--show_heatmaps`)."""

from __future__ import annotations

from .base import FigureKind, column_labels, readout_tokens


class MultiLayerHeatmap(FigureKind):
    name = "multi"
    prefix = "heatmap_"
    description = "all layers, on the similarity mode's own scale"

    def draw(self, handoff, *, title, mode, cmap, options, notes=()):
        from ..figures import multi_layer_heatmap

        return multi_layer_heatmap(handoff.layer_similarities, title=title, segments=handoff.segments,
                                   positions=handoff.positions, tokens=column_labels(handoff), mode=mode, cmap=cmap,
                                   vmin=options.vmin, vmax=options.vmax, dpi=options.dpi,
                                   token_labels=options.token_labels, notes=notes,
                                   x_axis=options.x_axis, readout_tokens=readout_tokens(handoff))
