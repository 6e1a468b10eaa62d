"""What a similarity mode is, and the registry every mode joins by subclassing.

A mode says how an incoming agent's query is compared with every cached key, at every
layer, and describes its values so that the capture file (and so render) knows their
range and colour scale without guessing from the name. Two families, each with one
`score(...)`:

- `HandoffMode`: computed from the cache at the hand-off (`score(keys, query)`);
- `PrefillMode`: computed from the incoming agent's own prompt prefill, layer by layer,
  through forward hooks (`latentmas.prefill.PrefillProbe` calls `score(layers)`).

A subclass with a `name` registers itself (`__init_subclass__`; one without `score` fails
there, as an abstract class); `unregister(name)` takes it out again (tests that add a toy mode).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

_REGISTRY: dict[str, SimilarityMode] = {}


class SimilarityMode(ABC):
    """Base class of similarity modes; subclasses set the class attributes and `score`.

    name: the `--similarity` / `--knn_score` value.
    description: one line for `--help` and `latentmas modes`.
    label: what the values are ("cosine similarity"), the colour bar's label.
    value_range: (low, high) the values can take.
    colour_scale: "fixed" (draw on value_range) or "data" (value_range's low to the data's max).
    default_cmap: matplotlib colormap of the multi-layer heatmap.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    label: ClassVar[str] = "similarity"
    value_range: ClassVar[tuple[float, float]] = (-1.0, 1.0)
    colour_scale: ClassVar[str] = "fixed"
    default_cmap: ClassVar[str] = "RdYlGn"
    needs_prefill: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.colour_scale not in ("fixed", "data"):
                raise ValueError(f"similarity mode {cls.name!r}: colour_scale must be 'fixed' or 'data'")
            _REGISTRY[cls.name] = cls()

    def file_attributes(self) -> dict:
        """What a capture file records about its mode (render reads these)."""
        low, high = self.value_range
        return {"similarity": self.name, "similarity_label": self.label, "similarity_min": float(low),
                "similarity_max": float(high), "similarity_colour_scale": self.colour_scale,
                "similarity_cmap": self.default_cmap}

    def __repr__(self) -> str:
        return f"<similarity mode {self.name!r}: {self.label} in {self.value_range}>"


class HandoffMode(SimilarityMode):
    """A mode known at the hand-off, from the cached keys and the prompt's mean embedding."""

    @abstractmethod
    def score(self, keys, query):
        """keys: per layer `[batch, kv_heads, T, head_dim]`; query: `[batch, hidden]`, the incoming
        prompt's mean input embedding. -> float32 `[batch, num_layers, T]`."""


class PrefillMode(SimilarityMode):
    """A mode read from the incoming agent's prompt prefill on the cache."""

    needs_prefill = True

    def check_layer(self, module, index: int) -> None:
        """Raise ValueError (one line) if attention module `module` (layer `index`) cannot be read."""

    def elements_per_layer(self, batch: int, n: int, width: int, lm) -> int:
        """Elements one layer's scoring holds at once (the probe stacks layers up to a budget).
        Default: the layer's queries and keys, `batch · (kv_heads · (T + n) + heads · n) · head_dim`."""
        return batch * (lm.num_kv_heads * (width + n) + lm.num_heads * n) * lm.head_dim

    @abstractmethod
    def score(self, layers):
        """layers: `latentmas.prefill.PrefillLayers` (one or several layers stacked along the batch
        axis). -> float32 `[batch', T]`."""


def get_mode(name: str) -> SimilarityMode:
    """The registered mode called `name`; ValueError (one line) naming the choices otherwise."""
    _builtin()

    if name not in _REGISTRY:
        raise ValueError(f"unknown similarity mode {name!r}; choose from {', '.join(mode_names())}")
    return _REGISTRY[name]


def mode_names() -> tuple[str, ...]:
    """Every registered mode, the built-in ones first."""
    _builtin()
    rank = {name: i for i, name in enumerate(BUILTIN)}
    return tuple(sorted(_REGISTRY, key=lambda name: rank.get(name, len(BUILTIN))))  # then by registration


BUILTIN = ("seed", "query", "attention")


def _builtin() -> None:
    """Import the built-in modes (they register themselves)."""
    from . import attention, query, seed  # noqa: F401


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)
