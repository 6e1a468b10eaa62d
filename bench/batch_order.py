"""Batches of consecutive problems against batches of problems of like length (`--batch_order`), side by
side in one process: time per problem, and the prompt tokens a problem carries once each agent's prompts
are left-padded to its batch's longest (what every prefill computes; the steps skip the padding).

    python bench/batch_order.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \
        --data_file .gpu_inputs/gsm8k_test.jsonl --problems 256 --batch_sizes 16,64 --compile_step

Settings as `latentmas_speed.py` (latent_steps 10, EOS ignored, temperature 0.6, top_p 0.95), capture off.
"""

from __future__ import annotations

import statistics

import click
from common import alternating_passes, machine, speed_config
from floor import prompt_widths

from latentmas.app.shares import batches
from latentmas.models import load_model
from latentmas.tasks import get_task, load_problems

ORDERS = ("number", "length")


def padded_tokens(tokenizer, problems, task, cfg) -> float:
    """Prompt tokens a problem, over the four agents, with each batch padded to its longest."""
    total = 0
    for batch in batches(problems, cfg.generate_bs, cfg.batch_order):
        widths = prompt_widths(tokenizer, batch, task, cfg)  # [agents, batch]
        total += int(widths.max(axis=1).sum()) * widths.shape[1]
    return total / len(problems)


@click.command()
@click.option("--model_name", default="tiny-qwen3", show_default=True)
@click.option("--random_weights", is_flag=True)
@click.option("--data_file", default=None)
@click.option("--problems", default=64, show_default=True, help="the first problems of the data, solved in each pass")
@click.option("--batch_sizes", default="16", show_default=True)
@click.option("--repeats", default=2, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--compile_step", is_flag=True, help="compile the static step (torch.compile)")
@click.option("--device", default="auto", show_default=True)
def main(model_name, random_weights, data_file, problems, batch_sizes, repeats, max_new_tokens, compile_step, device):
    task = get_task("gsm8k")
    chosen = load_problems(task, data_file, problems)
    lm = load_model(model_name, device, random_weights=random_weights)
    print(f"machine: {machine(lm)}; model {model_name} ({lm.num_layers} layers, {lm.dtype}); {len(chosen)} problems, "
          f"max_new_tokens {max_new_tokens} (EOS ignored), step {'compiled' if compile_step else 'eager'}, capture off")
    table, ratios = ["\n| batch size | batches | padded prompt tokens a problem | s/problem | passes |",
                     "|---|---|---|---|---|"], []
    for size in (int(b) for b in batch_sizes.split(",")):
        configs = {order: speed_config(model_name=model_name, random_weights=random_weights, data_file=data_file,
                                       max_new_tokens=max_new_tokens, generate_bs=size, device=device,
                                       compile_step=compile_step, batch_order=order) for order in ORDERS}
        passes = alternating_passes(lm, chosen, task, {order: (cfg, None) for order, cfg in configs.items()}, repeats)
        medians = {}
        for order, cfg in configs.items():
            medians[order] = statistics.median(p.per_problem for p in passes[order])
            each = ", ".join(f"{p.per_problem:.4f}" for p in passes[order])
            table.append(f"| {size} | {order} | {padded_tokens(lm.tokenizer, chosen, task, cfg):.0f} | "
                         f"{medians[order]:.4f} | {each} |")
            print(f"  bs {size} {order}: {medians[order]:.4f} s/problem (passes {each})", flush=True)
        fastest = {order: min(p.per_problem for p in passes[order]) for order in ORDERS}
        ratios.append(f"batch size {size}: by length {medians['length'] / medians['number']:.3f}x the time per "
                      f"problem of number order (medians), {fastest['length'] / fastest['number']:.3f}x (fastest passes)")
    print("\n".join(table + [""] + ratios))


if __name__ == "__main__":
    main()
