"""Peak memory of the latent readout, all steps at once against a few steps at a time (prints raw figures).

    python bench/readout_memory.py                      # CPU: peak RSS growth of one readout, fresh process each
    python bench/readout_memory.py --device cuda        # GPU: torch's peak allocated memory

Qwen3-4B's LM head shape (hidden 2560, vocabulary 151,936) with random weights, a batch of
`--batch` problems of 10 latent steps each (one agent's readout), top-k 5, with and without
realignment. "at once" sets `capture.readout.CHUNK_ELEMENTS` above the batch's size, as the
readout was before it was chunked.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import click
import torch
from common import child_result, machine, peak_bytes  # first: puts the repository on the path

from capture import readout

HIDDEN, VOCAB, STEPS = 2560, 151_936, 10


def _lm(device: torch.device, dtype: torch.dtype):
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(device, dtype)
    embed = torch.nn.Embedding(VOCAB, HIDDEN).to(device, dtype)
    model = SimpleNamespace(get_output_embeddings=lambda: head, get_input_embeddings=lambda: embed)
    return SimpleNamespace(model=model, dtype=dtype, device=device)


def _measure(device_name: str, batch: int, realign: bool, at_once: bool) -> dict:
    """One readout in this process: {'peak_mib': growth of the peak during it, 'seconds': ...}."""
    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = _lm(device, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, STEPS, HIDDEN, generator=generator, device=device, dtype=dtype)
    fed = torch.randn(batch, STEPS, HIDDEN, generator=generator, device=device, dtype=dtype) if realign else None
    norms = lm.model.get_input_embeddings().weight.float().norm(dim=1)
    if at_once:
        readout.CHUNK_ELEMENTS = batch * STEPS * VOCAB
    readout.latent_readout(lm, hidden[:1, :1], None if fed is None else fed[:1, :1], 5, norms)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_bytes(device)
    start = time.perf_counter()
    readout.latent_readout(lm, hidden, fed, 5, norms)
    after = peak_bytes(device)
    return {"peak_mib": (after - before) / 2**20, "seconds": time.perf_counter() - start}


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch", default=64, show_default=True, help="problems; each has 10 latent steps")
@click.option("--child", default=None, hidden=True)
def main(device, batch, child):
    if child is not None:
        realign, at_once = json.loads(child)
        print(json.dumps(_measure(device, batch, realign, at_once)))
        return
    print(f"machine: {machine(SimpleNamespace(device=torch.device(device)))}; LM head {HIDDEN} x {VOCAB}, "
          f"{batch} x {STEPS} steps, top-k 5; chunks of {readout.CHUNK_ELEMENTS:,} values")
    for realign in (False, True):
        for at_once in (True, False):
            figures = child_result(__file__, "--device", device, "--batch", str(batch),
                                   "--child", json.dumps([realign, at_once]))
            print(f"  realign {'on ' if realign else 'off'} {'at once ' if at_once else 'in chunks'}: peak "
                  f"+{figures['peak_mib']:8.1f} MiB, {figures['seconds']:.2f} s", flush=True)


if __name__ == "__main__":
    main()
