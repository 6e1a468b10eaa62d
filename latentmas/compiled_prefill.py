"""Prompt prefills through torch.compile (`--compile_prefill`, off by default).

An eager prefill on Qwen3-4B is bound by the host at small batches: transformers' forward
issues each layer's many small ops from Python. On an H200 at batch size 1 the four prompt
prefills of a problem took 290 ms of wall time (`bench/phase_profile.py --batch_size 1`,
session 16) while the whole problem kept the GPU busy for 1,007 of its 1,341 ms. Compiled, the
decoder runs as fused kernels launched from generated code; how much faster that is has not been
measured yet (the device time ran out while it compiled).

One compiled decoder per model (`compiled_decoder`), with dynamic shapes: the prompt's length,
the cache's length and the batch size vary from prefill to prefill (batch size 1 and an empty
cache compile apart). The cache is transformers' API over the shared storage
(`kv_storage.BufferCache`), which dynamo traces; its writes land in the storage as in eager mode.

A forward with hooks on any module (capture's prefill probes for the `query` and `attention`
modes, `latentmas.prefill`) runs eagerly: the compiled forward would have to trace the hooks,
which capture adds anew for every watched prefill. Logits come from the model's output embedding
applied to the last hidden state, as the causal-LM heads of the supported families compute
them; a model whose head does more (`UNPLAIN_HEAD`) prefills eagerly when logits are asked for.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

BACKEND = "inductor"  # tests swap in a counting backend
RECOMPILE_LIMIT = 32  # compiled entries dynamo keeps per code object (its default is 8)
UNPLAIN_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config keys of heads that do more

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> its compiled forward


def allow_recompiles() -> None:
    """Let dynamo keep `RECOMPILE_LIMIT` entries per code object: the compiled steps (`fast_decode`) and
    prefills keep one per model, kind and batch size 1 or more, beside other code's."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compiled_decoder(decoder: nn.Module):
    """`decoder` (a model's base model) compiled with dynamic shapes, once per decoder."""
    if decoder not in _COMPILED:
        allow_recompiles()
        _COMPILED[decoder] = torch.compile(decoder, backend=BACKEND, dynamic=True)
    return _COMPILED[decoder]


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
    `decoder(**kwargs)` compiled; None where the forward must run eagerly (hooks, a head that does more)."""
    head = plain_head(model) if logits else None
    if hooked(model) or (logits and head is None):
        return None
    hidden = compiled_decoder(decoder)(**kwargs).last_hidden_state[:, -1:, :]
    return head(hidden)[:, -1, :] if logits else hidden[:, -1, :]
