"""What writing a capture costs on the host, with and without the latent readout (no model, no torch).

Writes `--batches` batches of `--batch` synthetic problems with `CaptureWriter` (stage, then commit,
as the recorder does), each problem with the hand-offs of latent_mas (planner -> critic ->
refiner -> judger) at the Qwen3-4B shapes by default: 36 layers, prompts of `--prompt` columns
per agent and `--latent_steps` latent columns per agent, so the last hand-off reads about
3 x (prompt + latent) columns. Prints the median time per batch of staging (`stage_in_pieces`, as the
recorder stages while the judger decodes) and `commit`, the file size, the pieces per batch and the
longest piece, for readout k = 0 and k = `--readout_top_k`, rounds alternating.

    python bench/capture_write.py --batches 8 --batch 16
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.format import SCHEMA_VERSION, CaptureWriter, Handoff, LatentReadout, ProblemRecord, Segment

AGENTS = ("planner", "critic", "refiner", "judger")


def _handoffs(rng, layers: int, prompt: int, steps: int, top_k: int) -> list[Handoff]:
    """One problem's three hand-offs: hand-off i reads the prompt and latent columns of agents 0..i."""
    handoffs, tokens, segments = [], [], []
    for i, (a, b) in enumerate(zip(AGENTS, AGENTS[1:])):
        start = len(tokens)
        tokens += [f"tok{j}" for j in range(prompt)] + ["<latent>"] * steps
        segments += [Segment(a, "prompt", start, start + prompt), Segment(a, "latent", start + prompt, len(tokens))]
        width = len(tokens)
        readout = None
        if top_k:
            readout = LatentReadout.empty(width, top_k)
            for agent in range(i + 1):
                first = agent * (prompt + steps) + prompt
                columns = np.arange(first, first + steps)
                readout.step[columns] = np.arange(steps)
                readout.ids[columns] = rng.integers(0, 150_000, (steps, top_k))
                readout.probs[columns] = np.sort(rng.uniform(0, 1, (steps, top_k)), axis=1)[:, ::-1]
                readout.entropy[columns] = rng.uniform(0, 5, steps)
                for c in columns:
                    readout.tokens[c] = [f" w{t}" for t in readout.ids[c]]
        handoffs.append(Handoff(a, b, rng.uniform(-1, 1, (layers, width)).astype(np.float16), np.arange(width),
                                list(tokens), list(segments), readout))
    return handoffs


def _write(path: Path, batches: list, top_k: int, layers: int) -> tuple[float, float, int, float, int]:
    """(median stage s, median commit s, file bytes, longest piece s, pieces per batch) for writing `batches`
    (lists of hand-off lists), staged a piece at a time (`stage_in_pieces`, as the recorder does while decoding)."""
    stages, commits, number, longest, count = [], [], 0, 0.0, 0
    with CaptureWriter.open(path, {"model_name": "bench"}, {"k": top_k}, layers, overwrite=True,
                            readout_top_k=top_k) as writer:
        for batch in batches:
            numbers = list(range(number + 1, number + 1 + len(batch)))
            number += len(batch)
            t0 = time.perf_counter()
            pieces, count = writer.stage_in_pieces(batch, numbers), 0
            while True:
                start = time.perf_counter()
                try:
                    next(pieces)
                except StopIteration as done:
                    staged = done.value
                    break
                finally:
                    longest, count = max(longest, time.perf_counter() - start), count + 1
            t1 = time.perf_counter()
            writer.commit(staged, [ProblemRecord(n, f"question {n}", "1", "1", True) for n in numbers])
            commits.append(time.perf_counter() - t1)
            stages.append(t1 - t0)
    return statistics.median(stages), statistics.median(commits), path.stat().st_size, longest, count


@click.command()
@click.option("--batches", default=8, show_default=True, help="batches written per pass")
@click.option("--batch", default=16, show_default=True, help="problems per batch")
@click.option("--layers", default=36, show_default=True)
@click.option("--prompt", default=300, show_default=True, help="prompt columns per agent")
@click.option("--latent_steps", default=10, show_default=True)
@click.option("--readout_top_k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=3, show_default=True, help="rounds; each writes both variants once")
def main(batches, batch, layers, prompt, latent_steps, readout_top_k, repeats):
    rng = np.random.default_rng(0)
    data = {k: [[_handoffs(rng, layers, prompt, latent_steps, k) for _ in range(batch)] for _ in range(batches)]
            for k in (0, readout_top_k)}
    results: dict[int, list] = {0: [], readout_top_k: []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(repeats):
            for k in ((0, readout_top_k) if round_ % 2 == 0 else (readout_top_k, 0)):
                results[k].append(_write(Path(folder) / f"k{k}.h5", data[k], k, layers))
    width = 3 * (prompt + latent_steps)
    print(f"schema {SCHEMA_VERSION}; {batches} batches x {batch} problems x 3 hand-offs (T up to {width}), "
          f"{layers} layers, {latent_steps} latent steps per agent; median of {repeats} passes")
    print(f"{'readout k':>9} {'stage ms/batch':>15} {'commit ms/batch':>16} {'file MB':>8} "
          f"{'pieces/batch':>13} {'longest piece ms':>17}")
    for k, runs in results.items():
        stage = statistics.median(r[0] for r in runs) * 1e3
        commit = statistics.median(r[1] for r in runs) * 1e3
        longest = max(r[3] for r in runs) * 1e3
        print(f"{k:>9} {stage:>15.1f} {commit:>16.1f} {runs[0][2] / 1e6:>8.2f} {runs[0][4]:>13} {longest:>17.1f}")


if __name__ == "__main__":
    main()
