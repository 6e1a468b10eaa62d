"""Fast stepping: one fixed-shape step on the shared cache's own buffers, replayed as a CUDA graph.

Decoding one token at a time through transformers' eager forward costs far more
in Python and kernel launches than in GPU work (a 4B model reads ~8 GB of weights
per step: ~2 ms of bandwidth, but the eager step takes tens of ms). Here every step
has the same shapes and addresses: it steps on the shared cache's storage
(`kv_storage`, buffers with room for the whole problem), the new key/value is written
at a device-side index, attention sees the written slots through a mask
(`step_attention`: a split-KV kernel on CUDA), a decoding step samples its next token
itself (`sampling`), and nothing talks to the host. On CUDA the step is captured once
as a CUDA graph and replayed; on the CPU the same step runs eagerly, which is how tests
check that it decodes exactly what the plain loop decodes. With `compiled`
(`--compile_step`) the model step is first compiled by torch.compile (inductor fuses the
norms, RoPE, SiLU-mul and residual adds that otherwise run as ~50 small kernels per
layer), once per model and kind of step, with the buffers' length dynamic, and the
compiled step is what the CUDA graph records. A model keeps its steps with the storage
they were recorded on and reuses them for later batches (`static_step`); latent steps'
columns are already in the cache (`SharedCache.adopt` only counts them in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .compiled_prefill import allow_recompiles
from .fused_projections import forget_kept_outputs
from .kv_storage import cache_kwarg
from .sampling import Sampler, compiled_sampler, sample_tokens
from .step_attention import STEP_MASK, StepMask, grouped_step, use_kernel

if TYPE_CHECKING:  # the shared cache prefills through `graph_prefill`, which builds on this module
    from .shared_cache import SharedCache


class StaticKV:
    """A shared cache's storage (`kv_storage.KVStorage`) seen as fixed-shape step buffers.

    keys/values: the storage's per-layer buffers `[batch, kv_heads, capacity, head_dim]`;
    `load()` points the step at a shared cache's end; `update()` writes each new column at
    `write_index` (a 1-element device tensor) and returns the whole buffers; slots past the
    written ones are hidden by `mask` `[batch, capacity]`.
    """

    def __init__(self, storage):
        self.storage = storage
        self.capacity = storage.capacity
        self.keys = list(storage.keys)
        self.values = list(storage.values)
        self.write_index = torch.zeros(1, dtype=torch.long, device=storage.device)
        self.mask = torch.zeros(storage.batch, self.capacity, dtype=torch.bool, device=storage.device)

    def current(self) -> bool:
        """Whether these are still the storage's buffers (it may have grown since)."""
        return self.keys[0] is self.storage.keys[0]

    def mark_dynamic(self) -> None:
        """Tell torch.compile that the buffers' length (and a batch of more than one) varies, so one
        compiled step serves every buffer size and batch size (batch size 1 compiles apart)."""
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_dynamic(tensor, 2)
        torch._dynamo.mark_dynamic(self.mask, 1)
        if self.mask.shape[0] > 1:
            for tensor in (*self.keys, *self.values, self.mask):
                torch._dynamo.mark_dynamic(tensor, 0)

    @torch.no_grad()
    def load(self, shared: SharedCache) -> None:
        """Step on from `shared`'s last column (its columns are already in these buffers; the slots
        after them are cleared unless the split-KV kernel, which never reads them, attends)."""
        if shared.storage is not self.storage or not self.current():
            raise RuntimeError("a static step runs on the storage of the cache it continues")
        length = shared.length
        if not use_kernel(self.storage.device):  # SDPA weighs hidden slots by 0, and 0 x NaN is NaN:
            for keys, values in zip(self.keys, self.values):  # clear what an earlier batch left there
                keys[:, :, length:].zero_()  # (the kernel never reads them)
                values[:, :, length:].zero_()
        self.write_index.fill_(length)
        self.mask.zero_()
        self.mask[:, :length] = shared.mask

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_index, key_states)
        self.values[layer_idx].index_copy_(2, self.write_index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2]


