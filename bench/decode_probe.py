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
from latentmas.fast_decode import StaticStep
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
@click.option("--passes", default=3, help="whole problems solved first (time and memory left allocated)")
@click.option("--batch_sizes", default="1", show_default=True, help="batch sizes of the single-step timings")
@click.option("--capacity", default=2048, show_default=True, help="buffer size of the single-step timings")
@click.option("--profile/--no-profile", default=True, help="profile the fastest step at the first batch size")
@click.option("--device", default="cuda")
def main(model_name, random_weights, data_file, passes, batch_sizes, capacity, profile, device):
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, 1)
    from latentmas.models import load_model

    lm = load_model(model_name, device, random_weights=random_weights)
    device = lm.device
    print(f"machine: {machine(lm)}")
    cfg = RunConfig(model_name=model_name, max_new_tokens=256, ignore_eos=True, latent_steps=10)
    for i in range(passes):
        start = time.perf_counter()
        get_method("latent_mas")(lm, problems, task, cfg)
        sync(device)
        gc.collect()
        memory = (f"allocated after {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB, reserved "
                  f"{torch.cuda.memory_reserved(device) / 2**20:.0f} MiB" if device.type == "cuda" else "")
        print(f"pass {i + 1}: {time.perf_counter() - start:.3f} s {memory}", flush=True)
    lm.static_steps.clear()
    prompt = agent_prompt("judger", problems[0].question, task.answer_instruction)
    variants = [("compiled", True, True), ("eager", True, False)] if device.type == "cuda" else [
        ("eager", False, False)]
    embed = lm.model.get_input_embeddings()
    fastest = None
    for batch in [int(b) for b in batch_sizes.split(",")]:
        _, ids, mask = encode(lm, [prompt] * batch, think=False)
        shared = SharedCache(lm, batch)
        logits = shared.extend(embed(ids), mask, ids, SegmentKey("judger", "prompt"), logits=True)
        token = logits.argmax(-1)
        print(f"batch {batch}, {shared.length} cached columns, capacity {capacity}")
        for name, use_graph, compiled in variants:
            start = time.perf_counter()
            step = StaticStep(lm, batch, capacity, use_graph=use_graph, compiled=compiled).start(shared)
            sync(device)
            setup = time.perf_counter() - start
            print(f"  graph step {name:15s}: set-up {setup:7.2f} s, run {_timed(lambda: step.run(token), 100, device):.3f} "
                  f"ms/step", flush=True)
            if fastest is None:
                fastest = step
            else:
                del step
        sampler = Sampler(Sampling(256, 0.6, 0.95), problem_generators(list(range(1, batch + 1)), 0, device))
        print(f"  sampler (t 0.6, top-p 0.95): {_timed(lambda: sampler(logits), 50, device):.3f} ms", flush=True)
    if device.type == "cuda" and profile and fastest is not None:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        batch = fastest.kv.mask.shape[0]
        sampler = Sampler(Sampling(256, 0.6, 0.95), problem_generators(list(range(1, batch + 1)), 0, device))
        logits = fastest.run(token[:batch])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                logits = fastest.run(sampler(logits))
            sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
