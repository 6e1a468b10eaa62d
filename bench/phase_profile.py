"""Where one batch of latent_mas spends its time: wall time per phase and GPU time per kind of kernel.

    python bench/phase_profile.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl --batch_size 64 --compile_step

Two warm-up batches first (another batch, then the timed one: compiles, records the graphs, the
prompt prefills' chunks of every size the timed batch needs), then one batch timed phase by phase
(device synced around each: prompt prefills, latent steps, the judger's prefill and decode),
then the same batch under the torch profiler, its kernels summed by kind (GEMMs, prefill
attention, step attention, fused triton, sort, other) with the top kernels by GPU time.
Settings as `latentmas_speed.py` (latent_steps 10, 256 decoded tokens, EOS ignored).

--capture: the timed batch and the profile run twice, capture off then on (the default `seed` mode
with its readout, into a temporary file, the batch committed as the speed bench commits it), and
the kinds and top kernels of both are printed side by side; with capture on the phases include
the recorder's own calls (synced like the others).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import click
import torch
from common import by_kind, kernel_times, kind_of, machine, prefill_kind, speed_config, sync

from latentmas.app.recording import open_recorder
from latentmas.methods import common, get_method
from latentmas.methods import latent_mas as method
from latentmas.models import load_model
from latentmas.shared_cache import SharedCache
from latentmas.tasks import get_task, load_problems


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


@contextlib.contextmanager
def fresh_recorder(path: Path | None, cfg, lm):
    """A recorder writing a new file at `path` (None: capture off), closed on exit: each batch gets its own,
    as each pass of the speed bench does."""
    if path is None:
        yield None
        return
    recorder = open_recorder(path, cfg, lm, overwrite=True)
    try:
        yield recorder
    finally:
        recorder.close()


def solve_batch(lm, batch, task, cfg, recorder=None) -> None:
    """One batch solved, and committed to `recorder` when there is one."""
    results = get_method("latent_mas")(lm, batch, task, cfg, observer=recorder)
    if recorder is not None:
        recorder.write_batch(results)


def timed_phases(lm, batch, task, cfg, capture_path: Path | None = None) -> tuple[dict[str, float], float]:
    """The batch solved with the device synced around each phase (and each of the recorder's calls, with
    `capture_path`): ({phase: seconds}, whole batch seconds). The recorder is opened and closed untimed."""
    timer = PhaseTimer(lm.device)
    extend = SharedCache.extend
    with fresh_recorder(capture_path, cfg, lm) as recorder, contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(SharedCache, "extend", lambda self, *a, **k: timer.wrap(
            "prompt prefills" if a[0].shape[1] > 1 else "one-column steps (plain path)", extend)(self, *a, **k)))
        patches.enter_context(mock.patch.object(method, "think_latently",
                                                timer.wrap("latent steps", method.think_latently)))
        patches.enter_context(mock.patch.object(common, "generate",
                                                timer.wrap("judger decode (with its prefill)", common.generate)))
        for name in ("on_handoff", "on_latent_steps", "write_batch") if recorder is not None else ():
            # while_decoding's pieces run inside the judger's decode
            patches.enter_context(mock.patch.object(recorder, name, timer.wrap(f"recorder.{name}",
                                                                               getattr(recorder, name))))
        sync(lm.device)
        start = time.perf_counter()
        solve_batch(lm, batch, task, cfg, recorder)
        sync(lm.device)
        total = time.perf_counter() - start
    return dict(timer.seconds), total


def profiled_kernels(lm, batch, task, cfg, capture_path: Path | None = None) -> dict[str, tuple[int, float]]:
    """The batch solved under the torch profiler: kernel name -> (calls, GPU µs)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with fresh_recorder(capture_path, cfg, lm) as recorder:
        with torch.profiler.profile(activities=activities) as prof:
            solve_batch(lm, batch, task, cfg, recorder)
            sync(lm.device)
    return kernel_times(prof)


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--batch_size", default=64, show_default=True)
@click.option("--compile_step", is_flag=True, help="compile the static step (torch.compile)")
@click.option("--compile_prefill", is_flag=True, help="compile the prompt prefills' layers (latentmas.compiled_prefill)")
@click.option("--eager_prefill", is_flag=True, help="prefill prompts eagerly, not in chunks replayed as CUDA graphs "
                                                   "(latentmas.graph_prefill)")
@click.option("--capture", is_flag=True, help="also time and profile the batch with capture on (seed mode, readout), "
                                              "side by side with capture off")
