"""How much capture costs: the same problems with capture off and on, alternating, in one process.

Prints median wall time per problem and peak memory for each, and their ratios.
On a GPU use the Qwen3-4B shapes with seeded random weights (no download):

    python bench/capture_overhead.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl --problems 4 --repeats 3

Without arguments it runs on the built-in tiny-qwen3 on the CPU.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.recorder import CaptureRecorder  # noqa: E402
from latentmas.config import RunConfig  # noqa: E402
from latentmas.methods import get_method  # noqa: E402
from latentmas.models import load_model  # noqa: E402
from latentmas.tasks import get_task, load_problems  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def one_pass(lm, problems, task, cfg, capture_path: Path | None) -> tuple[float, float]:
    """Seconds per problem and peak device MiB for one pass over `problems`."""
    solve = get_method("latent_mas")
    recorder = CaptureRecorder.open(capture_path, cfg, lm, overwrite=True) if capture_path else None
    _sync(lm.device)
    _peak_reset(lm.device)
    start = time.perf_counter()
    for i in range(0, len(problems), cfg.generate_bs):
        batch = problems[i:i + cfg.generate_bs]
        results = solve(lm, batch, task, cfg, observer=recorder)
        if recorder is not None:
            recorder.write_batch(results)
    _sync(lm.device)
    elapsed = time.perf_counter() - start
    if recorder is not None:
        recorder.close()
    return elapsed / len(problems), _peak(lm.device)


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--problems", "num_problems", default=4, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="off/on pairs, alternating")
@click.option("--generate_bs", default=1, show_default=True)
@click.option("--latent_steps", default=10, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, data_file, num_problems, repeats, generate_bs, latent_steps, max_new_tokens,
         device):
    cfg = RunConfig(model_name=model_name, random_weights=random_weights, data_file=data_file,
                    latent_steps=latent_steps, max_new_tokens=max_new_tokens, ignore_eos=True, temperature=0.6,
                    top_p=0.95, generate_bs=generate_bs, device=device)
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, num_problems)
    lm = load_model(model_name, device, random_weights=random_weights)
    name = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    print(f"machine: {name}; torch {torch.__version__}; model {model_name} ({lm.num_layers} layers, "
          f"{lm.dtype}); {len(problems)} problems, bs {generate_bs}, latent_steps {latent_steps}, "
          f"max_new_tokens {max_new_tokens} (EOS ignored)")
    with tempfile.TemporaryDirectory() as tmp:
        capture_path = Path(tmp) / "bench.h5"
        one_pass(lm, problems[:1], task, cfg, capture_path)  # warm-up: kernels, allocator, realignment
        times = {"off": [], "on": []}
        peaks = {"off": [], "on": []}
        for r in range(repeats):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                seconds, peak = one_pass(lm, problems, task, cfg, capture_path if mode == "on" else None)
                times[mode].append(seconds)
                peaks[mode].append(peak)
                print(f"  repeat {r + 1} capture {mode:3s}: {seconds:.3f} s/problem, peak {peak:.0f} MiB")
        size = capture_path.stat().st_size
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    peak_off, peak_on = max(peaks["off"]), max(peaks["on"])
    print(f"capture off: {off:.3f} s/problem   capture on: {on:.3f} s/problem   "
          f"time ratio on/off: {on / off:.4f} ({(on / off - 1) * 100:+.2f}%)")
    if lm.device.type == "cuda":
        print(f"peak GPU memory off: {peak_off:.0f} MiB   on: {peak_on:.0f} MiB   "
              f"ratio on/off: {peak_on / peak_off:.4f} ({(peak_on / peak_off - 1) * 100:+.2f}%)")
    print(f"capture file: {size / 1024:.1f} KiB for {len(problems)} problems")


if __name__ == "__main__":
    main()
