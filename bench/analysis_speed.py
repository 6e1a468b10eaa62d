"""Speed and memory of `latentmas analyze` and `latentmas compare` on a GSM8K-sized synthetic capture.

    python bench/analysis_speed.py [--problems 1319] [--layers 36] [--folder /tmp/latentmas_analysis_bench]
                                   [--rebuild] [--show 2]

Builds (once; reused while the settings match) two captures with CaptureWriter, 64 problems per commit:

* `plain.h5`: `problems` problems x 3 hand-offs (planner -> critic -> refiner -> judger) x `layers` layers,
  float16; the planner's prompt is 580 to 700 tokens, each later agent adds 350 to 420 prompt tokens, and
  every agent 10 latent steps, so the hand-offs hold about 640, 1,025 and 1,410 columns (1,025 on average).
  Values: a per-token level plus a per-layer level plus noise, clipped to [-1, 1].
* `knn.h5`: the same problems kNN-filtered as `latentmas --knn_filter` does (keep 80 %, the 5 most recent
  always, the rest by the middle layer's value), values equal to plain.h5 at the kept positions.

Then runs each command as its own process (`python -m latentmas analyze plain.h5`, then
`python -m latentmas compare plain.h5 knn.h5`, both with `--no-progress` into fresh folders) and prints
its wall time, CPU time (user + system) and peak resident memory (`os.wait4`'s rusage of that process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capture.format import CaptureReader, CaptureWriter, Handoff, ProblemRecord, Segment  # noqa: E402

AGENTS = ("planner", "critic", "refiner", "judger")
LATENT_STEPS = 10
BATCH = 64
KEEP, MIN_KEEP = 0.8, 5
VOCABULARY = [f" w{i}" for i in range(600)] + [".", ",", " the", " and", "\n", " 3", " 12"]


def problem_handoffs(number: int, num_layers: int, rng) -> tuple[list[Handoff], list[Handoff]]:
    """(unfiltered, kNN-filtered) hand-offs of one synthetic problem."""
    lengths = [int(rng.integers(580, 701))] + [int(rng.integers(350, 421)) for _ in AGENTS[1:3]]
    spans = []  # (agent, kind, start, stop) over the full sequence
    total = 0
    for agent, prompt in zip(AGENTS[:3], lengths):
        spans += [(agent, "prompt", total, total + prompt), (agent, "latent", total + prompt,
                                                             total + prompt + LATENT_STEPS)]
        total += prompt + LATENT_STEPS
    token_ids = rng.integers(0, len(VOCABULARY), total)
    token_level = rng.normal(0.0, 0.15, total).astype(np.float32)[None, :]
    layer_level = np.linspace(-0.2, 0.3, num_layers, dtype=np.float32)[:, None]
    values = np.clip(token_level + layer_level + rng.normal(0.0, 0.1, (num_layers, total)).astype(np.float32), -1, 1)
    tokens = [VOCABULARY[i] if kind == "prompt" else "<latent>"
              for agent, kind, start, stop in spans for i in token_ids[start:stop]]
    plain, filtered = [], []
    kept = np.zeros(0, dtype=np.int64)
    for h in range(3):
        width = spans[2 * h + 1][3]
        columns = np.arange(width)
        plain.append(_handoff(h, columns, values, tokens, spans))
        # kNN: the cache now holds what was kept before plus everything added since
        candidates = np.concatenate([kept, np.arange(spans[2 * h][2], width)]) if h else columns
        recent = candidates[-MIN_KEEP:]
        older = candidates[:-MIN_KEEP]
        k = min(len(candidates), max(int(np.floor(len(candidates) * KEEP + 1e-9)), MIN_KEEP)) - len(recent)
        scores = values[num_layers // 2, older]
        chosen = older[np.sort(np.argsort(-scores, kind="stable")[:k])]
        kept = np.sort(np.concatenate([chosen, recent]))
        filtered.append(_handoff(h, kept, values, tokens, spans))
    return plain, filtered


def _handoff(h: int, columns: np.ndarray, values, tokens, spans) -> Handoff:
    """Hand-off h (planner_to_critic, ...) holding the sequence's `columns` (original positions)."""
    segments = []
    for agent, kind, start, stop in spans[:2 * h + 2]:
        first, last = np.searchsorted(columns, [start, stop])
        if last > first:
            segments.append(Segment(agent, kind, int(first), int(last)))
    return Handoff(AGENTS[h], AGENTS[h + 1], values[:, columns].astype(np.float16), columns.astype(np.int64),
                   [tokens[c] for c in columns], segments)


