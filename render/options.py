"""Click callbacks shared by the commands that read captures (render, view, analyze, compare)."""

from __future__ import annotations

import click


def check_problems(ctx, param, value):
    """`--problems 1-5,9` -> {1, 2, 3, 4, 5, 9} (None: all), or a one-line usage error."""
    from capture.selection import parse_problem_spec

    try:
        return parse_problem_spec(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None


def check_cmap(ctx, param, value):
    """A matplotlib colormap name (None stays None), or a one-line usage error suggesting close names."""
    if value is None:
        return None
    from .colormaps import UnknownColormap
    from .colormaps import check_cmap as known

    try:
        return known(value)
    except UnknownColormap as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
