"""How much capture costs: the same problems with capture off and on, alternating, in one process.

Prints median wall time per problem and peak memory for capture off and each similarity
mode, their ratios, and the time spent inside the recorder. On a GPU, with the Qwen3-4B shapes and seeded random
weights (no download):

    python bench/capture_overhead.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl --problems 4 --repeats 3 --similarity seed,query,attention

Without arguments it runs on the built-in tiny-qwen3. Every mode captures with the latent
readout (`--readout_top_k`, 5 by default); the variant "no-readout" captures the first mode with
`--readout_top_k 0`, and the last line gives the readout's own cost (first mode vs no-readout).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path

import click
from common import alternating_passes, machine, run_pass, speed_config

from latentmas.models import load_model
from latentmas.similarity import mode_names
from latentmas.tasks import get_task, load_problems


@click.command()
@click.option("--model_name", default="tiny-qwen3")
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--problems", "num_problems", default=4, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="rounds; each runs capture off and every mode once")
@click.option("--generate_bs", default=1, show_default=True)
@click.option("--latent_steps", default=10, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--similarity", default="seed", show_default=True,
              help="similarity modes to capture with, comma-separated (e.g. seed,query,attention)")
@click.option("--device", default="auto", show_default=True)
@click.option("--readout_top_k", default=5, show_default=True, type=click.IntRange(min=1),
              help="k of the latent readout in the capture passes (the no-readout variant uses 0)")
def main(model_name, random_weights, data_file, num_problems, repeats, generate_bs, latent_steps, max_new_tokens,
         similarity, device, readout_top_k):
    modes = [m.strip() for m in similarity.split(",")]
    unknown = sorted(set(modes) - set(mode_names()))
    if unknown:
        raise click.BadParameter(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(mode_names())}",
                                 param_hint="--similarity")
    configs = {mode: speed_config(model_name=model_name, random_weights=random_weights, data_file=data_file,
                                  latent_steps=latent_steps, max_new_tokens=max_new_tokens, generate_bs=generate_bs,
                                  device=device, similarity=mode, readout_top_k=readout_top_k)
               for mode in modes}
    configs["off"] = configs[modes[0]]
    configs["no-readout"] = dataclasses.replace(configs[modes[0]], readout_top_k=0)
    captured = [*modes, "no-readout"]
    task = get_task("gsm8k")
    problems = load_problems(task, data_file, num_problems)
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; model {model_name} ({lm.num_layers} layers, {lm.dtype}); "
          f"{len(problems)} problems, bs {generate_bs}, latent_steps {latent_steps}, "
          f"max_new_tokens {max_new_tokens} (EOS ignored); capture off vs {', '.join(modes)} (readout k "
          f"{readout_top_k}) and no-readout ({modes[0]}, k 0)")
    inside, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = {name: (None if name == "off" else Path(tmp) / f"{name}.h5") for name in ["off", *captured]}
        passes = alternating_passes(lm, problems, task, {name: (configs[name], path[name]) for name in path}, repeats,
                                    show_rounds=True)
        for mode in captured:
            inside[mode] = run_pass(lm, problems, task, configs[mode], path[mode], timed=True).recorder
            sizes[mode] = path[mode].stat().st_size
    off = statistics.median(p.per_problem for p in passes["off"])
    peak_off = max(p.peak_mib for p in passes["off"])
    print(f"capture off: {off:.3f} s/problem (median of {repeats}), peak {peak_off:.0f} MiB")
    print("time on/off: ratio of medians; paired: median over rounds of (mode / off of the same round), "
          "with its range")
    print("| mode | s/problem | time on/off | paired | paired range | peak MiB | memory on/off | "
          "inside recorder ms/problem (prefill hooks not included, see probe_cost.py) | file KiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in captured:
        on = statistics.median(p.per_problem for p in passes[mode])
        paired = [a.per_problem / b.per_problem - 1 for a, b in zip(passes[mode], passes["off"])]
        peak_on = max(p.peak_mib for p in passes[mode])
        memory = f"{(peak_on / peak_off - 1) * 100:+.2f}%" if lm.device.type == "cuda" else "n/a"
        print(f"| {mode} | {on:.3f} | {(on / off - 1) * 100:+.2f}% | {statistics.median(paired) * 100:+.2f}% | "
              f"{min(paired) * 100:+.2f}% .. {max(paired) * 100:+.2f}% | {peak_on:.0f} | {memory} | "
              f"{inside[mode] * 1000:.1f} ({inside[mode] / off * 100:.2f}%) | {sizes[mode] / 1024:.1f} |")

    with_readout = statistics.median(p.per_problem for p in passes[modes[0]])
    without = statistics.median(p.per_problem for p in passes["no-readout"])
    paired = [a.per_problem / b.per_problem - 1 for a, b in zip(passes[modes[0]], passes["no-readout"])]
    print(f"readout cost ({modes[0]}, k {readout_top_k} vs 0): {(with_readout / without - 1) * 100:+.2f}% "
          f"(ratio of medians), paired median {statistics.median(paired) * 100:+.2f}% "
          f"({min(paired) * 100:+.2f}% .. {max(paired) * 100:+.2f}%); inside recorder "
          f"{(inside[modes[0]] - inside['no-readout']) * 1000:+.1f} ms/problem")


if __name__ == "__main__":
    main()
