"""What a figure kind is, and the registry every kind joins by subclassing.

A kind draws one hand-off as one figure: `draw(handoff, ...)` is a plain function of the
hand-off's arrays (`layer_similarities [num_layers, T]`, positions, tokens, segments). Its
`prefix` starts the file name (`heatmap_planner_to_critic_problem3.png` for "multi").
A subclass with a `name` registers itself; `unregister(name)` takes it out again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

_REGISTRY: dict[str, FigureKind] = {}


class FigureKind(ABC):
    """Base class of figure kinds.

    name: the `--kind` value; prefix: the file-name prefix; description: one line for `--help`.
    default_cmap: the colormap when none is given (None: the similarity mode's own).
    """

    name: ClassVar[str]
    prefix: ClassVar[str]
    description: ClassVar[str] = ""
    default_cmap: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls()

    @abstractmethod
    def draw(self, handoff, *, title: str, mode, cmap: str | None, options, notes=()):
        """The Figure of `handoff` (a `capture.format.Handoff`).

        mode: the capture's `ModeScale` (name, value range, colour scale); cmap: the user's colormap
        or None; options: the `RenderOptions` (vmin, vmax, dpi, token_labels, ...).
        """

    def __repr__(self) -> str:
        return f"<figure kind {self.name!r}>"


def get_kind(name: str) -> FigureKind:
    """The registered kind `name`; ValueError (one line) naming the choices otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown figure kind {name!r}; choose from {', '.join(kind_names())}")
    return _REGISTRY[name]


def kind_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def column_labels(handoff) -> list[str]:
    """The hand-off's tokens [T], each latent column's read as its top readout token in brackets
    ("[18]") when the capture kept a readout; what `--token-labels` writes under the columns."""
    readout = getattr(handoff, "readout", None)
    if readout is None or not readout.top_k:
        return list(handoff.tokens)
    return [f"[{readout.tokens[c][0]}]" if has else token
            for c, (token, has) in enumerate(zip(handoff.tokens, readout.has))]


def readout_tokens(handoff) -> list[str] | None:
    """Each column's top readout token [T] ("" where none), or None when the capture kept no readout:
    what the segment band carries when `--token-labels` do not fit."""
    readout = getattr(handoff, "readout", None)
    if readout is None or not readout.top_k:
        return None
    return [readout.tokens[c][0] if has else "" for c, has in enumerate(readout.has)]
