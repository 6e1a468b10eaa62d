"""Peak memory of the seed similarity over every layer: all layers stacked at once against one at a time.

    python bench/similarity_memory.py                   # CPU: peak RSS growth, a fresh process each
    python bench/similarity_memory.py --device cuda     # GPU: torch's peak allocated memory

Qwen3-4B's cache shape (36 layers, 8 kv heads, head_dim 128, hidden 2560), `--batch` problems of
`--columns` cached columns (1,131 is what a batch of 64 GSM8K problems needs), random keys. "stacked"
is `layer_similarities` as it was before session 15 (the fp32 head means of every layer in one
`[B, L, T, D]` tensor, then one cosine over it); "per layer" is `latentmas.similarity.maths` now.
The two results are compared too.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import click
import torch
import torch.nn.functional as F
from common import child_result, machine, peak_bytes  # first: puts the repository on the path

from latentmas.similarity.maths import layer_similarities, reduce_query

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 36, 8, 128, 2560


def stacked(keys, query):
    """`layer_similarities` before session 15: every layer's head means at once."""
    head_mean_keys = torch.stack([k.mean(dim=1, dtype=torch.float32) for k in keys], dim=1)  # [B, L, T, D]
    q = reduce_query(query, keys[0].shape[-1])
    return F.cosine_similarity(head_mean_keys, q[:, None, None, :], dim=-1)


def _measure(device_name: str, batch: int, columns: int, way: str) -> dict:
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    keys = [torch.randn(batch, KV_HEADS, columns, HEAD_DIM, generator=generator, device=device, dtype=dtype)
            for _ in range(LAYERS)]
    query = torch.randn(batch, HIDDEN, generator=generator, device=device, dtype=dtype)
    function = stacked if way == "stacked" else layer_similarities
    function([k[:1, :, :4] for k in keys], query[:1])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_bytes(device)
    start = time.perf_counter()
    result = function(keys, query)
    after = peak_bytes(device)
    seconds = time.perf_counter() - start
    other = (layer_similarities if way == "stacked" else stacked)(keys[:4], query)
    difference = (other - result[:, :4]).abs().max().item()
    return {"peak_mib": (after - before) / 2**20, "seconds": seconds, "max_difference": difference}


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch", default=64, show_default=True)
@click.option("--columns", default=1131, show_default=True)
@click.option("--child", default=None, hidden=True)
def main(device, batch, columns, child):
    if child is not None:
        print(json.dumps(_measure(device, batch, columns, child)))
        return
    print(f"machine: {machine(SimpleNamespace(device=torch.device(device)))}; {LAYERS} layers x {KV_HEADS} kv heads "
          f"x {HEAD_DIM}, {batch} problems x {columns} columns")
    print("\n| layers | peak growth MiB | seconds | largest difference from the other way |\n|---|---|---|---|")
    for way in ("stacked", "per layer"):
        row = child_result(__file__, "--device", device, "--batch", str(batch), "--columns", str(columns),
                           "--child", way)
        print(f"| {way} | {row['peak_mib']:,.1f} | {row['seconds']:.3f} | {row['max_difference']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
