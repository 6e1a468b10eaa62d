"""Reading an agent's prompt prefill: the `query` and `attention` similarities, layer by layer.

kvpress-style: `PrefillProbe` is a context manager that registers a forward hook (with
kwargs) on every watched decoder layer's attention module and removes them when it closes.
Wrap it around exactly one forward pass of the incoming agent's prompt on the shared cache:

    probe = PrefillProbe(shared, prompt_mask, "attention")   # before the prefill
    with probe:
        shared.extend(embed(ids), prompt_mask, ids, SegmentKey(agent, "prompt"))
    probe.result()   # [batch, num_layers, T], T = shared.length before the prefill

Each hook sees what the attention module sees: `hidden_states` (the layer's input after its
input norm) and `position_embeddings` (cos, sin at the tokens' real positions). It rebuilds
the prompt's queries with the module's own `q_proj`, `q_norm` (Qwen3; skipped where the
model has none, e.g. Llama/Qwen2) and RoPE (the modeling file's `apply_rotary_pos_emb`),
reads the layer's keys from the cache (which by then holds the T cached columns followed by
the prompt's n columns), and reduces them with `capture.similarity` to a `[batch, T]` tensor
kept on the device. Nothing syncs with the host; the only extra model work is one q_proj of
the prompt tokens per watched layer.

`score_prompt` is the kNN scoring pass: the prompt runs on the cache up to one layer, that
layer's scores are kept, and the cache is put back as it was (`restored`).
"""

from __future__ import annotations

import contextlib
import sys
from functools import partial
from typing import Iterable, Iterator

import torch

from .similarity import PREFILL_MODES, attention_received, query_similarities


class ProbeDone(Exception):
    """Raised by the last watched layer's hook of a probe with `stop_after_last` to end the pass early."""


def _rope_function(module: torch.nn.Module):
    """The modeling file's own `apply_rotary_pos_emb(q, k, cos, sin)` (Qwen3's when it has none)."""
    rope = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rope is None:
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb as rope
    return rope


def head_dim_of(module: torch.nn.Module) -> int:
    head_dim = getattr(module, "head_dim", None)
    if head_dim is None:
        config = module.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim)


def attention_queries(module: torch.nn.Module, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The queries an attention module computes: `[batch, n, hidden]` (after the layer's input
    norm) -> `[batch, heads, n, head_dim]`, via q_proj, q_norm (if the module has one) and RoPE.

    A q_norm over head_dim (Qwen3, Gemma3) is applied per head; one over all heads (OLMo2) before
    the split. Computed in the model's dtype, exactly as the module does.
    """
    batch, n, _ = hidden_states.shape
    head_dim = head_dim_of(module)
    q = module.q_proj(hidden_states)
    q_norm = getattr(module, "q_norm", None)
    per_head_norm = q_norm is not None and getattr(q_norm, "weight", None) is not None \
        and q_norm.weight.numel() == head_dim
    if q_norm is not None and not per_head_norm:
        q = q_norm(q)
    q = q.view(batch, n, -1, head_dim)
    if per_head_norm:
        q = q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = _rope_function(module)(q, q, cos, sin)
    return q


def attention_modules(lm) -> list[torch.nn.Module]:
    """Each decoder layer's attention module (`model.model.layers[i].self_attn`)."""
    decoder = lm.model.base_model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(lm.model).__name__}: query/attention similarities need decoder layers with a "
                         "`self_attn` module")
    return [layer.self_attn for layer in layers]


