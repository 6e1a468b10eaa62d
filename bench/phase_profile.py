"""Where one batch of latent_mas spends its time: wall time per phase and GPU time per kind of kernel.

    python bench/phase_profile.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl --batch_size 64 --compile_step

Two warm-up batches first (another batch, then the timed one: compiles, records the graphs, the
prompt prefills' chunks of every size the timed batch needs), then one batch timed phase by phase
(device synced around each: prompt prefills, latent steps, the judger's prefill and decode),
then the same batch under the torch profiler, its kernels summed by kind (GEMMs, prefill
attention, step attention, fused triton, sort, other) with the top kernels by GPU time.
Settings as `latentmas_speed.py` (latent_steps 10, 256 decoded tokens, EOS ignored).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from unittest import mock

import click
import torch
from common import machine, prefill_kind, speed_config, sync

from latentmas.methods import common, get_method
from latentmas.methods import latent_mas as method
from latentmas.models import load_model
from latentmas.shared_cache import SharedCache
from latentmas.tasks import get_task, load_problems

KINDS = [  # (kind, pattern on the kernel's name), first match wins
    ("GEMM", r"nvjet|gemm|cutlass.*(?:gemm|Kernel)|splitKreduce|cublas"),
    ("step attention (split-KV)", r"^split_kernel|^combine_kernel"),
    ("fused triton", r"^triton_"),  # before attention: inductor names kernels after the ops they fuse
    ("prefill attention", r"fmha|flash|sdpa|attention|efficient"),
    ("sort (top-p)", r"radix_sort|RadixSort|sort"),
    ("copies", r"[Cc]opy|Memcpy|Memset|cat_|CatArray"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other elementwise / reductions"


class PhaseTimer:
    """Wall seconds per phase, the device synced around each timed call."""

    def __init__(self, device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, function):
        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            out = function(*args, **kwargs)
            sync(self.device)
            self.seconds[phase] += time.perf_counter() - start
            return out
        return timed


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--batch_size", default=64, show_default=True)
@click.option("--compile_step", is_flag=True, help="compile the static step (torch.compile)")
@click.option("--compile_prefill", is_flag=True, help="compile the prompt prefills' layers (latentmas.compiled_prefill)")
@click.option("--eager_prefill", is_flag=True, help="prefill prompts eagerly, not in chunks replayed as CUDA graphs "
                                                   "(latentmas.graph_prefill)")
@click.option("--top", default=25, show_default=True, help="kernels listed")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, data_file, batch_size, compile_step, compile_prefill, eager_prefill, top, device):
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, 2 * batch_size)
    lm = load_model(model_name, device, random_weights=random_weights)
    cfg = speed_config(model_name=model_name, random_weights=random_weights, data_file=data_file,
                       max_new_tokens=256, generate_bs=batch_size, device=device, compile_step=compile_step,
                       compile_prefill=compile_prefill, graph_prefill=not eager_prefill)
    solve = get_method("latent_mas")
    print(f"machine: {machine(lm)}; batch size {batch_size}; step {'compiled' if compile_step else 'eager'}; "
          f"prefills {prefill_kind(compile_prefill, eager_prefill, batch_size)}")
    batch = problems[:batch_size]
    solve(lm, problems[batch_size:], task, cfg)  # warm-up: compiles, records graphs
    solve(lm, batch, task, cfg)  # and the prefill chunks of the sizes the timed batch needs

    timer = PhaseTimer(lm.device)
    extend = SharedCache.extend
    with (mock.patch.object(SharedCache, "extend", lambda self, *a, **k: timer.wrap(
              "prompt prefills" if a[0].shape[1] > 1 else "one-column steps (plain path)", extend)(self, *a, **k)),
          mock.patch.object(method, "think_latently", timer.wrap("latent steps", method.think_latently)),
          mock.patch.object(common, "generate", timer.wrap("judger decode (with its prefill)", common.generate))):
        sync(lm.device)
        start = time.perf_counter()
        solve(lm, batch, task, cfg)
        sync(lm.device)
        total = time.perf_counter() - start
    print("\n| phase | s per batch | ms per problem | share |\n|---|---|---|---|")
    judger_prefill = 0.0
    for phase, seconds in timer.seconds.items():
        print(f"| {phase} | {seconds:.3f} | {1e3 * seconds / batch_size:.2f} | {seconds / total:.1%} |")
        judger_prefill += seconds if phase == "prompt prefills" else 0.0
    print(f"| whole batch | {total:.3f} | {1e3 * total / batch_size:.2f} | 100% |")
    print("(the judger's prompt prefill is counted in both 'prompt prefills' and 'judger decode')")

    if lm.device.type != "cuda":
        return
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        solve(lm, batch, task, cfg)
        sync(lm.device)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_kind[kind_of(e.key)] += e.self_device_time_total
    gpu = sum(by_kind.values())
    print(f"\nGPU time of one batch: {gpu / 1e3:.1f} ms (wall {total * 1e3:.1f} ms unprofiled)")
    print("\n| kernels | GPU ms per batch | share |\n|---|---|---|")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e3:.1f} | {us / gpu:.1%} |")
    print("\n| top kernels | kind | calls | GPU ms | µs per call |\n|---|---|---|---|---|")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"| {e.key[:90]} | {kind_of(e.key)} | {e.count} | {e.self_device_time_total / 1e3:.1f} | "
              f"{e.self_device_time_total / max(e.count, 1):.1f} |")


if __name__ == "__main__":
    main()
