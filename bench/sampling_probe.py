"""How long the step's sampling takes: `sampling.compiled_sampler()` in a CUDA graph, argmax in one stage or in slices.

    python bench/sampling_probe.py --batch_sizes 1,16,64

Logits `[batch, 151936]` (Qwen3's vocabulary), temperature 0.6, top-p 0.95, as LatentMAS samples;
each case is 32 draws recorded in one graph and replayed. `--slices 1` is argmax in one stage
(`first_argmax` with one slice is the row's plain argmax); the picks of both are compared.
"""

from __future__ import annotations

import click
import torch
from common import graph_seconds

from latentmas import sampling

VOCAB = 151936
DRAWS = 32


@click.command()
@click.option("--batch_sizes", default="1,16,64", show_default=True)
@click.option("--slices", default=f"1,{sampling.ARGMAX_SLICES}", show_default=True,
              help="ARGMAX_SLICES values to time side by side.")
def main(batch_sizes, slices):
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    print("\n| batch | argmax slices | µs per draw | same picks as the first |\n|---|---|---|---|")
    for batch in (int(b) for b in batch_sizes.split(",")):
        logits = torch.randn(batch, VOCAB, device=device, generator=torch.Generator(device).manual_seed(batch)) * 3
        keys = torch.arange(batch, dtype=torch.int64, device=device) * 7919
        first = None
        for count in (int(c) for c in slices.split(",")):
            sampling.ARGMAX_SLICES = count
            torch._dynamo.reset()
            sampling._COMPILED.clear()
            sample = sampling.compiled_sampler()
            steps = [torch.full((1,), i, dtype=torch.int64, device=device) for i in range(DRAWS)]
            seconds, picks = graph_seconds(lambda: torch.stack([sample(logits, keys, s, 0.6, 0, 0.95) for s in steps]), 10)
            same = "" if first is None else str(bool(torch.equal(picks, first)))
            first = picks if first is None else first
            print(f"| {batch} | {count} | {seconds / DRAWS * 1e6:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