def build(folder: Path, problems: int, num_layers: int) -> float:
    """Write plain.h5 and knn.h5 into `folder`; returns the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    base = {"model_name": "synthetic/qwen3-4b-sized", "method": "latent_mas", "similarity": "seed",
            "num_layers": num_layers, "latent_steps": LATENT_STEPS}
    knn = {**base, "knn_filter": True, "knn_percentage": KEEP, "knn_min_keep": MIN_KEEP, "knn_strategy": "top",
           "knn_score": "seed"}
    with CaptureWriter.open(folder / "plain.h5", {**base, "knn_filter": False}, {"knn": False}, num_layers,
                            overwrite=True) as plain, \
            CaptureWriter.open(folder / "knn.h5", knn, {"knn": True}, num_layers, overwrite=True) as filtered:
        for start in range(1, problems + 1, BATCH):
            batch_plain, batch_knn = [], []
            for number in range(start, min(start + BATCH, problems + 1)):
                a, b = problem_handoffs(number, num_layers, rng)
                question = f"synthetic problem {number}"
                batch_plain.append(ProblemRecord(number, question, "1", "1", True, a))
                batch_knn.append(ProblemRecord(number, question, "1", "1", True, b))
            plain.append_batch(batch_plain)
            filtered.append_batch(batch_knn)
            print(f"  built {min(start + BATCH - 1, problems)}/{problems} problems", file=sys.stderr, end="\r")
        plain.finish("bench", {})
        filtered.finish("bench", {})
    print(file=sys.stderr)
    return time.perf_counter() - started


def _tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its children (worker processes), from /proc; 0 when gone."""
    total = 0
    for proc in [str(pid)] + _children(pid):
        try:
            for line in Path(f"/proc/{proc}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def measure(args: list[str]) -> dict:
    """Run `python -m latentmas ARGS` as a child: wall and CPU seconds (the child and its workers, from
    `os.wait4`), peak RSS of its largest process (rusage) and the peak sum over the process tree (sampled
    from /proc every 0.1 s; pages the forked workers share with the parent are counted in each)."""
    import threading

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    import tempfile

    out_text, err_text = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up
    child = subprocess.Popen([sys.executable, "-m", "latentmas", *args], env=env, stdout=out_text, stderr=err_text)
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], _tree_rss_mib(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    out_text.seek(0)
    err_text.seek(0)
    out, err = out_text.read(), err_text.read()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"latentmas {' '.join(args)} failed ({child.returncode}): {err.strip()[-500:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "peak_tree_rss_mib": round(peak[0], 1),
            "output": out.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=1319)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/latentmas_analysis_bench"))
    parser.add_argument("--rebuild", action="store_true", help="Build the captures again even if present.")
    parser.add_argument("--show", type=int, default=2, help="--show of both commands.")
    args = parser.parse_args()

    folder = args.folder / f"{args.problems}p_{args.layers}l"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "built.json"
    wanted = {"problems": args.problems, "layers": args.layers, "version": 1}
    if args.rebuild or not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        stamp.unlink(missing_ok=True)
        seconds = build(folder, args.problems, args.layers)
        stamp.write_text(json.dumps(wanted))
        print(f"built two captures in {seconds:.1f} s")
    with CaptureReader(folder / "plain.h5") as reader:
        columns = sum(sum(reader.problem(n).handoff_columns) for n in reader.problem_numbers)
        handoffs = sum(len(reader.problem(n).handoff_columns) for n in reader.problem_numbers)
    sizes = {name: (folder / name).stat().st_size / 2 ** 20 for name in ("plain.h5", "knn.h5")}
    print(f"capture: {args.problems} problems, {handoffs} hand-offs, {args.layers} layers, "
          f"{columns / handoffs:.0f} columns per hand-off on average, float16; plain.h5 {sizes['plain.h5']:.0f} MiB, "
          f"knn.h5 {sizes['knn.h5']:.0f} MiB on disk")
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; load average before: "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = {}
    for name, command in (("analyze", ["analyze", str(folder / "plain.h5")]),
                          ("compare", ["compare", str(folder / "plain.h5"), str(folder / "knn.h5")])):
        out = folder / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        results[name] = measure([*command, "--out", str(out), "--no-progress", "--show", str(args.show)])
        r = results[name]
        print(f"{name}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(largest process), {r['peak_tree_rss_mib']:.0f} MiB (all its processes together) "
              f"({r['output']})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