def use_fast(device: torch.device, setting: bool | None) -> bool:
    """Whether to step on a static buffer: `setting`, or by default only on CUDA."""
    return device.type == "cuda" if setting is None else setting


def use_compiled(device: torch.device, setting: bool | None) -> bool:
    """Whether to compile the static step: `setting`, by default no.

    On an H200 (Qwen3-4B shapes) compiling took 60-85 s for each kind of step and batch size 1 or
    more (stop 13), and saved about 3 ms per step (docs/performance.md): it pays off over long runs only,
    so it is asked for (`--compile_step`), not the default.
    """
    return bool(setting)


def model_step(model, kv: StaticKV, inputs: torch.Tensor, position: torch.Tensor, tokens: bool,
               cache_name: str) -> torch.Tensor:
    """One token per row on `kv` at its write index: ids `[batch, 1]` -> logits `[batch, vocab]`, or
    embeddings `[batch, 1, hidden]` -> final hidden state `[batch, hidden]`."""
    kv.mask.index_fill_(1, kv.write_index, True)
    # The mask goes to the attention function as a keyword of its own, which every model passes
    # through to its attention layers; `attention_mask` itself would be rebuilt (or dropped) by
    # models that make their own masks (Llama: `create_causal_mask` knows no mask for this attention).
    common = {"position_ids": position, "use_cache": True, cache_name: kv,
              STEP_MASK: StepMask(kv.mask, kv.write_index + 1)}
    with grouped_step(model):
        if tokens:
            return model(input_ids=inputs, logits_to_keep=1, **common).logits[:, -1, :]
        return model.base_model(inputs_embeds=inputs, **common).last_hidden_state[:, -1, :]


_COMPILED: list = []  # torch.compile(model_step), made on first use

# Inductor's deterministic mode: a reduction kernel's launch config is chosen by a fixed rule, not by
# timing the candidates. The step's reductions run for 2-20 us; inductor timed each candidate at 16-44 us
# (a fixed cost of each measurement dominated, not the kernel), so its pick was noise, and one pick cost
# 0.5 ms a step: the per-layer K-norm/RoPE reduction ran 20.7 us at XBLOCK 32 (255 registers, 4 blocks
# at batch size 16) against 2.8 us at XBLOCK 8, picked in 2 of 4 cold processes (H200, stop 23,
# `bench/gpu_report.sh autotune`). Under the rule (torch's source: the second largest of the XBLOCK
# candidates 1, 8, 32) the kernel ran 2.8 us in both processes profiled (batch size 16), and a
# reduction's config (so its rounding) no longer varies from one process to the next.
STEP_INDUCTOR_OPTIONS = {"deterministic": True}


def compiled_model_step():
    """`model_step` compiled once per process (inductor, whole graph, `STEP_INDUCTOR_OPTIONS`; dynamo
    keeps one entry per model, kind of step and batch size 1 or more, sizes left dynamic by
    `StaticKV.mark_dynamic`)."""
    if not _COMPILED:
        allow_recompiles()
        _COMPILED.append(torch.compile(model_step, fullgraph=True, dynamic=False, options=STEP_INDUCTOR_OPTIONS))
    return _COMPILED[0]


_CAPTURE: dict = {}  # device -> (side stream, graph memory pool), shared by every capture


def _capture_resources(device: torch.device):
    """One warm-up stream and one graph memory pool per device, reused by every capture.

    A fresh stream per capture would leave a cuBLAS workspace behind each time
    (cuBLAS keeps one per stream), and a fresh pool per graph would fragment memory.
    """
    if device not in _CAPTURE:
        _CAPTURE[device] = (torch.cuda.Stream(device), torch.cuda.graph_pool_handle())
    return _CAPTURE[device]


