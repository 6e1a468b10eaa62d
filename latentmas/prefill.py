"""Reading an agent's prompt prefill: prefill similarity modes (`query`, `attention`), layer by layer.

kvpress-style: `PrefillProbe` is a context manager that registers forward hooks on every
watched decoder layer's attention module and removes them when it closes. Wrap it around
exactly one forward pass of the incoming agent's prompt on the shared cache:

    probe = PrefillProbe(shared, prompt_mask, get_mode("attention"))   # before the prefill
    with probe:
        shared.extend(embed(ids), prompt_mask, ids, SegmentKey(agent, "prompt"))
    probe.result()   # [batch, num_layers, T], T = shared.length before the prefill

The queries are the model's own: a hook on the attention module's last query projection
(`q_norm` for Qwen3, `q_proj` where there is none, e.g. Llama/Qwen2) keeps its output, i.e.
the layer's input -> input norm -> q_proj -> q_norm, and a hook (with kwargs) on the attention
module itself takes the `position_embeddings` (cos, sin at the tokens' real positions) it was
called with, applies RoPE with the modeling file's own `apply_rotary_pos_emb`, and reads the
layer's keys from the cache, which by then holds the T cached columns followed by the
prompt's n columns. The mode's `score` reduces them to a `[batch, T]` row per layer; the
layers are reduced a few at a time as their hooks fire, on the device, with no host sync and
no extra model work (no second forward pass, no recomputed projection). On CUDA the `query`
reduction, RoPE included, is one compiled function (`similarity.query.rotated_query_similarities`).

A cache whose prefills run in graphed chunks (`latentmas.graph_prefill`) can hand the probe every
layer's queries after the prefill instead (`SharedCache.watch`, `PrefillProbe.take_prefill`): the
same reduction, fed from a buffer the chunks' graphs copy the queries into, since hooks do not run in
a replayed graph.

`score_prompt` is the kNN scoring pass: the prompt runs on the cache up to one layer, that
layer's scores are kept, and the cache is put back as it was (`SharedCache.restored`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property, partial

import torch

from .fused_projections import GroupMember
from .similarity import PrefillMode, get_mode
from .similarity.maths import attention_bias


@dataclass
class StackedMasks:
    """A prefill's masks repeated for a number of stacked layers: prompt_mask `[batch', n]`, kv_mask
    `[batch', T]` (bool), and the additive attention mask made from them on first use."""

    prompt_mask: torch.Tensor
    kv_mask: torch.Tensor

    @cached_property
    def bias(self) -> torch.Tensor:
        """`[batch', 1, 1, n, T + n]` fp32 (`similarity.maths.attention_bias`)."""
        return attention_bias(self.prompt_mask, self.kv_mask)


@dataclass
class PrefillLayers:
    """What a prefill mode scores: one or several layers of one prefill, stacked along the batch axis.

    queries: `[batch', n, heads, head_dim]`, the model's own pre-RoPE queries (after q_norm).
    cos, sin: `[batch', n, head_dim]`, the RoPE at the prompt tokens' positions; rope: the modeling
        file's `apply_rotary_pos_emb(q, k, cos, sin)`.
    keys: `[batch', kv_heads, T + n, head_dim]`, the layer's cache right after the prefill.
    masks: prompt_mask `[batch', n]` (False: left padding), kv_mask `[batch', T]`, bias.
    scaling: the attention module's softmax scaling.
    """

    queries: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rope: Callable
    keys: torch.Tensor
    masks: StackedMasks
    scaling: float

    @property
    def prompt_mask(self) -> torch.Tensor:
        return self.masks.prompt_mask

    @property
    def kv_mask(self) -> torch.Tensor:
        return self.masks.kv_mask

    @property
    def bias(self) -> torch.Tensor:
        return self.masks.bias


class ProbeDone(Exception):
    """Raised by the last watched layer's hook of a probe with `stop_after_last` to end the pass early."""


def _rope_function(module: torch.nn.Module):
    """The modeling file's own `apply_rotary_pos_emb(q, k, cos, sin)` (Qwen3's when it has none)."""
    rope = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if rope is None:
        from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb as rope
    return rope


def attention_modules(lm) -> list[torch.nn.Module]:
    """Each decoder layer's attention module (`model.model.layers[i].self_attn`)."""
    decoder = lm.model.base_model
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"{type(lm.model).__name__}: query/attention similarities need decoder layers with a "
                         "`self_attn` module")
    return [layer.self_attn for layer in layers]


