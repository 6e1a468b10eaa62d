"""Render speed: our renderer against the reference's seaborn heatmaps, on one synthetic capture.

    python bench/render_speed.py [--tokens 2000] [--layers 36] [--handoffs 30] [--baseline-figures 2]

Writes a capture of `handoffs` hand-offs (three per problem) of `layers` x `tokens`
float16 similarities with CaptureWriter into a temporary folder, then times:

* ours, jobs=1: every multi-layer heatmap, then every figure (multi + single-layer);
* ours, jobs=2 (or --jobs): every figure, to show how --jobs scales with cores;
* the baseline, drawn the reference's way (pyplot + seaborn.heatmap, figure
  max(12, 0.15 in x T) by max(8, 0.3 in x layers), every T/20-th token labelled,
  tight_layout, dpi 150, bbox_inches='tight'), on the first `baseline-figures`
  hand-offs only, since each figure is huge (45,000 px wide at T = 2,000) and slow.

Figures per second per core = figures / wall time / worker processes (each of our
measurements is run --repeat times and the fastest counts, as the machine may be
shared); the 'cpu' figures divide by CPU seconds instead. Reading the capture and
starting worker processes are included in our times.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.format import CaptureReader, CaptureWriter, Handoff, ProblemRecord, Segment
from render.batch import render_capture

AGENTS = ("planner", "critic", "refiner", "judger")
MATPLOTLIB_MAX_PX = 2 ** 16


def synthetic_capture(path: Path, tokens: int, layers: int, handoffs: int, seed: int = 0) -> Path:
    """A capture of `handoffs` hand-offs of [layers, tokens], three per problem, with segments and kNN gaps."""
    rng = np.random.default_rng(seed)
    attrs = {"model_name": "synthetic/bench", "method": "latent_mas", "similarity": "seed", "num_layers": layers,
             "latent_steps": 10}
    problems = (handoffs + 2) // 3
    made = 0
    with CaptureWriter.open(path, attrs, {"bench": True}, layers, overwrite=True) as writer:
        for number in range(1, problems + 1):
            record = ProblemRecord(number, f"question {number}", "42", "42", True)
            for i in range(min(3, handoffs - made)):
                # smooth structure per layer and along tokens, plus noise, in [-1, 1]
                layer_trend = np.linspace(-0.4, 0.6, layers)[:, None]
                wave = 0.3 * np.sin(np.linspace(0, 12 * np.pi, tokens) + rng.uniform(0, 6))[None, :]
                values = np.clip(layer_trend + wave + rng.normal(0, 0.2, (layers, tokens)), -1, 1)
                positions = np.arange(tokens) + (np.arange(tokens) // 400) * 5  # kNN-like gaps
                bounds = np.linspace(0, tokens, i + 2).astype(int)
                segments = []
                for k in range(i + 1):
                    start, stop = int(bounds[k]), int(bounds[k + 1])
                    segments += [Segment(AGENTS[k], "prompt", start, stop - 10), Segment(AGENTS[k], "latent", stop - 10, stop)]
                token_text = [f"tok{j}" for j in range(tokens)]
                record.handoffs.append(Handoff(AGENTS[i], AGENTS[i + 1], values, positions, token_text, segments))
                made += 1
            writer.append(record)
        writer.finish("bench", {})
    return path


def baseline_figure(values: np.ndarray, path: Path, transition: str, problem: int) -> tuple[int, int]:
    """The reference's way: seaborn.heatmap on a figure 0.15 in per token, dpi 150. Returns (w, h) px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    num_layers, seq_len = values.shape
    fig, ax = plt.subplots(figsize=(max(12, seq_len * 0.15), max(8, num_layers * 0.3)))
    sns.heatmap(values, cmap="RdYlGn", center=0, vmin=-1, vmax=1, cbar_kws={"label": "Cosine Similarity"}, ax=ax,
                xticklabels=max(1, seq_len // 20), yticklabels=True)
    ax.set_xlabel("KV Cache Token Position", fontsize=12)
    ax.set_ylabel("Layer Index", fontsize=12)
    ax.set_title(f"Cosine Similarity Heatmap: {transition.replace('_', ' → ').title()}\n"
                 f"Problem #{problem} | Layers: {num_layers} | Tokens: {seq_len}", fontsize=14, pad=20)
    plt.tight_layout()
    plt.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker processes)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def time_ours(capture: Path, out: Path, kinds, jobs: int, repeat: int = 1) -> tuple[int, float, float]:
    """(figures written, wall seconds, CPU seconds including workers) of the fastest of `repeat` runs."""
    best = None
    for _ in range(repeat):
        start, cpu = time.perf_counter(), cpu_seconds()
        written = render_capture(capture, out, kinds=kinds, jobs=jobs, progress=False)
        run = (len(written), time.perf_counter() - start, cpu_seconds() - cpu)
        best = run if best is None or run[1] < best[1] else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--handoffs", type=int, default=30)
    parser.add_argument("--baseline-figures", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="workers for the parallel run (default 2)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each of our measurements; the fastest counts (the machine may be shared)")
    parser.add_argument("--keep", type=Path, default=None, help="copy a few output figures here")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    print(f"machine: {cores} CPU cores; capture: {args.handoffs} hand-offs of {args.layers} layers x "
          f"{args.tokens} tokens (float16)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        capture = synthetic_capture(tmp / "bench.h5", args.tokens, args.layers, args.handoffs)
        print(f"wrote the capture in {time.perf_counter() - t0:.1f} s ({capture.stat().st_size / 1e6:.1f} MB)")

        # warm-up: imports, font cache
        render_capture(capture, tmp / "warm", kinds=("multi",), problems=[1], transitions="planner_to_critic",
                       progress=False)

        n_multi, s_multi, c_multi = time_ours(capture, tmp / "ours_multi", ("multi",), 1, args.repeat)
        n_both, s_both, c_both = time_ours(capture, tmp / "ours_both", ("multi", "single"), 1, args.repeat)
        n_par, s_par, c_par = time_ours(capture, tmp / "ours_par", ("multi", "single"), args.jobs, args.repeat)
        ours_multi = n_multi / s_multi
        ours_both = n_both / s_both
        par = n_par / s_par
        sample = next(iter(sorted((tmp / "ours_multi").glob("*.png"))))
        from PIL import Image

        with Image.open(sample) as image:
            our_size = image.size

        # baseline
        with CaptureReader(capture) as reader:
            every = ((n, h) for n in reader.problem_numbers for h in reader.handoffs(n))
            first = list(itertools.islice(every, args.baseline_figures))  # reads only these matrices
        width_px = max(12, args.tokens * 0.15) * 150
        print(f"baseline figure would be {width_px:,.0f} px wide before bbox cropping "
              f"(matplotlib refuses >= {MATPLOTLIB_MAX_PX:,} px)")
        base_times, base_cpu, base_size = [], [], None
        if width_px < MATPLOTLIB_MAX_PX:
            baseline_figure(np.zeros((args.layers, 50), np.float32), tmp / "warm.png", "a_to_b", 0)  # imports
            for number, handoff in first:
                start, cpu = time.perf_counter(), cpu_seconds()
                base_size = baseline_figure(handoff.layer_similarities.astype(np.float32),
                                            tmp / f"baseline_{handoff.name}_problem{number}.png", handoff.name, number)
                base_times.append(time.perf_counter() - start)
                base_cpu.append(cpu_seconds() - cpu)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for path in sorted((tmp / "ours_both").glob("*problem1.png")):
                (args.keep / path.name).write_bytes(path.read_bytes())

    load = os.getloadavg()[0]
    print()
    print(f"(wall-clock rates, fastest of {args.repeat} runs each for ours; 'cpu' rates divide by the CPU "
          f"seconds used, which other load on the machine does not inflate; load average {load:.2f} on "
          f"{cores} cores at the end)")
    print(f"ours, jobs=1, multi-layer only : {n_multi} figures in {s_multi:.2f} s = {ours_multi:.2f} figures/s per core "
          f"(cpu: {n_multi / c_multi:.2f}/s) [{our_size[0]}x{our_size[1]} px]")
    print(f"ours, jobs=1, multi + single   : {n_both} figures in {s_both:.2f} s = {ours_both:.2f} figures/s per core "
          f"(cpu: {n_both / c_both:.2f}/s)")
    print(f"ours, jobs={args.jobs}, multi + single   : {n_par} figures in {s_par:.2f} s = {par:.2f} figures/s = "
          f"{par / args.jobs:.2f} per core; x{par / ours_both:.2f} the jobs=1 throughput "
          f"(cpu: {n_par / c_par:.2f}/s per core, worker start-up included)")
    if base_times:
        base, base_c = 1 / min(base_times), 1 / min(base_cpu)  # the fastest figure, as ours count the fastest run
        print(f"baseline (seaborn, 0.15 in/token, dpi 150): {len(base_times)} figures in {sum(base_times):.2f} s, "
              f"fastest {min(base_times):.2f} s = {base:.3f} figures/s per core (cpu: {base_c:.3f}/s) "
              f"[{base_size[0]}x{base_size[1]} px]")
        print(f"speed-up, multi-layer figure vs baseline figure, one core: x{ours_multi / base:.1f} "
              f"(cpu: x{(n_multi / c_multi) / base_c:.1f})")
    else:
        print(f"baseline: not drawn, a {args.tokens}-token figure is past matplotlib's size limit; rerun with a "
              f"smaller --tokens")
    target = "met" if ours_multi >= 5 else "NOT met"
    print(f"target >= 5 figures/s per core (multi-layer, T = {args.tokens}, wall clock): {target}")

if __name__ == "__main__":
    main()
