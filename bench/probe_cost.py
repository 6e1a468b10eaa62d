"""What the `query` and `attention` hooks cost per prompt prefill (diagnostic, prints raw figures).

Builds a shared cache of `--cache_tokens` columns, then times one prompt prefill of
`--prompt_tokens` on it (the cache restored after each) with no probe and with a
`PrefillProbe` per mode, rounds rotating, device synced around each prefill. `--eager` also
times `query` with its fused (torch.compile) part run eager; `--profile` prints torch.profiler's
busiest ops for one prefill each of off, `query` and `attention` (default chunk, compiled).

    python bench/probe_cost.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights --profile
"""

from __future__ import annotations

import contextlib
import statistics
import time
from unittest import mock

import click
import torch
from common import machine, rotations, sync

from latentmas import prefill as hooks
from latentmas.models import load_model
from latentmas.prefill import PrefillProbe
from latentmas.shared_cache import SegmentKey, SharedCache
from latentmas.similarity import maths as similarity


def _prompt(lm, batch: int, n: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.tokenizer.vocab_size, (batch, n), generator=generator).to(lm.device)
    mask = torch.ones(batch, n, dtype=torch.bool, device=lm.device)
    return lm.model.get_input_embeddings()(ids), mask, ids


def _prefill(shared, prompt, variant: str, chunk: int, fused: bool = True):
    """One prompt prefill on `shared` (restored after), watched by a `variant` probe unless "off"."""
    embeds, mask, ids = prompt
    devices = similarity.FUSED_DEVICE_TYPES if fused else ()
    with mock.patch.object(hooks, "LAYER_CHUNK_ELEMENTS", chunk), mock.patch.object(similarity, "FUSED_DEVICE_TYPES",
                                                                                    devices), \
            torch.no_grad(), shared.restored():
        probe = None if variant == "off" else PrefillProbe(shared, mask, variant)  # reads the chunk size
        with probe or contextlib.nullcontext():
            shared.extend(embeds, mask, ids, SegmentKey("critic", "prompt"))
    return None if probe is None else probe.result()


def _label(variant) -> str:
    mode, chunk, fused = variant
    return f"{mode:>9} chunk {chunk:>9}{'' if fused else ' eager'}"


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--cache_tokens", default=600, show_default=True, help="T, the cache's columns at the hand-off")
@click.option("--prompt_tokens", default=250, show_default=True, help="n, the incoming prompt's tokens")
@click.option("--batch", default=1, show_default=True)
@click.option("--repeats", default=20, show_default=True)
@click.option("--chunks", default="", help="extra LAYER_CHUNK_ELEMENTS values to time `query` with, comma-separated")
@click.option("--eager", is_flag=True, help="also time `query` with torch.compile off")
@click.option("--profile", is_flag=True,
              help="print torch.profiler's busiest ops for one prefill each of off, query and attention")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, cache_tokens, prompt_tokens, batch, repeats, chunks, eager, profile, device):
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; {lm.num_layers} layers; batch {batch}, T {cache_tokens}, n {prompt_tokens}")
    shared = SharedCache(lm, batch)
    with torch.no_grad():
        shared.extend(*_prompt(lm, batch, cache_tokens, 0), SegmentKey("planner", "prompt"))
    prompt = _prompt(lm, batch, prompt_tokens, 1)
    default = hooks.LAYER_CHUNK_ELEMENTS
    variants = [("off", default, True), ("query", default, True), ("attention", default, True)]
    variants += [("query", int(c), True) for c in chunks.split(",") if c.strip()]
    variants += [("query", default, False)] if eager else []
    variants = list(dict.fromkeys(variants))  # a --chunks value equal to the default is timed once
    for variant in variants:  # warm up (and compile)
        start = time.perf_counter()
        _prefill(shared, prompt, *variant)
        sync(lm.device)
        print(f"first prefill, {_label(variant)}: {time.perf_counter() - start:.2f} s")
    times: dict = {v: [] for v in variants}
    peaks: dict = {}
    for order in rotations(variants, repeats):
        for variant in order:
            sync(lm.device)
            if lm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(lm.device)
            start = time.perf_counter()
            _prefill(shared, prompt, *variant)
            sync(lm.device)
            times[variant].append(time.perf_counter() - start)
            if lm.device.type == "cuda":
                peaks[variant] = max(peaks.get(variant, 0.0), torch.cuda.max_memory_allocated(lm.device) / 2**20)
    off = statistics.median(times[variants[0]])
    for variant in variants:
        median = statistics.median(times[variant])
        peak = f", peak {peaks[variant]:.0f} MiB" if variant in peaks else ""
        print(f"{_label(variant)}: {median * 1000:8.2f} ms per prefill "
              f"(+{(median - off) * 1000:.2f} ms){peak}")
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if lm.device.type == "cuda" else [])
        for variant in ("off", "query", "attention"):
            with torch_profile(activities=activities) as prof:
                _prefill(shared, prompt, variant, default)
                sync(lm.device)
            sort_by = "self_device_time_total" if lm.device.type == "cuda" else "self_cpu_time_total"
            print(f"--- {variant} ---")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=18, max_name_column_width=70))

if __name__ == "__main__":
    main()
