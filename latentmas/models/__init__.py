"""Loading causal LMs (hub names, local folders, the built-in `tiny-qwen3`)."""

from .loading import LoadedModel, ModelLoadError, load_model, resolve_device

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_device"]
