"""Where a decode step's time and memory go on a GPU (diagnostic, prints raw figures).

    python bench/decode_probe.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl
"""

from __future__ import annotations

import gc
import time

import click
import torch
from common import machine, sync

from latentmas.config import RunConfig
from latentmas.decoding import Sampler, Sampling, problem_generators
from latentmas.fast_decode import StaticStep, capacity_for
from latentmas.methods import get_method
from latentmas.methods.common import encode
from latentmas.prompts import agent_prompt
from latentmas.shared_cache import SegmentKey, SharedCache
from latentmas.tasks import get_task, load_problems


def _timed(fn, n, device):
    """ms per call of `fn`, over `n` calls after one untimed warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - start) / n * 1000


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--passes", default=5)
@click.option("--batch", default=1, show_default=True, help="batch size of the single-step timings")
@click.option("--capacities", default="", help="extra buffer sizes to time the graph step at, comma-separated")
@click.option("--device", default="cuda")
def main(model_name, random_weights, data_file, passes, batch, capacities, device):
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, 1)
    from latentmas.models import load_model

    lm = load_model(model_name, device, random_weights=random_weights)
    device = lm.device
    print(f"machine: {machine(lm)}")
    cfg = RunConfig(model_name=model_name, max_new_tokens=256, ignore_eos=True, latent_steps=10)
    for i in range(passes):  # whole problems: time and memory left allocated
        start = time.perf_counter()
        get_method("latent_mas")(lm, problems, task, cfg)
        sync(device)
        gc.collect()
        memory = (f"allocated after {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB, reserved "
                  f"{torch.cuda.memory_reserved(device) / 2**20:.0f} MiB" if device.type == "cuda" else "")
        print(f"pass {i + 1}: {time.perf_counter() - start:.3f} s {memory}")
    # one decode step, piece by piece
    prompt = agent_prompt("judger", problems[0].question, task.answer_instruction)
    _, ids, mask = encode(lm, [prompt] * batch, think=False)
    shared = SharedCache(lm, batch)
    logits = shared.extend(lm.model.get_input_embeddings()(ids), mask, ids, SegmentKey("judger", "prompt"),
                           logits=True)
    token = logits.argmax(-1)
    sizes = [capacity_for(shared.length + 300)] + [int(c) for c in capacities.split(",") if c]
    print(f"batch {batch}, {shared.length} cached columns")
    for use_graph in ((True, False) if device.type == "cuda" else (False,)):
        for capacity in sizes if use_graph else sizes[:1]:
            start = time.perf_counter()
            step = StaticStep(lm, batch, capacity, use_graph=use_graph).start(shared)
            sync(device)
            print(f"capacity {capacity}, graph={use_graph}: set-up {(time.perf_counter() - start) * 1000:.1f} ms, "
                  f"run {_timed(lambda: step.run(token), 50, device):.2f} ms")
            del step
    sampler = Sampler(Sampling(256, 0.6, 0.95), problem_generators(list(range(1, batch + 1)), 0, device))
    print(f"sampler: {_timed(lambda: sampler(logits), 50, device):.2f} ms")
    ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
    embed = lm.model.get_input_embeddings()
    print(f"plain extend step: {_timed(lambda: shared.extend(embed(token[:, None]), ones, token[:, None], SegmentKey('judger', 'output'), logits=True), 20, device):.2f} ms")
    if device.type == "cuda":
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        step = StaticStep(lm, batch, sizes[0], use_graph=True).start(shared)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                logits = step.run(sampler(logits))
            sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
