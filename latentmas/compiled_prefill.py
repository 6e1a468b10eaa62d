"""Prompt prefills through torch.compile (`--compile_prefill`, off by default).

An eager prefill on Qwen3-4B is bound by the host at small batches: transformers' forward
issues each layer's many small ops from Python (about 50 that run kernels per layer: the four
RMSNorms, RoPE, SiLU-mul and residual adds op by op). On an H200 at batch size 1 the four prompt prefills of a
problem took 290 ms of wall time (`bench/phase_profile.py --batch_size 1`, session 16) while the
whole problem kept the GPU busy for 1,007 of its 1,341 ms.

Compiled regionally: the decoder layers share one compiled forward (`compiled_layer_forward`,
dynamic shapes), which `compiled_layers` puts in place of each layer's own for one forward pass
and takes away after. The layers are one code, so they share the compiled graphs; a layer's own
index is not baked in (`allow_unspec_int_on_nn_module`) and its cache write
(`kv_storage.BufferCache.update`) runs eagerly between the layer's two compiled pieces, so
nothing compiles once per layer. What compiles apart is what makes other graphs: batch size 1
against more, the first prefill on an empty cache (no mask) against the others. Compiling the
whole decoder instead (session 16) took about 2 to 2.5 min per graph for Qwen3-4B on an H200, so
a layer's graphs should compile in a small part of that. Measured on an H200 (session 18,
`bench/prefill_probe.py --compiled`, ms per prefill, eager against compiled): 43-55 against 32-36
at batch size 1, 92-94 against 109-124 at 16, 334-346 against 396-471 at 64; the first compile
took 16 to 24 s. The host time fell at every batch size, but above batch size 1 the wall time
rose: a profile at 64 (2026-12-04) put 256 of its 473 GPU ms in one inductor kernel per layer
that fused transformers' `repeat_kv` with padding the additive mask, 3.55 ms a call. With
grouped-query prefill attention on unrepeated keys (`prefill_attention`, which `extend` puts in
place whatever compiles it) the same probe measured, eager against compiled, 87-93 against
59-65 ms at 16 and 323-333 against 239-242 ms at 64 (first compile 23 s); small batches prefill
as replayed CUDA-graph chunks (`graph_prefill`) before this applies. Still off by default: the
first compile costs more than a short run saves.

A forward with hooks on any module (capture's prefill probes for the `query` and `attention`
modes, `latentmas.prefill`) runs eagerly: the compiled forward would have to trace the hooks,
which capture adds anew for every watched prefill. Logits come from the model's output embedding
applied to the last hidden state, as the causal-LM heads of the supported families compute
them; a model whose head does more (`UNPLAIN_HEAD`) prefills eagerly when logits are asked for.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

BACKEND = "inductor"  # tests swap in a counting backend
RECOMPILE_LIMIT = 32  # compiled entries dynamo keeps per code object (its default is 8)
UNPLAIN_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config keys of heads that do more

_COMPILED: dict = {}  # decoder layer class -> its compiled forward


def allow_recompiles() -> None:
    """Let dynamo keep `RECOMPILE_LIMIT` entries per code object: the compiled steps (`fast_decode`) and
    prefills keep one per model, kind and batch size 1 or more, beside other code's."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compiled_layer_forward(layer_class: type):
    """`layer_class.forward` compiled with dynamic shapes, once per class; called as `(layer, *args)`."""
    if layer_class not in _COMPILED:
        allow_recompiles()
        _COMPILED[layer_class] = torch.compile(layer_class.forward, backend=BACKEND, dynamic=True)
    return _COMPILED[layer_class]


@contextlib.contextmanager
def compiled_layers(decoder: nn.Module) -> Iterator[None]:
    """Inside the block, every layer of `decoder.layers` runs the compiled forward of its class."""
    layers = list(decoder.layers)
    own = [vars(layer).get("forward") for layer in layers]  # a forward set on the layer itself, if any
    for layer in layers:
        layer.forward = functools.partial(compiled_layer_forward(type(layer)), layer)
    try:
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's own again
            else:
                layer.forward = forward


def hooked(model: nn.Module) -> bool:
    """Whether a forward of `model` would call hooks (on any of its modules, or global ones)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def plain_head(model: nn.Module) -> nn.Module | None:
    """The output embedding when `model`'s logits are exactly it applied to the last hidden state, else None."""
    if any(getattr(model.config, key, None) for key in UNPLAIN_HEAD):
        return None
    return model.get_output_embeddings()


def compiled_forward(model: nn.Module, decoder: nn.Module, kwargs: dict, logits: bool) -> torch.Tensor | None:
    """The last column's final hidden state `[batch, hidden]` (or logits `[batch, vocab]`) of
    `decoder(**kwargs)` with compiled layers; None where the forward must run eagerly (hooks, a head
    that does more)."""
    head = plain_head(model) if logits else None
    if hooked(model) or (logits and head is None):
        return None
    with compiled_layers(decoder):
        hidden = decoder(**kwargs).last_hidden_state[:, -1:, :]
    return head(hidden)[:, -1, :] if logits else hidden[:, -1, :]
