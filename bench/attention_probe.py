"""Decode attention per layer call: SDPA (as `grouped_step_attention` calls it) against the split-KV
triton kernel and the torch reference (diagnostic, prints raw figures).

    python bench/attention_probe.py                 # on the GPU: Qwen3-4B head shapes, bf16
    python bench/attention_probe.py --device cpu    # the reference only (checks that it runs)
    TRITON_INTERPRET=1 python bench/attention_probe.py --device cpu --layers 1 --replays 1  # + the kernel (6 min)

Each variant is captured in a CUDA graph of one call per layer (`--layers`, each with its own
key/value buffers, so nothing stays in L2 between calls as in a real step) and the graph is
replayed `--replays` times between CUDA events: the µs per call are what a graph-replayed step
sees, launch costs included. GB/s counts the key and value bytes of the `length` slots that are
actually needed, not the buffer's capacity. The error is the largest absolute difference of the
first layer's output from the fp32 reference on the same bf16 inputs.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import click
import torch
from common import graph_seconds  # first: puts the repository on the path
from torch.nn.attention import SDPBackend, sdpa_kernel

from latentmas.kernels.decode_attention import (
    BLOCK_N,
    DEFAULT_SM_COUNT,
    decode_attention,
    decode_attention_reference,
    split_plan,
)
from latentmas.step_attention import grouped_step_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Qwen3-4B
# (batch, capacity, length)
CONFIGS = [(1, 1280, 1130), (16, 1280, 1130), (64, 1280, 1130), (1, 1024, 896), (1, 2048, 900)]


def _layers(batch: int, capacity: int, length: int, layers: int, dtype, device, seed: int = 0):
    """Per layer (query `[batch, heads, dim]`, keys, values `[batch, kv_heads, capacity, dim]`),
    plus the mask `[batch, capacity]` (rows left-padded by up to 63 slots, about 5% holes, False
    from `length` on) and length `[1]` that all layers share, as in the decode step."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, KV_HEADS, capacity, HEAD_DIM)
    tensors = [(torch.randn(batch, HEADS, HEAD_DIM, generator=generator, device=device, dtype=dtype),
                torch.randn(shape, generator=generator, device=device, dtype=dtype),
                torch.randn(shape, generator=generator, device=device, dtype=dtype)) for _ in range(layers)]
    slots = torch.arange(capacity, device=device)
    pads = torch.randint(0, 64, (batch, 1), generator=generator, device=device)
    holes = torch.rand(batch, capacity, generator=generator, device=device) < 0.05
    mask = (slots >= pads) & (slots < length) & ~holes
    mask[:, length - 1] = True
    return tensors, mask, torch.tensor([length], device=device)


def _variants(scale: float, device) -> dict[str, tuple[Callable, object]]:
    """name -> (fn(query, keys, values, mask, length) -> [batch, heads, dim], context to call it in)."""

    def sdpa(query, keys, values, mask, length):
        out, _ = grouped_step_attention(None, query[:, :, None, :], keys, values, mask[:, None, None, :], scale)
        return out[:, 0]

    def reference(query, keys, values, mask, length):
        return decode_attention_reference(query, keys, values, mask, length, scale)

    def kernel(query, keys, values, mask, length):
        return decode_attention(query, keys, values, mask, length, scale, backend="triton")

    if device.type != "cuda":  # the kernel too under TRITON_INTERPRET=1 (slow: checks the launch only)
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return {"reference (eager)": (reference, None), **({"triton split-KV": (kernel, None)} if interpreted else {})}
    return {"sdpa (default)": (sdpa, None), "sdpa EFFICIENT": (sdpa, SDPBackend.EFFICIENT_ATTENTION),
            "sdpa CUDNN": (sdpa, SDPBackend.CUDNN_ATTENTION), "reference (eager)": (reference, None),
            "triton split-KV": (kernel, None)}


def _time_cuda(fn, layers, mask, length, replays: int) -> tuple[float, torch.Tensor]:
    """(µs per call, first layer's output) of `fn` over all layers in one CUDA graph."""
    seconds, outputs = graph_seconds(lambda: [fn(q, k, v, mask, length) for q, k, v in layers], replays)
    return seconds * 1e6 / len(layers), outputs[0].clone()


def _time_cpu(fn, layers, mask, length, replays: int) -> tuple[float, torch.Tensor]:
    first = fn(*layers[0], mask, length)
    start = time.perf_counter()
    for _ in range(replays):
        for query, keys, values in layers:
            fn(query, keys, values, mask, length)
    return (time.perf_counter() - start) * 1e6 / (replays * len(layers)), first


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--layers", default=None, type=int, help="calls per graph  [default: 36 on CUDA, 2 on CPU]")
@click.option("--replays", default=None, type=int, help="timed graph replays  [default: 50 on CUDA, 2 on CPU]")
def main(device, layers, replays):
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    layers = layers or (36 if on_cuda else 2)
    replays = replays or (50 if on_cuda else 2)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    scale = HEAD_DIM**-0.5
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if on_cuda else DEFAULT_SM_COUNT
    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"machine: {name} (split plan for {sm_count} SMs); torch {torch.__version__}; {HEADS} heads, {KV_HEADS} kv heads, "
          f"head_dim {HEAD_DIM}, {dtype}; {layers} calls per graph, {replays} replays")
    timer = _time_cuda if on_cuda else _time_cpu
    for batch, capacity, length in CONFIGS:
        tensors, mask, length_tensor = _layers(batch, capacity, length, layers, dtype, device)
        query, keys, values = tensors[0]
        exact = decode_attention_reference(query.float(), keys.float(), values.float(), mask, length_tensor, scale)
        needed = 2 * batch * KV_HEADS * length * HEAD_DIM * keys.element_size()
        splits, split_size = split_plan(batch * KV_HEADS, capacity, BLOCK_N, sm_count)
        print(f"batch {batch}, capacity {capacity}, length {length}: K+V needed {needed / 2**20:.1f} MiB per call; "
              f"triton plan {splits} splits of {split_size} slots, {batch * KV_HEADS * splits} programs")
        for label, (fn, backend) in _variants(scale, device).items():
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    micros, out = timer(fn, tensors, mask, length_tensor, replays)
            except RuntimeError as error:
                print(f"  {label:18s}: n/a ({str(error).splitlines()[0][:100]})")
                continue
            error = (out.float() - exact).abs().max().item()
            print(f"  {label:18s}: {micros:8.1f} µs/call  {needed / micros / 1e3:7.1f} GB/s  max |err| {error:.2e}",
                  flush=True)
        del tensors
        if on_cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