def query_source(module: torch.nn.Module) -> torch.nn.Module:
    """The submodule whose output is the pre-RoPE query: q_norm where the model has one, else q_proj."""
    q_norm = getattr(module, "q_norm", None)
    if isinstance(q_norm, torch.nn.Module):
        return q_norm
    q_proj = getattr(module, "q_proj", None)
    if not isinstance(q_proj, torch.nn.Module):
        raise ValueError(f"{type(module).__name__} has no q_proj: query/attention similarities cannot read its "
                         "queries")
    return q_proj


# Most elements (of the fp32 scores or keys) one batched computation over several layers may hold;
# the layers of a prefill are reduced in groups that fit (fewer, larger launches).
LAYER_CHUNK_ELEMENTS = 1 << 25


class PrefillProbe:
    """Forward hooks on the attention modules, for one prefill of the incoming prompt on `shared`.

    shared: the `SharedCache` the prompt is about to be prefilled on; its length T and mask
            are taken now, at construction (the hand-off), and define the result's columns.
    prompt_mask: `[batch, n]` bool, the prompt's left padding (False = padding).
    mode: a `PrefillMode` or its name ("query", "attention"; see `latentmas.similarity`).
    layers: the layer indices to watch (default: all).
    stop_after_last: raise `ProbeDone` once the last watched layer is done, so the rest of
            the model does not run; the probe's `with` block swallows it (scoring passes).

    Per watched layer, a hook on the query's last projection (q_norm, else q_proj) keeps its
    output (the model's own pre-RoPE queries, no recomputation) and a hook on the attention
    module takes its `position_embeddings`, its `scaling` and the layer's keys from the cache.
    Layers are reduced in groups as their hooks fire (stacked along the batch axis, at most
    `LAYER_CHUNK_ELEMENTS` per group), so the per-layer Python work stays small; everything
    stays on the device. `result()` -> float32 `[batch, len(layers), T]`.
    """

    def __init__(self, shared, prompt_mask: torch.Tensor, mode: PrefillMode, layers: Iterable[int] | None = None,
                 stop_after_last: bool = False):
        if isinstance(mode, str):
            mode = get_mode(mode)
        if not isinstance(mode, PrefillMode):
            raise ValueError(f"PrefillProbe reads modes computed from a prefill, not {getattr(mode, 'name', mode)!r}")
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
        self._sources = {i: query_source(self._modules[i]) for i in self.layers}
        for i in self.layers:
            mode.check_layer(self._modules[i], i)
        module = self._modules[self.layers[0]]
        self._head_dim = shared.lm.head_dim
        self._rope = _rope_function(module)
        batch, n = self.prompt_mask.shape
        lm = shared.lm
        per_layer = mode.elements_per_layer(batch, n, self.width, lm)
        self._chunk = max(1, LAYER_CHUNK_ELEMENTS // max(per_layer, 1))
        self._queries: dict[int, torch.Tensor] = {}  # layer -> pre-RoPE queries, until its attention hook
        self._group: list[tuple] = []  # (layer, queries, keys) waiting to be reduced together
        self._group_key = None  # (cos, sin, scaling) shared by the waiting group
        self._done: list[int] = []
        self._chunks: list[torch.Tensor] = []  # [layers in chunk, batch, T]
        self._handles: list = []
        self._mask_cache: dict[int, StackedMasks] = {}

    def __enter__(self) -> PrefillProbe:
        if self.stop_after_last or not self.shared.watch(self):  # else the prefill hands its queries over
            self.add_hooks()
        return self

    def add_hooks(self) -> None:
        """Read the next forward pass through hooks (see the class's docstring)."""
        for i in self.layers:
            self._handles.append(self._sources[i].register_forward_hook(partial(self._keep_queries, i)))
            self._handles.append(self._modules[i].register_forward_hook(partial(self._hook, i), with_kwargs=True))

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.shared.unwatch(self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()
        return exc_type is ProbeDone and self.stop_after_last

    def take_prefill(self, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """The prefill's queries handed over instead of hooked (`graph_prefill`), once its keys are cached:
        queries `[num_layers, batch, n, heads, head_dim]` (every layer's pre-RoPE queries, from the same
        module the hooks read), cos, sin `[batch, n, head_dim]`."""
        for i in self.layers:
            self._take(i, self._modules[i], queries[i], cos, sin)

    def _keep_queries(self, index: int, module, args, output) -> None:
        self._queries[index] = output.contiguous()  # a fused q_proj's output is a view of q, k and v

    def _hook(self, index: int, module, args, kwargs, output) -> None:
        if index in self._done or any(index == g[0] for g in self._group):
            raise RuntimeError("a PrefillProbe watches exactly one forward pass; open a new one per prefill")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, n = self.prompt_mask.shape
        if tuple(hidden.shape[:2]) != (batch, n):
            raise RuntimeError(f"PrefillProbe expected the prompt's prefill [{batch}, {n}], saw a forward of "
                               f"{tuple(hidden.shape[:2])}")
        queries = self._queries.pop(index, None)
        if queries is None:  # the query projection ran outside a module call: rebuild it
            queries = _pre_rope_queries(module, hidden, self._head_dim)
        self._take(index, module, queries, *self._position_embeddings(module, hidden, args, kwargs))

    def _take(self, index: int, module, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """One layer's pre-RoPE queries `[batch, n, heads, head_dim]` and RoPE `[batch, n, head_dim]`, with the
        layer's keys now in the cache: reduced with the waiting ones when the group is full."""
        n = self.prompt_mask.shape[1]
        keys = self.shared.cache.layers[getattr(module, "layer_idx", index)].keys
        T = self.width
        if keys.shape[2] != T + n:
            raise RuntimeError(f"layer {index}: the cache holds {keys.shape[2]} columns, expected the {T} cached "
                               f"and the prompt's {n}")
        scaling = getattr(module, "scaling", None) or self._head_dim ** -0.5
        key = (cos, sin, float(scaling))
        if self._group and not (key[0] is self._group_key[0] and key[1] is self._group_key[1]
                                and key[2] == self._group_key[2]):
            self._reduce()  # layers with their own RoPE or scaling go in their own group
        self._group_key = key
        self._group.append((index, queries, keys))
        last = index == self.layers[-1]
        if len(self._group) >= self._chunk or last:
            self._reduce()
        if last and self.stop_after_last:
            raise ProbeDone

    def _reduce(self) -> None:
        """Reduce the waiting layers at once: they are stacked along the batch axis."""
        group, (cos, sin, scaling) = self._group, self._group_key
        self._group = []
        count = len(group)
        batch, n = self.prompt_mask.shape
        stack = (lambda ts: ts[0]) if count == 1 else torch.stack
        queries = stack([q for _, q, _ in group]).reshape(count * batch, n, -1, self._head_dim)
        keys = stack([k for _, _, k in group]).reshape(count * batch, *group[0][2].shape[1:])
        if count > 1:
            cos, sin = cos.repeat(count, 1, 1), sin.repeat(count, 1, 1)
        result = self.mode.score(PrefillLayers(queries, cos, sin, self._rope, keys, self._masks(count), scaling))
        self._chunks.append(result.view(count, batch, -1))
        self._done.extend(index for index, _, _ in group)

    def _masks(self, count: int) -> StackedMasks:
        """The masks repeated for `count` stacked layers, made once per count."""
        if count not in self._mask_cache:
            self._mask_cache[count] = StackedMasks(self.prompt_mask.repeat(count, 1), self.kv_mask.repeat(count, 1))
        return self._mask_cache[count]

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
        missing = [i for i in self.layers if i not in self._done]
        if missing:
            raise RuntimeError(f"the prefill never reached layer {missing[0]}: was the probe open around it?")
        return torch.cat(self._chunks, dim=0).transpose(0, 1)


def _pre_rope_queries(module: torch.nn.Module, hidden_states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q_proj then q_norm (if any) of `hidden_states` [batch, n, hidden] -> [batch, n, heads, head_dim]."""
    batch, n, _ = hidden_states.shape
    q_proj = module.q_proj
    if isinstance(q_proj, GroupMember):  # its product alone: called, it would keep k and v for siblings never called
        q = torch.nn.functional.linear(hidden_states, q_proj.weight, q_proj.bias)
    else:
        q = q_proj(hidden_states)
    q_norm = getattr(module, "q_norm", None)
    if isinstance(q_norm, torch.nn.Module):
        per_head = getattr(q_norm, "weight", None) is not None and q_norm.weight.numel() == head_dim
        q = q_norm(q.view(batch, n, -1, head_dim)) if per_head else q_norm(q)
    return q.view(batch, n, -1, head_dim)


def score_prompt(shared, embeds: torch.Tensor, prompt_mask: torch.Tensor, prompt_ids: torch.Tensor, segment,
                 mode: PrefillMode | str, layer: int) -> torch.Tensor:
    """kNN scores of the cache's T columns for an incoming prompt, at one layer: `[batch, T]`.

    A scoring pass: the prompt (`embeds` [batch, n, hidden], left-padded) is prefilled on the
    current cache through layers 0..`layer` only, the layer's `mode` similarities are taken,
    and `shared` is restored, so its cache is exactly what it was. Costs about
    (layer + 1) / num_layers of a prompt prefill.
    """
    probe = PrefillProbe(shared, prompt_mask, mode, layers=[layer], stop_after_last=True)
    with shared.restored(), probe:
        shared.extend(embeds, prompt_mask, prompt_ids, segment)
    return probe.result()[:, 0]