@click.option("--top", default=25, show_default=True, help="kernels listed")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, data_file, batch_size, compile_step, compile_prefill, eager_prefill, capture, top,
         device):
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, 2 * batch_size)
    lm = load_model(model_name, device, random_weights=random_weights)
    cfg = speed_config(model_name=model_name, random_weights=random_weights, data_file=data_file,
                       max_new_tokens=256, generate_bs=batch_size, device=device, compile_step=compile_step,
                       compile_prefill=compile_prefill, graph_prefill=not eager_prefill)
    print(f"machine: {machine(lm)}; batch size {batch_size}; step {'compiled' if compile_step else 'eager'}; "
          f"prefills {prefill_kind(compile_prefill, eager_prefill, batch_size)}")
    batch = problems[:batch_size]
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"off": None, **({"on": Path(tmp) / "profile.h5"} if capture else {})}  # name -> capture file
        solve_batch(lm, problems[batch_size:], task, cfg)  # warm-up: compiles, records graphs
        for path in variants.values():  # and the prefill chunks of the sizes the timed batch needs
            with fresh_recorder(path, cfg, lm) as recorder:
                solve_batch(lm, batch, task, cfg, recorder)
        phases = {name: timed_phases(lm, batch, task, cfg, path) for name, path in variants.items()}
        print_phases(phases, batch_size)
        if lm.device.type == "cuda":
            profiles = {name: profiled_kernels(lm, batch, task, cfg, path) for name, path in variants.items()}
            print_profiles(profiles, {name: total for name, (_, total) in phases.items()}, top)


def print_phases(phases: dict, batch_size: int) -> None:
    names = list(phases)
    print("\n| phase | " + " | ".join(f"s per batch, capture {n}" for n in names) + " | ms per problem | share |")
    print("|---|" + "---|" * (len(names) + 2))
    rows = list(dict.fromkeys(p for seconds, _ in phases.values() for p in seconds))
    last = names[-1]
    for phase in rows + ["whole batch"]:
        cells = [phases[n][1] if phase == "whole batch" else phases[n][0].get(phase) for n in names]
        last_cell = cells[-1] or 0.0
        print(f"| {phase} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) +
              f" | {1e3 * last_cell / batch_size:.2f} | {last_cell / phases[last][1]:.1%} |")
    print("(ms per problem and share: the last column; the judger's prompt prefill is counted in both "
          "'prompt prefills' and 'judger decode')")


def print_profiles(profiles: dict, totals: dict, top: int) -> None:
    names = list(profiles)
    kinds = {n: by_kind(k) for n, k in profiles.items()}
    for n in names:
        print(f"\nGPU time of one batch, capture {n}: {sum(kinds[n].values()) / 1e3:.1f} ms "
              f"(wall {totals[n] * 1e3:.1f} ms timed by phase)")
    print("\n| kernels | " + " | ".join(f"GPU ms, capture {n}" for n in names) + " |\n|---|" + "---|" * len(names))
    every_kind = {kind for k in kinds.values() for kind in k}
    for kind in sorted(every_kind, key=lambda k: -kinds[names[0]].get(k, 0.0)):
        print(f"| {kind} | " + " | ".join(f"{kinds[n].get(kind, 0.0) / 1e3:.1f}" for n in names) + " |")
    first = profiles[names[0]]
    print(f"\n| top kernels, capture {names[0]} | kind | calls | GPU ms | µs per call |\n|---|---|---|---|---|")
    for name, (calls, us) in sorted(first.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name[:90]} | {kind_of(name)} | {calls} | {us / 1e3:.1f} | {us / max(calls, 1):.1f} |")
    if len(names) > 1:  # what capture adds: the kernels whose GPU time grew, most first
        on = profiles[names[-1]]
        growth = {k: on[k][1] - first.get(k, (0, 0.0))[1] for k in on}
        grown = sorted((k for k in on if growth[k] > 0), key=lambda k: -growth[k])[:top]
        print("\n| kernels capture adds to | kind | calls off / on | GPU ms off / on |\n|---|---|---|---|")
        for name in grown:
            off_calls, off_us = first.get(name, (0, 0.0))
            print(f"| {name[:90]} | {kind_of(name)} | {off_calls} / {on[name][0]} | "
                  f"{off_us / 1e3:.1f} / {on[name][1] / 1e3:.1f} |")


if __name__ == "__main__":
    main()
