"""How long merging a sharded capture takes, per problem: synthetic shards written with `CaptureWriter`.

Builds `--shards` shard files of `--problems` problems each (problem numbers dealt round-robin, as a
count-balanced run leaves them), every problem with `--handoffs` hand-offs of `--layers` x about
`--columns` columns (widths vary +-50%), `--latent` latent columns with a top-5 readout each, then
times `capture.merge.merge` (the bulk row copy) and, with `--records`, the per-problem
re-encoding merge it replaced (`merge(..., bulk=False)`). Both merged files are compared.

    python bench/merge_speed.py                      # 4 shards x 300 problems x 3 x 36 x ~600
    python bench/merge_speed.py --records            # also the old per-problem path
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from capture import merge  # noqa: E402
from capture.format import (  # noqa: E402
    LATENT_TOKEN,
    CaptureReader,
    CaptureWriter,
    Handoff,
    LatentReadout,
    ProblemRecord,
    Segment,
)

AGENTS = ("planner", "critic", "refiner", "judger")
WORDS = np.array(["the", " cat", " sat", " on", " mat", "ĠNatalia", " 48", " clips", ".", "\n", " é", " 中"])
CONFIG = {"synthetic": True, "readout_top_k": 5}


def synthetic_problem(number: int, handoffs: int, layers: int, columns: int, latent: int, top_k: int,
                      rng: np.random.Generator) -> ProblemRecord:
    """Problem `number` with `handoffs` hand-offs of `layers` x ~`columns` (+-50%) columns, the last
    `latent` columns of each latent steps with a top-`top_k` readout (none when `top_k` is 0)."""
    records = []
    for i in range(handoffs):
        width = int(rng.integers(columns // 2, columns * 3 // 2 + 1)) + latent
        prompt = width - latent
        sims = rng.uniform(-1, 1, size=(layers, width)).astype(np.float16)
        tokens = list(WORDS[rng.integers(0, len(WORDS), prompt)]) + [LATENT_TOKEN] * latent
        readout = None
        if top_k:
            readout = LatentReadout.empty(width, top_k)
            for c in range(prompt, width):
                readout.step[c] = c - prompt
                readout.ids[c] = rng.integers(0, 1000, top_k)
                readout.tokens[c] = list(WORDS[rng.integers(0, len(WORDS), top_k)])
                readout.probs[c] = np.sort(rng.random(top_k))[::-1]
                readout.entropy[c] = rng.random()
                readout.realign_token[c] = str(WORDS[c % len(WORDS)])
        records.append(Handoff(AGENTS[i % 4], AGENTS[(i + 1) % 4], sims, np.arange(width) * 2, tokens,
                               [Segment(AGENTS[i % 4], "prompt", 0, prompt), Segment(AGENTS[i % 4], "latent",
                                                                                      prompt, width)],
                               readout))
    return ProblemRecord(number, f"question {number}?", str(number), str(number * 2), bool(number % 3),
                         records)


def write_shards(capture_file: Path, shards: int, problems: int, handoffs: int, layers: int, columns: int,
                 latent: int, top_k: int = 5, seed: int = 0) -> int:
    """Shard files of `capture_file` as a `shards`-rank run leaves them: problem numbers 1.. dealt
    round-robin, each shard in number order, committed in batches of 8. Returns the problem count."""
    rng = np.random.default_rng(seed)
    config = dict(CONFIG, readout_top_k=top_k)
    for rank in range(shards):
        numbers = list(range(rank + 1, shards * problems + 1, shards))
        with CaptureWriter.open(merge.shard_path(capture_file, rank), {"model_name": "synthetic", "rank": rank},
                                config, layers, durable=False, readout_top_k=top_k) as writer:
            for start in range(0, len(numbers), 8):
                writer.append_batch([synthetic_problem(n, handoffs, layers, columns, latent, top_k, rng)
                                     for n in numbers[start:start + 8]])
    return shards * problems


def _timed_merge(capture_file: Path, bulk: bool) -> float:
    started = time.perf_counter()
    merge.merge(capture_file, bulk=bulk)
    return time.perf_counter() - started


@click.command()
@click.option("--shards", default=4, show_default=True)
@click.option("--problems", default=300, show_default=True, help="Problems per shard.")
@click.option("--handoffs", default=3, show_default=True)
@click.option("--layers", default=36, show_default=True)
@click.option("--columns", default=600, show_default=True, help="Mean prompt columns per hand-off.")
@click.option("--latent", default=10, show_default=True, help="Latent columns per hand-off (with a readout).")
@click.option("--records", is_flag=True, help="Also time the per-problem re-encoding merge.")
def main(shards, problems, handoffs, layers, columns, latent, records):
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        source = Path(tmp) / "source" / "run.h5"
        started = time.perf_counter()
        total = write_shards(source, shards, problems, handoffs, layers, columns, latent)
        size = sum(p.stat().st_size for p in merge.shard_files(source))
        print(f"{shards} shards x {problems} problems x {handoffs} hand-offs x {layers} layers x ~{columns + latent} "
              f"columns: {size / 2**20:.0f} MiB of shards, written in {time.perf_counter() - started:.1f} s",
              flush=True)
        timings = {}
        for bulk in (True, False) if records else (True,):
            folder = Path(tmp) / ("bulk" if bulk else "records")
            shutil.copytree(source.parent, folder)
            elapsed = timings[bulk] = _timed_merge(folder / "run.h5", bulk)
            print(f"merge ({'bulk row copy' if bulk else 'per-problem records'}): {elapsed:.2f} s = "
                  f"{elapsed / total * 1000:.2f} ms per problem", flush=True)
        if records:
            with CaptureReader(Path(tmp) / "bulk" / "run.h5") as a, CaptureReader(Path(tmp) / "records" / "run.h5") as b:
                assert a.problem_numbers == b.problem_numbers == list(range(1, total + 1))
                for n in a.problem_numbers[:: max(1, total // 50)]:
                    for x, y in zip(a.handoffs(n), b.handoffs(n)):
                        assert np.array_equal(x.layer_similarities, y.layer_similarities) and x.tokens == y.tokens
            print(f"speed-up {timings[False] / timings[True]:.1f}x; merged files hold the same problems")


if __name__ == "__main__":
    main()
