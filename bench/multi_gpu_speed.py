"""How capture scales over GPUs: the same N problems captured by torchrun with world size 1, then K.

Each world size is one `torchrun --standalone --nproc_per_node W -m latentmas capture ...`
into its own temporary folder. Throughput is problems / `total_time_sec` of the run summary:
the wall time on rank 0 from the moment every rank has its model loaded to the end of
the merge into one capture file (start-up and model loading are printed separately, as
the rest of each command's wall time). For world size K it also prints the merge time and its
share of that wall time, and each rank's idle time at the end (from its last commit to the
last rank's last commit, `rank_idle_sec` of the summary). It then checks that both captures
hold the same problems with the same predictions and matrices (results must not depend on
world size).

On a machine with 2 GPUs, with the Qwen3-4B shapes and seeded random weights (no download):

    python bench/multi_gpu_speed.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \\
        --data_file .gpu_inputs/gsm8k_test.jsonl --problems 20 --nproc 2

Without arguments it runs tiny-qwen3 (on the CPU when there is no GPU: `--device cpu`, gloo) with world
sizes 1 and 2. A CPU run computes with LATENTMAS_CPU_THREADS intra-op threads (default 1) in every
process, so the two captures are equal bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capture.format import CaptureReader  # noqa: E402


def _default_nproc() -> int:
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    return max(count, 2)


def _one_world(world: int, folder: Path, args: list[str], timeout: float) -> dict:
    capture_file = folder / "capture.h5"
    out_dir = folder / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               "-m", "latentmas", "capture", *args, "--capture_file", str(capture_file),
               "--output_dir", str(out_dir)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    print(f"world size {world}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise click.ClickException(f"world size {world} failed (exit status {done.returncode})")
    summary = json.loads(next(out_dir.glob("*/summary.json")).read_text())  # the run's own folder
    with CaptureReader(capture_file) as capture:
        device = capture.attrs.get("device", "?")
    solve = summary["total_time_sec"]
    rate = summary["total"] / solve if solve else float("nan")
    merge_time = summary.get("merge_time_sec", 0.0)
    print(f"  {summary['total']} problems in {solve:.2f} s (merge {merge_time:.2f} s = "
          f"{merge_time / solve * 100 if solve else 0:.1f}% of it; start-up and model load {wall - solve:.1f} s "
          f"more) = {rate:.3f} problems/s on {device}", flush=True)
    idle = summary.get("rank_idle_sec")
    if idle:
        print(f"  each rank's idle time at the end (its last commit to the last rank's): "
              f"{', '.join(f'{x:.2f}' for x in idle)} s (max {max(idle):.2f} s)", flush=True)
    return {"world": world, "rate": rate, "summary": summary, "capture": capture_file, "wall": wall,
            "merge": merge_time, "idle": idle}


def _compare(a: Path, b: Path) -> str:
    with CaptureReader(a) as x, CaptureReader(b) as y:
        if x.problem_numbers != y.problem_numbers:
            return f"DIFFERENT problems: {x.problem_numbers} vs {y.problem_numbers}"
        same_predictions = sum(x.problem(n).prediction == y.problem(n).prediction for n in x.problem_numbers)
        same_tokens, worst = 0, 0.0
        for n in x.problem_numbers:
            pairs = list(zip(x.handoffs(n), y.handoffs(n)))
            same_tokens += all(h.tokens == k.tokens for h, k in pairs)
            for h, k in pairs:
                if h.layer_similarities.shape == k.layer_similarities.shape and h.num_columns:
                    diff = np.abs(h.layer_similarities.astype(np.float32) - k.layer_similarities.astype(np.float32))
                    worst = max(worst, float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0)
        total = len(x.problem_numbers)
        return (f"{same_predictions}/{total} predictions and {same_tokens}/{total} cached-token lists equal, "
                f"largest matrix difference {worst:.3g}")


@click.command()
@click.option("--model_name", default="tiny-qwen3", show_default=True)
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--problems", "num_problems", default=20, show_default=True)
@click.option("--nproc", default=None, type=click.IntRange(min=2),
              help="World size K to compare with 1. Default: the number of GPUs, or 2.")
@click.option("--generate_bs", default=1, show_default=True)
@click.option("--latent_steps", default=10, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto: cuda:LOCAL_RANK on GPUs, else cpu")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds each torchrun command may take.")
def main(model_name, random_weights, data_file, num_problems, nproc, generate_bs, latent_steps, max_new_tokens,
         device, timeout):
    nproc = nproc or _default_nproc()
    if data_file is not None:
        data_file = str(Path(data_file).resolve())
    if Path(model_name).exists():
        model_name = str(Path(model_name).resolve())
    args = ["--model_name", model_name, "--task", "gsm8k", "--max_samples", str(num_problems),
            "--latent_steps", str(latent_steps), "--max_new_tokens", str(max_new_tokens), "--ignore_eos",
            "--generate_bs", str(generate_bs), "--device", device]
    if random_weights:
        args.append("--random_weights")
    if data_file is not None:
        args += ["--data_file", data_file]
    print(f"up to {num_problems} problems, generate_bs {generate_bs}, latent_steps {latent_steps}, max_new_tokens "
          f"{max_new_tokens} (EOS ignored), model {model_name}; world size 1 vs {nproc}", flush=True)
    with tempfile.TemporaryDirectory(prefix="multi-gpu-bench-") as tmp:
        runs = []
        for world in (1, nproc):
            folder = Path(tmp) / f"world{world}"
            folder.mkdir()
            runs.append(_one_world(world, folder, args, timeout))
        one, many = runs
        print(f"problems/s: world size 1 {one['rate']:.3f}, world size {nproc} {many['rate']:.3f}; "
              f"ratio {many['rate'] / one['rate']:.2f}x (ideal {nproc}x, efficiency "
              f"{many['rate'] / one['rate'] / nproc * 100:.0f}%)")
        print(f"merge: {many['merge']:.2f} s = {many['merge'] / many['summary']['total_time_sec'] * 100:.1f}% of "
              f"the {nproc}-rank run; largest rank idle time at the end {max(many['idle'] or [0]):.2f} s")
        print(f"same results across world sizes: {_compare(one['capture'], many['capture'])}")


if __name__ == "__main__":
    main()
