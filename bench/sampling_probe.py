"""How long the step's sampling takes: `sampling.compiled_sampler()` in a CUDA graph, argmax in one stage or in slices.

    python bench/sampling_probe.py --batch_sizes 1,16,64

Logits `[batch, 151936]` (Qwen3's vocabulary; bfloat16, as the model step gives them), temperature 0.6, top-p 0.95, as LatentMAS samples;
each case is 32 draws recorded in one graph and replayed. `--slices 1` is argmax in one stage
(`first_argmax` with one slice is the row's plain argmax); `--stop21` adds stop 21's top-p
(float32 sort keys, one scan over the row); the picks are compared with the first case's; `--profile`
prints each case's top kernels.
"""

from __future__ import annotations

import contextlib

import click
import torch
from common import graph_seconds, stop21_sampler, top_kernels

from latentmas import sampling

VOCAB = 151936
DRAWS = 32


@click.command()
@click.option("--batch_sizes", default="1,16,64", show_default=True)
@click.option("--slices", default=f"1,{sampling.ARGMAX_SLICES}", show_default=True,
              help="ARGMAX_SLICES values to time side by side.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="the logits' dtype (the model step's are bfloat16)")
@click.option("--profile", is_flag=True, help="also print each case's top kernels")
@click.option("--stop21", is_flag=True, help="also time stop 21's top-p (float32 sort keys, one scan) beside "
              "today's, with the last argmax slices value; 'same picks' is then the share of equal picks")
def main(batch_sizes, slices, dtype, profile, stop21):
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; {dtype} logits")
    counts = [int(c) for c in slices.split(",")]
    cases = [(f"today's, argmax in {c} slice(s)", c, contextlib.nullcontext) for c in counts]
    if stop21:
        cases.append((f"stop 21's top-p, argmax in {counts[-1]} slice(s)", counts[-1], stop21_sampler))
    print("\n| batch | sampler | µs per draw | picks equal to the first row's |\n|---|---|---|---|")
    for batch in (int(b) for b in batch_sizes.split(",")):
        logits = (torch.randn(batch, VOCAB, device=device, generator=torch.Generator(device).manual_seed(batch)) * 3
                  ).to(getattr(torch, dtype))
        keys = torch.arange(batch, dtype=torch.int64, device=device) * 7919
        steps = [torch.full((1,), i, dtype=torch.int64, device=device) for i in range(DRAWS)]
        first = None
        for label, count, variant in cases:
            sampling.ARGMAX_SLICES = count
            torch._dynamo.reset()
            sampling._COMPILED.clear()
            with variant():
                sample = sampling.compiled_sampler()

                def draws(sample=sample):
                    return torch.stack([sample(logits, keys, s, 0.6, 0, 0.95) for s in steps])

                seconds, picks = graph_seconds(draws, 10)
                if profile:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        graph_seconds(draws, 1)
            same = "" if first is None else f"{(picks == first).float().mean().item():.4f}"
            first = picks if first is None else first
            print(f"| {batch} | {label} | {seconds / DRAWS * 1e6:.1f} | {same} |", flush=True)
            if profile:
                print(f"kernels of {3 * DRAWS} draws at batch {batch}, {label} (warm-up, then two replays):")
                print(top_kernels(prof, 15))


if __name__ == "__main__":
    main()
