"""`attention`: the attention probability each cached token receives from the incoming prompt."""

from __future__ import annotations

from .base import PrefillMode
from .maths import attention_received
from .query import rotated


class AttentionReceived(PrefillMode):
    name = "attention"
    description = "the attention probability each cached token receives from the incoming prompt, as the model " \
                  "computes it"
    label = "attention weight"
    value_range = (0.0, 1.0)
    colour_scale = "data"
    default_cmap = "viridis"

    def check_layer(self, module, index: int) -> None:
        """`attention_received` rebuilds plain causal softmax attention; refuse modules that do more."""
        config = getattr(module, "config", None)
        if getattr(module, "sliding_window", None):
            raise ValueError(f"layer {index} uses sliding-window attention, which 'attention' similarity does not "
                             "model")
        if getattr(module, "sinks", None) is not None:
            raise ValueError(f"layer {index} has attention sinks, which 'attention' similarity does not model")
        if getattr(config, "attn_logit_softcapping", None):
            raise ValueError(f"layer {index} soft-caps attention logits, which 'attention' similarity does not "
                             "model")

    def elements_per_layer(self, batch: int, n: int, width: int, lm) -> int:
        """The fp32 scores of one layer, `batch · heads · n · (T + n)`."""
        return batch * lm.num_heads * n * (width + n)

    def score(self, layers):
        return attention_received(rotated(layers.queries, layers.cos, layers.sin, layers.rope), layers.keys,
                                  layers.prompt_mask, layers.kv_mask, layers.scaling, layers.bias)
