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
ours --compiled --graphed` times ours eager, compiled and graphed only; `--attention grouped --attention
transformers` times the eager and compiled forwards attending on the unrepeated GQA keys (ours,
`latentmas.prefill_attention`) and through transformers' SDPA path (which repeats them) side by side; `--prompts packed
--prompts padded` times the prompts on their real tokens only (`latentmas.packed_prefill`, the default) and with
their padding (every row but one has between n/2 and n real tokens); `--profile` then runs one more
prefill of each variant (repeated shapes) under the torch profiler and prints its GPU time by kind of
kernel and its top kernels. A graphed prefill records a
graph for each chunk size it has not met on the storage it runs on, and a cache that needs more room
than the model's storage has gets new storage: fresh shapes pay for some recordings.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time

import click
import torch
from common import by_kind, kernel_times, machine, sync
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
ATTENTIONS = {"grouped": True, "transformers": False}  # --attention's names -> shared_cache.GROUPED_PREFILL
PROMPTS = {"packed": True, "padded": False}  # --prompts' names -> SharedCache(packed=...)
COMPILED = "ours (PREFILL_BACKENDS)"  # timed compiled too with --compiled (a compiled forward keeps the
# kernels it was traced with, so other backends would need a process each)


def prompt(lm, batch: int, n: int, rng: random.Random):
    """Random ids `[batch, n]`, left padded to random real lengths in [n/2, n] (one row full)."""
    ids = torch.randint(0, lm.model.get_input_embeddings().num_embeddings, (batch, n), device=lm.device)
    lengths = [n] + [rng.randint(n // 2, n) for _ in range(batch - 1)]
    mask = torch.arange(n, device=lm.device)[None, :] >= torch.tensor([n - k for k in lengths], device=lm.device)[:, None]
    return lm.model.get_input_embeddings()(ids), mask, ids


def one_prefill(lm, batch: int, cached: int, n: int, rng: random.Random, forward: str,
                profiler=contextlib.nullcontext, packed: bool = True) -> tuple[float, float]:
    """(wall s, host s) of an n-token prompt prefilled on a cache of `cached` columns; forward: eager,
    compiled or graphed; packed: on the real tokens only (`latentmas.packed_prefill`), else padding
    included; the prompt's prefill runs inside `profiler()`."""
    shared = SharedCache(lm, batch, capacity=cached + n + 16, compiled=forward == "compiled",
                         graphed=forward == "graphed", packed=packed)
    shared.extend(*prompt(lm, batch, cached, rng), SegmentKey("planner", "prompt"))
    embeds, mask, ids = prompt(lm, batch, n, rng)
    sync(lm.device)
    with profiler():
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
@click.option("--attention", "attentions", multiple=True, type=click.Choice(list(ATTENTIONS)), default=["grouped"],
              show_default=True, help="the eager and compiled forwards' attention (repeat for both): grouped = on "
                                      "the unrepeated GQA keys (latentmas.prefill_attention), transformers = "
                                      "transformers' SDPA path, which repeats them")
@click.option("--prompts", multiple=True, type=click.Choice(list(PROMPTS)), default=["packed"], show_default=True,
              help="the eager and compiled forwards' prompts (repeat for both): packed = their real tokens only "
                   "(latentmas.packed_prefill; with grouped attention only), padded = padding included")
@click.option("--profile", "top", type=click.IntRange(min=0), default=0, show_default=True,
              help="profile one more prefill of each variant (repeated shapes) and list this many top kernels")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, batch_sizes, repeats, backends, compiled, graphed, attentions, prompts, top,
         device):
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; model {model_name}")
    print("\n| batch | SDPA backends | forward | shapes | wall ms per prefill | host ms |\n|---|---|---|---|---|---|")
    kinds = [(a, p if a == "grouped" else "padded") for p in prompts for a in attentions]  # packed: grouped only
    kinds = list(dict.fromkeys(kinds))
    variants = ([(SHORT[key], "eager", a, p) for a, p in kinds for key in backends]
                + ([(COMPILED, "compiled", a, p) for a, p in kinds] if compiled else [])
                + ([(COMPILED, "graphed", "grouped", "padded")] if graphed else []))
    profiles = []
    for batch in (int(b) for b in batch_sizes.split(",")):
        for backends_name, forward, attention, kind in variants:
            packed = PROMPTS[kind]
            rng = random.Random(batch)
            shared_cache.PREFILL_BACKENDS = BACKENDS[backends_name]
            shared_cache.GROUPED_PREFILL = ATTENTIONS[attention]
            name = backends_name if forward == "graphed" else f"{backends_name}, {attention} attention, {kind}"
            with torch.no_grad():
                start = time.perf_counter()
                try:
                    one_prefill(lm, batch, 400, 200, rng, forward, packed=packed)  # warm-up: an empty cache, then 400 columns
                except RuntimeError as error:  # no such kernel on this device
                    print(f"| {batch} | {name} | {forward} | - | not available: {str(error).splitlines()[0][:60]} | |")
                    continue
                if forward != "eager":
                    print(f"| {batch} | {name} | {forward} | warm-up | {time.perf_counter() - start:.1f} s | |")
                for shapes in ("fresh", "repeated"):
                    times = []
                    for _ in range(repeats):
                        cached, n = (rng.randint(300, 900), rng.randint(150, 260)) if shapes == "fresh" else (600, 200)
                        times.append(one_prefill(lm, batch, cached, n, rng, forward, packed=packed))
                    wall = statistics.median(t[0] for t in times)
                    host = statistics.median(t[1] for t in times)
                    print(f"| {batch} | {name} | {forward} | {shapes} | {wall * 1e3:.1f} | {host * 1e3:.1f} |",
                          flush=True)
                if top:
                    profiles.append((f"batch {batch}, {name}, {forward}", profiled(lm, batch, rng, forward, packed)))
    for title, kernels in profiles:
        print_profile(title, kernels, top)


def profiled(lm, batch: int, rng: random.Random, forward: str, packed: bool) -> dict[str, tuple[int, float]]:
    """One repeated-shape prefill (600 cached columns, a 200-token prompt) under the torch profiler:
    kernel name -> (calls, GPU µs)."""
    holder, cuda = {}, lm.device.type == "cuda"  # on the CPU: its ops, for trying the probe out
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU

    @contextlib.contextmanager
    def profiler():
        with torch.profiler.profile(activities=[activity]) as prof:
            yield
        holder["prof"] = prof

    one_prefill(lm, batch, 600, 200, rng, forward, profiler, packed)
    return kernel_times(holder["prof"], torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU)


def print_profile(title: str, kernels: dict[str, tuple[int, float]], top: int) -> None:
    total = sum(us for _, us in kernels.values())
    print(f"\n{title}: GPU {total / 1e3:.1f} ms; by kind: "
          + ", ".join(f"{kind} {us / 1e3:.1f}" for kind, us in sorted(by_kind(kernels).items(), key=lambda kv: -kv[1])))
    print("| kernel | calls | GPU ms | µs per call |\n|---|---|---|---|")
    for name, (calls, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name[:100]} | {calls} | {us / 1e3:.2f} | {us / max(calls, 1):.1f} |")

if __name__ == "__main__":
    main()
