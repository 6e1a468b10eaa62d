"""Where a decode step's time and memory go on a GPU (diagnostic, prints raw figures).

    python bench/decode_probe.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl
"""

from __future__ import annotations

import contextlib
import gc
import re
import time

import click
import common
import torch
from common import machine, sync

from latentmas import fast_decode, sampling
from latentmas.config import RunConfig
from latentmas.decoding import Sampler, Sampling, problem_generators
from latentmas.fast_decode import static_step
from latentmas.kernels import split_k as split_k_module
from latentmas.methods import get_method
from latentmas.methods.common import encode
from latentmas.prompts import agent_prompt
from latentmas.shared_cache import SegmentKey, SharedCache
from latentmas.step_attention import use_kernel
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
@click.option("--capacity", default=1131, show_default=True,
              help="columns the single-step caches make room for (a batch of 64 GSM8K problems needs 1,131)")
@click.option("--compile_step", is_flag=True, help="also time the compiled step (compiling takes minutes)")
@click.option("--profile/--no-profile", default=True, help="profile the fastest sampling step of each batch size")
@click.option("--argmax_slices", default="", help="with --compile_step: also time the compiled sampling step with "
              "each of these `sampling.ARGMAX_SLICES` (e.g. 128,1: the sampler's argmax in slices, then in one stage)")
@click.option("--stop21_sampler", is_flag=True, help="with --compile_step: also time the compiled sampling step "
              "with today's top-p and stop 21's (float32 sort keys, one scan over the row), side by side")
@click.option("--as_stop21", is_flag=True, help="run everything with stop 21's top-p (`common.stop21_sampler`), "
              "to tell its effect on the whole process from that on the sampling step")
@click.option("--autotune_report", default="", metavar="PATTERN", help="print inductor's autotuning timings and "
              "the config it chose for the generated kernels whose name contains PATTERN (e.g. rsqrt_sin)")
@click.option("--tuned_reductions", is_flag=True, help="compile the step as before stop 23: inductor picks each "
              "reduction's launch config by timing (`fast_decode.STEP_INDUCTOR_OPTIONS` emptied)")
@click.option("--split_k", default="", metavar="VARIANTS", help="with --compile_step at batch size 1: also time the "
              "compiled sampling step with each of these `kernels.split_k.SPLITS` (FEW:MANY slices, or off), "
              "each compiled afresh, e.g. off,4:1,off,4:1")
@click.option("--device", default="cuda")
def main(model_name, random_weights, data_file, passes, batch_sizes, capacity, compile_step, profile, argmax_slices,
         stop21_sampler, as_stop21, autotune_report, tuned_reductions, split_k, device):
    if tuned_reductions:
        fast_decode.STEP_INDUCTOR_OPTIONS = {}  # read when the step is compiled
    if autotune_report:
        common.log_autotuning(autotune_report)
    with common.stop21_sampler() if as_stop21 else contextlib.nullcontext():
        probe(model_name, random_weights, data_file, passes, batch_sizes, capacity, compile_step, profile,
              argmax_slices, stop21_sampler, split_k, device)
    if autotune_report:
        print(common.chosen_configs(autotune_report))


def probe(model_name, random_weights, data_file, passes, batch_sizes, capacity, compile_step, profile, argmax_slices,
          stop21_sampler, split_k, device):
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
    if not compile_step:
        variants = [v for v in variants if not v[2]]
    embed = lm.model.get_input_embeddings()
    print(f"step attention: {'split-KV kernel' if use_kernel(device) else 'SDPA'}")
    fastest = None
    saved_splits = dict(split_k_module.SPLITS)
    for batch in [int(b) for b in batch_sizes.split(",")]:
        _, ids, mask = encode(lm, [prompt] * batch, think=False)
        shared = SharedCache(lm, batch, capacity=capacity)
        logits = shared.extend(embed(ids), mask, ids, SegmentKey("judger", "prompt"), logits=True)
        sampler = Sampler(Sampling(256, 0.6, 0.95), problem_generators(list(range(1, batch + 1)), 0, device))
        token = sampler(logits)
        print(f"batch {batch}, {shared.length} cached columns, {shared.storage.capacity} slots")
        for name, use_graph, compiled in variants:
            for label, with_sampler in (("logits", None), ("sampled", sampler)):
                start = time.perf_counter()
                step = static_step(lm, shared, 200, use_graph=use_graph, compiled=compiled, sampler=with_sampler)
                sync(device)
                setup = time.perf_counter() - start
                print(f"  graph step {name:8s} {label:8s}: set-up {setup:7.2f} s, run "
                      f"{_timed(lambda step=step: step.run(token), 100, device):.3f} ms/step", flush=True)
                if with_sampler is not None and (fastest is None or compiled):
                    fastest = (step, token)
        if device.type == "cuda" and profile and fastest is not None:
            _profile(*fastest, device, batch)  # before the steps below replace it
        fastest = None
        print(f"  sampler outside a graph (t 0.6, top-p 0.95): {_timed(lambda: sampler(logits), 50, device):.3f} ms",
              flush=True)
        for slices in (int(n) for n in argmax_slices.split(",") if n and compile_step):
            sampling.ARGMAX_SLICES = slices  # read while the sampler is traced (dynamo guards on it)
            _time_rebuilt_step(lm, shared, sampler, token, f"argmax in {slices} slice(s)")
        samplers = (("today's", contextlib.nullcontext), ("stop 21's", common.stop21_sampler))
        for label, variant in samplers * 2 if stop21_sampler and compile_step else ():
            with variant():
                _time_rebuilt_step(lm, shared, sampler, token, f"{label} top-p")
        for variant in (v for v in split_k.split(",") if v and compile_step and batch == 1):
            if variant != "off" and not re.fullmatch(r"\d+:\d+", variant):
                raise click.BadParameter(f"{variant!r}: give FEW:MANY slices (e.g. 4:1) or off", param_hint="--split_k")
            few, many = (0, 0) if variant == "off" else (int(n) for n in variant.split(":"))
            split_k_module.SPLITS.update(few=few, many=many)
            torch._dynamo.reset()  # compile afresh (inductor's cache still serves a variant seen before)
            fast_decode._COMPILED.clear()
            _time_rebuilt_step(lm, shared, sampler, token, f"split-K {variant}", profile=profile)
        split_k_module.SPLITS.update(saved_splits)
        del shared
        lm.static_steps.clear()


def _time_rebuilt_step(lm, shared, sampler, token, label: str, profile: bool = False) -> None:
    """Compile and record the sampling step afresh (the sampler traced again) and print three timings
    of 100 steps (and, with `profile`, its top kernels)."""
    sampling._COMPILED.clear()
    lm.static_steps.clear()
    step = static_step(lm, shared, 200, compiled=True, sampler=sampler)
    times = [_timed(lambda: step.run(token), 100, lm.device) for _ in range(3)]
    print(f"  graph step compiled sampled, {label}: {' / '.join(f'{t:.3f}' for t in times)} ms/step", flush=True)
    if profile and lm.device.type == "cuda":
        _profile(step, token, lm.device, shared.batch_size)


def _profile(step, token, device, batch: int, steps: int = 10) -> None:
    """The top kernels of `steps` runs of `step` (the fastest sampling step of this batch size)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = step.run(token)
        sync(device)
    print(f"  profile of {steps} sampling steps at batch {batch}:")
    print(common.top_kernels(prof, 25))


if __name__ == "__main__":
    main()
