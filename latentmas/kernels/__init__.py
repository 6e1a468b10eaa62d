"""Hand-written GPU kernels, each with a pure-torch reference of the same signature.

`decode_attention`: one new token per row over a static key/value buffer (flash decoding,
split over the buffer's slots), for the graph-replayed decode step.
`skinny_linear`: `x @ weight.T` for a few rows of x, streaming the weights (off unless
LATENTMAS_SKINNY_LINEAR=1; see its module for what it measured).
"""

from latentmas.kernels.decode_attention import available, decode_attention, decode_attention_reference

__all__ = ["available", "decode_attention", "decode_attention_reference"]