@torch.no_grad()
def record(forward, device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`forward()` warmed up twice on a side stream, then recorded into a CUDA graph in the shared pool
    (`_capture_resources`); returns the graph and its static output."""
    stream, pool = _capture_resources(device)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        output = forward()
    return graph, output


class StaticStep:
    """One model step with fixed shapes on a static KV buffer, reused from problem to problem.

    tokens=True (decoding): token ids `[batch]` in, next-token logits `[batch, vocab]` out; with
    `sampling` (temperature, top_k, top_p) the step also samples, inside its graph, and the next
    tokens `[batch]` come out (`start` takes the `Sampler` whose row keys and step count it goes on with).
    tokens=False (latent steps): input embeddings `[batch, hidden]` in, the last layer's
    final hidden state `[batch, hidden]` out.
    Static inputs (`input`, `position`, the buffers' `write_index` and `mask`) are updated
    in place; `start()` points it at a shared cache's end, `run()` replays the CUDA graph when
    there is one (`use_graph`: by default on CUDA only). `compiled` runs the step through
    `compiled_model_step()` (off by default: see `use_compiled`). `kv`: the buffers to step on
    (a shared cache's storage). Get one with `static_step()`.
    """

    def __init__(self, lm, kv: StaticKV, tokens: bool = True, use_graph: bool | None = None,
                 compiled: bool = False, sampling: tuple | None = None):
        self.lm = lm
        self.tokens = tokens
        device = lm.device
        batch = kv.mask.shape[0]
        self.kv = kv
        self.sampling = sampling if tokens else None
        self.row_keys = torch.zeros(batch, dtype=torch.long, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        if tokens:
            self.input = torch.zeros(batch, 1, dtype=torch.long, device=device)
        else:
            self.input = torch.zeros(batch, 1, lm.hidden_size, dtype=lm.dtype, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.steps = 0
        self._room = 0  # slots left after `start`
        self._cache_kwarg = cache_kwarg(lm.model.base_model)
        self.output = None
        self.graph = None
        self.compiled = use_compiled(device, compiled)
        self._step, self._sample = model_step, sample_tokens
        if self.compiled:
            self._sample = compiled_sampler()  # apart from the model step (see `_forward`)
            self.kv.mark_dynamic()
            if batch > 1:
                torch._dynamo.mark_dynamic(self.input, 0)
                torch._dynamo.mark_dynamic(self.position, 0)
            self._step = compiled_model_step()
        if use_fast(device, use_graph):
            self._capture()

    def start(self, shared: SharedCache, sampler: Sampler | None = None) -> StaticStep:
        """Continue from `shared` (same batch size, at most `capacity` columns with the steps to come);
        a sampling step draws on from `sampler`'s row keys and step count (the sampler's own count
        is left behind: use one or the other)."""
        if self.sampling is not None:
            if sampler is None or sampler.settings != self.sampling:
                raise ValueError(f"this step samples with {self.sampling}; start it with a Sampler of those settings")
            self.row_keys.copy_(sampler.keys)
            self.counter.copy_(sampler.step)
        if shared.length >= self.kv.capacity:
            raise ValueError(f"a {shared.length}-column cache does not fit a {self.kv.capacity}-slot step")
        self.kv.load(shared)
        self.position.copy_(shared.next_position[:, None])
        self.steps = 0
        self._room = self.kv.capacity - shared.length
        return self

    def _forward(self) -> torch.Tensor:
        output = self._step(self.lm.model, self.kv, self.input, self.position, self.tokens, self._cache_kwarg)
        if self.sampling is None:
            return output
        # Sampling is compiled apart, with a graph break at top-p's cumulative sum, which inductor
        # (torch 2.11) fails to generate over [batch > 1, vocab] (seen on an H200); it is in the graph all the same.
        token = self._sample(output, self.row_keys, self.counter, *self.sampling)
        self.counter.add_(1)
        return token

    def _capture(self) -> None:
        """Record one step into a CUDA graph (`record`). The warm-up steps write at the buffers' write
        index, which `static_step` has set to the cache's end (`StaticKV.load`): the first real step
        overwrites that slot, so they change nothing that is read."""
        self.graph, self.output = record(self._forward, self.lm.device)

    @torch.no_grad()
    def run(self, value: torch.Tensor) -> torch.Tensor:
        """Feed token ids `[batch]` or embeddings `[batch, hidden]` at the next slot; return the output.

        The output is a static tensor that the next `run` of this or any other step may
        overwrite (captured graphs share one memory pool): use or copy it before then.
        """
        if self.steps >= self._room:
            raise RuntimeError(f"the static buffer is full ({self.kv.capacity} slots)")
        self.input.copy_(value[:, None])
        if self.graph is not None:
            self.graph.replay()
            output = self.output
        else:
            output = self._forward()
        self.kv.write_index += 1
        self.position += 1
        self.steps += 1
        return output


def static_step(lm, shared: SharedCache, extra: int, tokens: bool = True, use_graph: bool | None = None,
                compiled: bool = False, sampler: Sampler | None = None) -> StaticStep:
    """A step started on `shared` with room for `extra` more columns, on the cache's own storage.
    With `sampler`, a decoding step samples inside its graph and returns tokens (`StaticStep`).

    Steps live on the model (`lm.static_steps`), keyed by (tokens, graph, compiled, sampling), all on one
    `StaticKV` over the model's storage (`kv_storage.storage_for` lends it from batch to batch): the
    latent steps and the decoding of a problem take turns on it, writing where the cache reads. A
    step is rebuilt (and its graph recorded again) only when the cache is on other storage, or
    the storage grew. Out of GPU memory while recording, the cached allocator is emptied and the
    build tried once more.
    """
    graph, compiled = use_fast(lm.device, use_graph), use_compiled(lm.device, compiled)
    shared.reserve(extra)
    sampling = sampler.settings if sampler is not None and tokens else None
    build = dict(tokens=tokens, use_graph=graph, compiled=compiled, sampling=sampling)
    kv = model_kv(lm, shared)
    if kv is None:  # a cache on storage of its own (another holds the model's): a step for it alone
        return built(StaticStep, lm, StaticKV(shared.storage), shared, build).start(shared, sampler)
    key = (tokens, graph, compiled, sampling)
    if key not in lm.static_steps:
        lm.static_steps[key] = built(StaticStep, lm, kv, shared, build)
    return lm.static_steps[key].start(shared, sampler)


def model_kv(lm, shared: SharedCache) -> StaticKV | None:
    """The `StaticKV` that the model's kept steps (`lm.static_steps`, anything with a `.kv`) share, over
    `shared`'s storage; those recorded on other or outgrown buffers are dropped first. None when
    `shared` is not on the model's storage."""
    if shared.storage is not lm.kv_storage:
        return None
    steps = lm.static_steps
    kv = next(iter(steps.values())).kv if steps else None
    if kv is None or kv.storage is not shared.storage or not kv.current():
        steps.clear()
        kv = StaticKV(shared.storage)
    return kv


def built(kind, lm, kv: StaticKV, shared: SharedCache, build: dict):
    """`kind(lm, kv, **build)` (a step that records its graph when made) with `kv` pointed at `shared`'s
    end first (so that recording writes only past the cache); once more after emptying the allocator's
    cache when it runs out of GPU memory."""
    kv.load(shared)
    step = _built_or_none(kind, lm, kv, build)
    if step is None:  # out of memory; its traceback (which held the failed graph) is gone by now
        forget_kept_outputs(lm.model)  # what a forward stopped between siblings kept, in that graph's pool
        torch.cuda.empty_cache()
        kv.load(shared)
        step = kind(lm, kv, **build)
    return step


def _built_or_none(kind, lm, kv: StaticKV, build: dict):
    """`kind(lm, kv, **build)`, or None when it runs out of GPU memory."""
    try:
        return kind(lm, kv, **build)
    except torch.cuda.OutOfMemoryError:
        return None
