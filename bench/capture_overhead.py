"""How much capture costs: the same problems with capture off and on, alternating, in one process.

Prints median wall time per problem and peak memory for each, their ratios, and the
time spent inside the recorder. On a GPU, with the Qwen3-4B shapes and seeded random
weights (no download):

    python bench/capture_overhead.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl --problems 4 --repeats 3

Without arguments it runs on the built-in tiny-qwen3.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click
from common import machine, run_pass

from latentmas.config import RunConfig
from latentmas.models import load_model
from latentmas.tasks import get_task, load_problems


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--problems", "num_problems", default=4, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="off/on pairs, alternating")
@click.option("--generate_bs", default=1, show_default=True)
@click.option("--latent_steps", default=10, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--similarity", default="seed", show_default=True)
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, data_file, num_problems, repeats, generate_bs, latent_steps, max_new_tokens,
         similarity, device):
    cfg = RunConfig(model_name=model_name, random_weights=random_weights, data_file=data_file,
                    latent_steps=latent_steps, max_new_tokens=max_new_tokens, ignore_eos=True, temperature=0.6,
                    top_p=0.95, generate_bs=generate_bs, device=device, similarity=similarity)
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, num_problems)
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; model {model_name} ({lm.num_layers} layers, {lm.dtype}); "
          f"{len(problems)} problems, bs {generate_bs}, latent_steps {latent_steps}, "
          f"max_new_tokens {max_new_tokens} (EOS ignored), similarity {similarity}")
    with tempfile.TemporaryDirectory() as tmp:
        capture_path = Path(tmp) / "bench.h5"
        for warm_up in (None, capture_path):  # kernels, graphs, allocator, realignment, file creation
            run_pass(lm, problems, task, cfg, warm_up)
        passes = {"off": [], "on": []}
        for r in range(repeats):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                result = run_pass(lm, problems, task, cfg, capture_path if mode == "on" else None)
                passes[mode].append(result)
                print(f"  repeat {r + 1} capture {mode:3s}: {result.per_problem:.3f} s/problem, "
                      f"peak {result.peak_mib:.0f} MiB")
        inside = run_pass(lm, problems, task, cfg, capture_path, timed=True).recorder
        size = capture_path.stat().st_size
    off = statistics.median(p.per_problem for p in passes["off"])
    on = statistics.median(p.per_problem for p in passes["on"])
    print(f"capture off: {off:.3f} s/problem   capture on: {on:.3f} s/problem   "
          f"time ratio on/off: {on / off:.4f} ({(on / off - 1) * 100:+.2f}%)")
    if lm.device.type == "cuda":
        peak_off = max(p.peak_mib for p in passes["off"])
        peak_on = max(p.peak_mib for p in passes["on"])
        print(f"peak GPU memory off: {peak_off:.0f} MiB   on: {peak_on:.0f} MiB   "
              f"ratio on/off: {peak_on / peak_off:.4f} ({(peak_on / peak_off - 1) * 100:+.2f}%)")
    print(f"time inside the recorder (device synced around each call): {inside * 1000:.1f} ms/problem "
          f"= {inside / off * 100:.3f}% of the capture-off time")
    print(f"capture file: {size / 1024:.1f} KiB for {len(problems)} problems")


if __name__ == "__main__":
    main()