class PrefillProbe:
    """Forward hooks on the attention modules, for one prefill of the incoming prompt on `shared`.

    shared: the `SharedCache` the prompt is about to be prefilled on; its length T and mask
            are taken now, at construction (the hand-off), and define the result's columns.
    prompt_mask: `[batch, n]` bool, the prompt's left padding (False = padding).
    mode: "query" or "attention" (see `capture.similarity`).
    layers: the layer indices to watch (default: all).
    stop_after_last: raise `ProbeDone` once the last watched layer is done, so the rest of
            the model does not run; the probe's `with` block swallows it (scoring passes).

    `result()` -> float32 `[batch, len(layers), T]` on the model's device.
    """

    def __init__(self, shared, prompt_mask: torch.Tensor, mode: str, layers: Iterable[int] | None = None,
                 stop_after_last: bool = False):
        if mode not in PREFILL_MODES:
            raise ValueError(f"PrefillProbe computes {' and '.join(PREFILL_MODES)}, not {mode!r}")
        self.shared = shared
        self.mode = mode
        self.prompt_mask = prompt_mask.to(torch.bool)
        self.width = shared.length  # T at the hand-off
        self.kv_mask = shared.mask
        self._modules = attention_modules(shared.lm)
        self.layers = list(range(len(self._modules))) if layers is None else sorted(set(layers))
        if not self.layers or not all(0 <= i < len(self._modules) for i in self.layers):
            raise ValueError(f"layers {layers} are not within the model's {len(self._modules)} layers")
        self.stop_after_last = stop_after_last
        if mode == "attention":
            for i in self.layers:
                _check_plain_softmax(self._modules[i], i)
        self._results: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "PrefillProbe":
        for i in self.layers:
            hook = partial(self._hook, i)
            self._handles.append(self._modules[i].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is ProbeDone and self.stop_after_last

    def _hook(self, index: int, module, args, kwargs, output) -> None:
        if index in self._results:
            raise RuntimeError("a PrefillProbe watches exactly one forward pass; open a new one per prefill")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, n = self.prompt_mask.shape
        if tuple(hidden.shape[:2]) != (batch, n):
            raise RuntimeError(f"PrefillProbe expected the prompt's prefill [{batch}, {n}], saw a forward of "
                               f"{tuple(hidden.shape[:2])}")
        queries = attention_queries(module, hidden, self._position_embeddings(module, hidden, args, kwargs))
        keys = self.shared.cache.layers[getattr(module, "layer_idx", index)].keys
        T = self.width
        if keys.shape[2] != T + n:
            raise RuntimeError(f"layer {index}: the cache holds {keys.shape[2]} columns, expected the {T} cached "
                               f"and the prompt's {n}")
        if self.mode == "query":
            result = query_similarities(queries, keys[:, :, :T], self.prompt_mask, self.kv_mask)
        else:
            scaling = getattr(module, "scaling", None) or head_dim_of(module) ** -0.5
            result = attention_received(queries, keys, self.prompt_mask, self.kv_mask, scaling)
        self._results[index] = result
        if self.stop_after_last and index == self.layers[-1]:
            raise ProbeDone

    def _position_embeddings(self, module, hidden, args, kwargs):
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None and len(args) > 1:
            embeddings = args[1]
        if embeddings is None:  # a model whose attention computes RoPE itself
            rotary = getattr(self.shared.lm.model.base_model, "rotary_emb", None)
            position_ids = kwargs.get("position_ids")
            if rotary is None or position_ids is None:
                raise RuntimeError(f"{type(module).__name__} gets no position_embeddings and the model has no "
                                   "rotary_emb: cannot rebuild its queries")
            embeddings = rotary(hidden, position_ids)
        return embeddings

    def result(self) -> torch.Tensor:
        """float32 `[batch, len(layers), T]`, once the prefill has run."""
        missing = [i for i in self.layers if i not in self._results]
        if missing:
            raise RuntimeError(f"the prefill never reached layer {missing[0]}: was the probe open around it?")
        return torch.stack([self._results[i] for i in self.layers], dim=1)


def _check_plain_softmax(module, index: int) -> None:
    """`attention_received` rebuilds plain causal softmax attention; refuse modules that do more."""
    config = getattr(module, "config", None)
    if getattr(module, "sliding_window", None):
        raise ValueError(f"layer {index} uses sliding-window attention, which 'attention' similarity does not model")
    if getattr(module, "sinks", None) is not None:
        raise ValueError(f"layer {index} has attention sinks, which 'attention' similarity does not model")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"layer {index} soft-caps attention logits, which 'attention' similarity does not model")


@contextlib.contextmanager
def restored(shared) -> Iterator[None]:
    """Undo whatever the block does to `shared` (its columns and every cache layer); copy-free.

    Cache layers grow by concatenation into new tensors, so keeping references to the old
    ones is enough to put them back.
    """
    state = dict(vars(shared))
    segments = list(shared.segments)
    layers = [(layer, dict(vars(layer))) for layer in shared.cache.layers]
    try:
        yield
    finally:
        for layer, saved in layers:
            vars(layer).update(saved)
        vars(shared).update(state)
        shared.segments = segments


def score_prompt(shared, embeds: torch.Tensor, prompt_mask: torch.Tensor, prompt_ids: torch.Tensor, segment,
                 mode: str, layer: int) -> torch.Tensor:
    """kNN scores of the cache's T columns for an incoming prompt, at one layer: `[batch, T]`.

    A scoring pass: the prompt (`embeds` [batch, n, hidden], left-padded) is prefilled on the
    current cache through layers 0..`layer` only, the layer's `mode` similarities are taken,
    and `shared` is restored, so its cache is exactly what it was. Costs about
    (layer + 1) / num_layers of a prompt prefill.
    """
    probe = PrefillProbe(shared, prompt_mask, mode, layers=[layer], stop_after_last=True)
    with restored(shared), probe:
        shared.extend(embeds, prompt_mask, prompt_ids, segment)
    return probe.result()[:, 0]
