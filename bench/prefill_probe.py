"""What a prompt prefill on the shared cache costs, and how much of it is the host.

    python bench/prefill_probe.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights --batch_sizes 1,16,64

For each batch size and each choice of SDPA kernels (`shared_cache.PREFILL_BACKENDS`), and for ours
compiled too (`--compiled`, `latentmas.compiled_prefill`) or in chunks replayed as CUDA graphs
(`--graphed`, `latentmas.graph_prefill`), a cache of T columns is prefilled and then an
n-token, left-padded prompt is prefilled on it (`SharedCache.extend`, as an agent's prompt).
Lengths are drawn afresh for every timed prefill (as every batch of problems brings new
shapes) and, apart, kept the same (shapes seen before). Reported: wall ms per prefill (device
synced), and the host's ms to queue it (until `extend` returns, before the sync); for a compiled
or graphed variant also the seconds its warm-up took (the compiling, the graphs recorded). `--backend
ours --compiled --graphed` times ours eager, compiled and graphed only. A graphed prefill records a
graph for each chunk size it has not met on the storage it runs on, and a cache that needs more room
than the model's storage has gets new storage: fresh shapes pay for some recordings.
"""

from __future__ import annotations

import random
import statistics
import time

import click
import torch
from common import machine, sync
from torch.nn.attention import SDPBackend

from latentmas import shared_cache
from latentmas.models import load_model
from latentmas.shared_cache import SegmentKey, SharedCache

BACKENDS = {  # name -> `shared_cache.PREFILL_BACKENDS` for the run
    "torch's choice": None,
    "ours (PREFILL_BACKENDS)": shared_cache.PREFILL_BACKENDS,
    "cuDNN only": [SDPBackend.CUDNN_ATTENTION],
    "efficient only": [SDPBackend.EFFICIENT_ATTENTION],
}
SHORT = dict(zip(("torch", "ours", "cudnn", "efficient"), BACKENDS))  # --backend's names
COMPILED = "ours (PREFILL_BACKENDS)"  # timed compiled too with --compiled (a compiled forward keeps the
# kernels it was traced with, so other backends would need a process each)


def prompt(lm, batch: int, n: int, rng: random.Random):
    """Random ids `[batch, n]`, left padded to random real lengths in [n/2, n] (one row full)."""
    ids = torch.randint(0, lm.model.get_input_embeddings().num_embeddings, (batch, n), device=lm.device)
    lengths = [n] + [rng.randint(n // 2, n) for _ in range(batch - 1)]
    mask = torch.arange(n, device=lm.device)[None, :] >= torch.tensor([n - k for k in lengths], device=lm.device)[:, None]
    return lm.model.get_input_embeddings()(ids), mask, ids


def one_prefill(lm, batch: int, cached: int, n: int, rng: random.Random, forward: str) -> tuple[float, float]:
    """(wall s, host s) of an n-token prompt prefilled on a cache of `cached` columns; forward: eager,
    compiled or graphed."""
    shared = SharedCache(lm, batch, capacity=cached + n + 16, compiled=forward == "compiled",
                         graphed=forward == "graphed")
    shared.extend(*prompt(lm, batch, cached, rng), SegmentKey("planner", "prompt"))
    embeds, mask, ids = prompt(lm, batch, n, rng)
    sync(lm.device)
    start = time.perf_counter()
    shared.extend(embeds, mask, ids, SegmentKey("critic", "prompt"))
    host = time.perf_counter() - start
    sync(lm.device)
    return time.perf_counter() - start, host


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--batch_sizes", default="1,16,64", show_default=True)
@click.option("--repeats", default=6, show_default=True)
@click.option("--backend", "backends", multiple=True, type=click.Choice(list(SHORT)), default=list(SHORT),
              show_default=True, help=f"an eager variant to time (repeat for more): "
                                      f"{', '.join(f'{k} = {v}' for k, v in SHORT.items())}")
@click.option("--compiled", is_flag=True, help=f"also time {COMPILED} with compiled layers")
@click.option("--graphed", is_flag=True, help=f"also time {COMPILED} in chunks replayed as CUDA graphs")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, batch_sizes, repeats, backends, compiled, graphed, device):
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; model {model_name}")
    print("\n| batch | SDPA backends | forward | shapes | wall ms per prefill | host ms |\n|---|---|---|---|---|---|")
    variants = ([(SHORT[key], "eager") for key in backends] + ([(COMPILED, "compiled")] if compiled else [])
                + ([(COMPILED, "graphed")] if graphed else []))
    for batch in (int(b) for b in batch_sizes.split(",")):
        for name, forward in variants:
            rng = random.Random(batch)
            shared_cache.PREFILL_BACKENDS = BACKENDS[name]
            with torch.no_grad():
                start = time.perf_counter()
                try:
                    one_prefill(lm, batch, 400, 200, rng, forward)  # warm-up: an empty cache, then 400 columns
                except RuntimeError as error:  # no such kernel on this device
                    print(f"| {batch} | {name} | {forward} | - | not available: {str(error).splitlines()[0][:60]} | |")
                    continue
                if forward != "eager":
                    print(f"| {batch} | {name} | {forward} | warm-up | {time.perf_counter() - start:.1f} s | |")
                for shapes in ("fresh", "repeated"):
                    times = []
                    for _ in range(repeats):
                        cached, n = (rng.randint(300, 900), rng.randint(150, 260)) if shapes == "fresh" else (600, 200)
                        times.append(one_prefill(lm, batch, cached, n, rng, forward))
                    wall = statistics.median(t[0] for t in times)
                    host = statistics.median(t[1] for t in times)
                    print(f"| {batch} | {name} | {forward} | {shapes} | {wall * 1e3:.1f} | {host * 1e3:.1f} |",
                          flush=True)

if __name__ == "__main__":
    main()
