"""Scale of reads: `latentmas info` on a capture of many problems, and render memory for very wide hand-offs.

    python bench/capture_scale.py [--problems 5000] [--columns 100000,1000000] [--layers 36]

1. Writes a capture of `problems` problems (three hand-offs of [layers x 16] each) with CaptureWriter
   and times `describe` (what `latentmas info` prints) and `describe_json` in this process, best of 3.
2. For each width T in `columns`, writes a capture of one problem with one [layers x T] hand-off and
   renders its multi-layer heatmap in a fresh process, reporting that process's peak resident memory
   (ru_maxrss); the growth between two widths, divided by the extra columns, is the memory per column.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.format import CaptureWriter, Handoff, ProblemRecord, Segment

AGENTS = ("planner", "critic", "refiner", "judger")
ATTRS = {"model_name": "synthetic/bench", "method": "latent_mas", "similarity": "seed", "latent_steps": 4}

RENDER_ONE = """
import json, resource, sys, time
from render.batch import render_capture
start = time.perf_counter()
written = render_capture(sys.argv[1], sys.argv[2], kinds=("multi",), progress=False)
print(json.dumps({"figures": len(written), "seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def many_problems(path: Path, problems: int, layers: int, width: int = 16) -> Path:
    rng = np.random.default_rng(0)
    with CaptureWriter.open(path, {**ATTRS, "num_layers": layers}, {"bench": True}, layers, overwrite=True) as writer:
        batch = []
        for number in range(1, problems + 1):
            handoffs = [Handoff(AGENTS[i], AGENTS[i + 1], rng.uniform(-1, 1, (layers, width)), np.arange(width),
                                [f"t{j}" for j in range(width)], [Segment(AGENTS[i], "prompt", 0, width)])
                        for i in range(3)]
            batch.append(ProblemRecord(number, f"question {number}", "1", "1", number % 2 == 0, handoffs))
            if len(batch) == 100:
                writer.append_batch(batch)
                batch = []
        if batch:
            writer.append_batch(batch)
        writer.finish("bench", {})
    return path


def one_wide(path: Path, columns: int, layers: int) -> Path:
    values = np.random.default_rng(1).uniform(-1, 1, (layers, columns)).astype(np.float16)
    handoff = Handoff("planner", "critic", values, np.arange(columns), ["t"] * columns,
                      [Segment("planner", "prompt", 0, columns)])
    with CaptureWriter.open(path, {**ATTRS, "num_layers": layers}, {"bench": True}, layers, overwrite=True) as writer:
        writer.append(ProblemRecord(1, "question", "1", "1", True, [handoff]))
        writer.finish("bench", {})
    return path


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=5000)
    parser.add_argument("--columns", default="100000,1000000")
    parser.add_argument("--layers", type=int, default=36)
    args = parser.parse_args()
    from render.info import describe, describe_json

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        capture = many_problems(tmp / "many.h5", args.problems, args.layers)
        print(f"wrote {args.problems} problems x 3 hand-offs in {time.perf_counter() - start:.1f} s "
              f"({capture.stat().st_size / 1e6:.1f} MB)")
        text = best_of(3, lambda: describe(capture))
        as_json = best_of(3, lambda: describe_json(capture))
        print(f"info (describe): {text:.3f} s = {text / args.problems * 1e3:.3f} ms per problem; "
              f"info --json: {as_json:.3f} s")
        rows = []
        for columns in (int(c) for c in args.columns.split(",")):
            wide = one_wide(tmp / f"wide{columns}.h5", columns, args.layers)
            proc = subprocess.run([sys.executable, "-c", RENDER_ONE, str(wide), str(tmp / f"out{columns}")],
                                  capture_output=True, text=True, check=True,
                                  env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((columns, measured))
            print(f"render T = {columns:,} x {args.layers} layers: {measured['seconds']:.1f} s, "
                  f"peak RSS {measured['peak_rss_mb']:.0f} MB")
            wide.unlink()
        for (a, ma), (b, mb) in zip(rows, rows[1:]):
            per = (mb["peak_rss_mb"] - ma["peak_rss_mb"]) * 1024 * 1024 / (b - a)
            print(f"render memory growth from T = {a:,} to {b:,}: {per:.0f} bytes per column "
                  f"({per / args.layers:.1f} per cell)")


if __name__ == "__main__":
    main()
