"""LatentMAS speed per problem on the Qwen3-4B shapes, at batch sizes 1 and 16, capture off and on.

Seeded random weights built on the GPU from the real config and tokenizer (no download):

    python bench/latentmas_speed.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl

Prompt prefills run packed (`latentmas.packed_prefill`) unless `--padded_prefill_at` also times them padded.

Settings as the reference measurement: sequential prompts, latent_steps 10, the judger
decodes exactly max_new_tokens 256 (EOS ignored), temperature 0.6, top_p 0.95.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click
from common import alternating_passes, machine, prefill_kind, run_pass, speed_config

from latentmas.models import load_model
from latentmas.tasks import get_task, load_problems

# The public reference implementation with these settings at batch size 1 (median s/problem).
REFERENCE = {"H100": (12.0, 14.0), "H200": (10.0, 15.0)}


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--batch_sizes", default="1,16", show_default=True)
@click.option("--problems_bs1", default=4, show_default=True)
@click.option("--batches", default=1, show_default=True, help="batches per pass for batch sizes > 1")
@click.option("--repeats", default=2, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--plain", is_flag=True, help="also time the plain (eager) decode loop at batch size 1")
@click.option("--compile_step", is_flag=True, help="compile the static step (torch.compile) in every variant")
@click.option("--compile_prefill", is_flag=True, help="compile the prompt prefills' layers (latentmas.compiled_prefill)")
@click.option("--eager_prefill", is_flag=True, help="prefill prompts eagerly, not in chunks replayed as CUDA graphs "
                                                   "(latentmas.graph_prefill)")
@click.option("--eager_prefill_at", default="", help="batch sizes (e.g. 1,16) also timed with eager prefills, side by "
                                                     "side with the others")
@click.option("--compile_prefill_at", default="", help="batch sizes (e.g. 16,64) also timed with compiled prefills "
                                                       "(--compile_prefill), side by side with the others")
@click.option("--padded_prefill_at", default="", help="batch sizes (e.g. 16,64) also timed with padded prompt "
                                                      "prefills (--padded_prefill: padding included, not packed), "
                                                      "side by side with the others")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, data_file, batch_sizes, problems_bs1, batches, repeats, max_new_tokens,
         plain, compile_step, compile_prefill, eager_prefill, eager_prefill_at, compile_prefill_at, padded_prefill_at,
         device):
    task = get_task("gsm8k")
    sizes = [int(b) for b in batch_sizes.split(",")]
    most = max(max(sizes) * batches, problems_bs1)
    problems = load_problems(task, data_file, most)
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; model {model_name} ({lm.num_layers} layers, {lm.dtype})")
    print("settings: latent_mas, sequential, latent_steps 10, max_new_tokens "
          f"{max_new_tokens} (EOS ignored), temperature 0.6, top_p 0.95; step "
          f"{'compiled' if compile_step else 'eager'}; prefills per row below (graphed: chunks replayed as CUDA "
          "graphs where nothing hooks the model)")
    rows = []
    eager_too = {int(b) for b in eager_prefill_at.split(",") if b}
    compiled_too = {int(b) for b in compile_prefill_at.split(",") if b}
    padded_too = {int(b) for b in padded_prefill_at.split(",") if b}
    # (batch size, fast decode, eager prefill, compiled prefill, packed prefill)
    variants = [(bs, fast, eager_prefill, compile_prefill, True)
                for bs in sizes for fast in ([True, False] if plain and bs == 1 else [None])]
    variants += [(bs, None, True, compile_prefill, True) for bs in sizes
                 if bs in eager_too and prefill_kind(compile_prefill, eager_prefill, bs) == "graphed"]
    variants += [(bs, None, eager_prefill, True, True) for bs in sizes
                 if bs in compiled_too and prefill_kind(compile_prefill, eager_prefill, bs) == "eager"]
    variants += [(bs, None, eager, compiled, False) for bs, fast, eager, compiled, _ in list(variants)
                 if bs in padded_too and fast is None and prefill_kind(compiled, eager, bs) != "graphed"]
    with tempfile.TemporaryDirectory() as tmp:
        capture_path = Path(tmp) / "speed.h5"
        for bs, fast, eager, compiled, packed in variants:
            cfg = speed_config(model_name=model_name, random_weights=random_weights, data_file=data_file,
                               max_new_tokens=max_new_tokens, generate_bs=bs, device=device, fast_decode=fast,
                               compile_step=compile_step, compile_prefill=compiled, graph_prefill=not eager,
                               packed_prefill=packed)
            subset = problems[: problems_bs1 if bs == 1 else bs * batches]
            passes = alternating_passes(lm, subset, task, {False: (cfg, None), True: (cfg, capture_path)}, repeats)
            for capture in (False, True):
                timed = run_pass(lm, subset, task, cfg, capture_path if capture else None, timed=True)
                per_problem = statistics.median(p.per_problem for p in passes[capture])
                tokens_per_problem = passes[capture][0].decoded_tokens / len(subset)
                rows.append({
                    "bs": bs, "decode": "plain" if fast is False else "fast", "capture": capture,
                    "prefill": prefill_kind(compiled, eager, bs) + ("" if packed else " padded"),
                    "s/problem": per_problem, "problems/s": 1 / per_problem,
                    "decode tok/s": tokens_per_problem / per_problem,
                    "latent phase s": timed.per_problem - timed.judger, "judger s": timed.judger,
                    "peak MiB": max(p.peak_mib for p in passes[capture]),
                    "fastest": min(p.per_problem for p in passes[capture]),
                })
                each = ", ".join(f"{p.per_problem:.3f}" for p in passes[capture])
                notes = " | ".join(f"pass {i + 1}{p.notes()}" for i, p in enumerate(passes[capture]) if p.notes())
                if capture:  # the part of each pass spent committing to the file (fsyncs included)
                    each += "; writing " + ", ".join(f"{p.writing:.4f}" for p in passes[capture])
                print(f"  bs {bs:2d} {rows[-1]['decode']:5s} {rows[-1]['prefill']:15s} capture {'on ' if capture else 'off'}: "
                      f"{per_problem:.3f} s/problem (passes {each}; timed pass {timed.per_problem:.3f})"
                      + (f"\n      {notes}" if notes else ""), flush=True)
    header = ("bs", "decode", "prefill", "capture", "s/problem", "problems/s", "decode tok/s", "latent phase s", "judger s",
              "peak MiB")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [str(r["bs"]), r["decode"], r["prefill"], "on" if r["capture"] else "off"] + [
            f"{r[k]:.3f}" if k in ("s/problem", "problems/s", "latent phase s", "judger s") else f"{r[k]:.0f}"
            for k in header[4:]]
        print("| " + " | ".join(cells) + " |")
    gpu = machine(lm)
    kind = next((k for k in REFERENCE if k in gpu), None)
    if kind:
        low, high = REFERENCE[kind]
        for r in rows:
            if r["decode"] == "fast" and not r["capture"]:
                print(f"bs {r['bs']} ({r['prefill']} prefills): {low / r['s/problem']:.1f}x to {high / r['s/problem']:.1f}x the reference's "
                      f"problems/s on {kind} (reference {low:g}-{high:g} s/problem at bs 1)")
    by = {(r["bs"], r["decode"], r["prefill"], r["capture"]): r for r in rows}
    for bs, decode, prefill, capture in list(by):
        if decode == "fast" and capture:
            off, on = by[(bs, decode, prefill, False)], by[(bs, decode, prefill, True)]
            print(f"bs {bs} ({prefill} prefills): capture overhead "
                  f"{(on['s/problem'] / off['s/problem'] - 1) * 100:+.2f}% (medians), "
                  f"{(on['fastest'] / off['fastest'] - 1) * 100:+.2f}% (fastest passes; one slow pass moves a median of two)")
    for bs in sorted(eager_too):
        graphed, eager = by.get((bs, "fast", "graphed", False)), by.get((bs, "fast", "eager", False))
        if graphed and eager:
            print(f"bs {bs}: graphed prefills take {graphed['s/problem'] / eager['s/problem']:.3f}x the time "
                  f"per problem of eager ones (capture off)")
    for bs in sorted(compiled_too):
        compiled, eager = by.get((bs, "fast", "compiled", False)), by.get((bs, "fast", "eager", False))
        if compiled and eager:
            print(f"bs {bs}: compiled prefills take {compiled['s/problem'] / eager['s/problem']:.3f}x the time "
                  f"per problem of eager ones (capture off; the first compile is in the warm-up pass)")
    for (bs, decode, prefill, capture), packed in list(by.items()):
        padded = by.get((bs, decode, f"{prefill} padded", capture))
        if padded and not capture:
            print(f"bs {bs} ({prefill}): packed prefills take {packed['s/problem'] / padded['s/problem']:.3f}x "
                  f"the time per problem of padded ones (capture off)")


if __name__ == "__main__":
    main()
