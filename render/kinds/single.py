"""`single`: the middle layer as a min-max normalised strip (the seed's `--show_heatmaps_singlelayer`)."""

from __future__ import annotations

from .base import FigureKind, column_labels, readout_tokens


class SingleLayerStrip(FigureKind):
    name = "single"
    prefix = "heatmap_singlelayer_"
    description = "the middle layer, min-max normalised"
    default_cmap = "YlOrRd"

    def draw(self, handoff, *, title, mode, cmap, options, notes=()):
        from ..figures import single_layer_strip

        return single_layer_strip(handoff.layer_similarities, title=title, segments=handoff.segments,
                                  positions=handoff.positions, tokens=column_labels(handoff), mode=mode,
                                  cmap=cmap or self.default_cmap, dpi=options.dpi,
                                  token_labels=options.token_labels, notes=notes,
                                  x_axis=options.x_axis, readout_tokens=readout_tokens(handoff))
