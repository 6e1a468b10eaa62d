"""LatentMAS: LLM agents that hand work to each other through a shared KV cache.

Importing this package is cheap and never imports torch: the heavy modules
(`latentmas.methods`, `latentmas.models`) are imported where they are used.
"""

__version__ = "0.1.0"
