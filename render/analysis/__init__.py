"""Analysis of capture files: the questions the heatmaps are drawn for, as tables and figures.

Every computation is a plain function returning pandas tables and matplotlib figures, so a
notebook gets what `latentmas analyze` / `latentmas compare` write:

    analyze_capture(path, ...) -> Analysis       # .profile, .distributions, .top_tokens, .bands,
                                                 # .readout_tokens (latent readout), .figures()
    compare_captures(a, b, ...) -> Comparison    # .table, .layers, .knn (kNN-dropped report), .figures()
    write_analysis(result, out) / write_comparison(result, out)  # CSV, JSON and PNG into a folder
    find_bands(matrix, BandRule()) -> list[Band] # one [num_layers, T] matrix

See docs/analysis.md. Importing this package is cheap; the names load their module on first use.
"""

from __future__ import annotations

from render.lazy import lazy_exports

_EXPORTS = {
    "analyze_capture": "analyze",
    "Analysis": "analyze",
    "compare_captures": "compare",
    "Comparison": "compare",
    "wasserstein_by_layer": "compare",
    "write_analysis": "report",
    "write_comparison": "report",
    "find_bands": "bands",
    "BandRule": "bands",
    "Band": "bands",
    "AnalysisError": "source",
    "comparable_strip": "scales",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
