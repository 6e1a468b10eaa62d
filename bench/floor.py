"""What the speed targets ask of the hardware: LatentMAS's least possible time per problem on a GPU of a
given memory bandwidth and matrix throughput, from the model's shapes and the bench's real prompts.

Arithmetic, not a timing: no GPU and no weights are needed (the model is built on the meta device from
its config; the prompts are the agents' real prompts for the first problems of the data file, tokenized
and left-padded per batch as `latent_mas.solve` batches them). For each forward pass the time is at least
max(FLOPs / peak FLOP/s, bytes read / bandwidth):

- prompt prefills: 2 x the decoder layers' weights x tokens, plus attention (4 x layers x heads x
  head_dim x queries x keys, causal); the weights and the cache read once. Padded (`--padded_prefill`,
  and every prefill before stop 29), every row computes the batch's longest prompt and attends the
  padding before it; unpadded, each row its own tokens, as packed prefills (`latentmas.packed_prefill`,
  the default) run their projections and MLPs (their attention still runs in the batch's padded shape,
  masked: a small part of a prefill's work at these lengths);
- latent steps (`latent_steps` per thinking agent) and judger steps (`max_new_tokens - 1`, the first
  token comes with the judger's prefill): one token a row, the decoder layers' weights read once a
  step, the LM head's too for judger steps, and each row's own cache columns (padding or not: the
  step's split-KV kernel loads no key or value of a masked slot, `kernels/decode_attention.py`).
  (The LM head of the judger's prefill, one read of 0.78 GB a batch, is left out: under 0.05% of
  any floor here.)

Everything else a real step does (norms, RoPE, sampling, launches, the host) costs more than nothing,
so a measured speed can only be below this floor. Defaults are the H200 SXM's data-sheet figures
(4.8 TB/s, 989 dense bf16 TFLOP/s); `--bandwidth 3.31` is what cuBLAS's products reached at batch
size 1 in stop 25's profile (8.04 GB of weights in 2.43 ms).

    python bench/floor.py --model_name ../shared/models/qwen3-4b-arch --data_file ../shared/data/gsm8k_test.jsonl
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import click
import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from latentmas.methods.common import encode, thinking_of
from latentmas.models.loading import model_path
from latentmas.prompts import AGENTS, agent_prompt
from latentmas.tasks import get_task, load_problems

# The speed targets of issue #19 in problems/s (batch size 1's is 1.0 s a problem).
TARGETS = {1: 1.0, 16: 12.0, 64: 30.0}


@dataclass(frozen=True)
class Shapes:
    """What one token's forward pass reads and computes, from the model's config."""

    layer_params: int  # all decoder layers' weights together
    head_params: int  # the LM head (tied or not, it is read for logits)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int  # bf16: 2

    @classmethod
    def of(cls, config) -> Shapes:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        layers = model.model.layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(sum(p.numel() for p in layers.parameters()), model.lm_head.weight.numel(), len(layers),
                   config.num_attention_heads, config.num_key_value_heads, head_dim, 2)

    def cache_bytes(self, columns: float) -> float:
        """Keys and values of `columns` cached tokens over every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value * columns

    def attention_flops(self, queries: float, keys: float) -> float:
        """Scores and weighted values for `queries` tokens each attending `keys` (every layer and head)."""
        return 4 * self.layers * self.heads * self.head_dim * queries * keys


def floor_seconds(shapes: Shapes, widths: np.ndarray, latent_steps: int, new_tokens: int, bandwidth: float,
                  flops: float, padded: bool = False) -> dict[str, float]:
    """The least seconds a batch can take on `bandwidth` bytes/s and `flops` FLOP/s: prefills, latent
    steps and judger steps. widths: [agents, batch] each row's own prompt tokens per agent; padded:
    each agent's prompts left-padded to the batch's longest and prefilled so (`--padded_prefill`)."""
    weight_bytes = shapes.layer_params * shapes.bytes_per_value
    head_bytes = shapes.head_params * shapes.bytes_per_value
    seconds = {"prefills": 0.0, "latent steps": 0.0, "judger steps": 0.0}
    own = np.zeros(widths.shape[1])  # [batch] each row's own columns written before the pass
    held = np.zeros(widths.shape[1])  # [batch] the same with the padding the cache holds
    for agent, width in zip(AGENTS, widths.astype(np.float64)):
        prefilled = np.full_like(width, width.max()) if padded else width
        work = (2 * shapes.layer_params * prefilled + shapes.attention_flops(prefilled, held + (prefilled + 1) / 2)).sum()
        read = weight_bytes + shapes.cache_bytes(held + prefilled).sum()
        seconds["prefills"] += max(work / flops, read / bandwidth)
        own, held = own + width, held + prefilled
        steps, part, head = ((latent_steps, "latent steps", 0) if agent != AGENTS[-1]
                             else (new_tokens - 1, "judger steps", shapes.head_params))
        for _ in range(steps):
            own, held = own + 1, held + 1
            work = (2 * (shapes.layer_params + head) + shapes.attention_flops(1, own)).sum()
            read = weight_bytes + (head_bytes if head else 0) + shapes.cache_bytes(own).sum()
            seconds[part] += max(work / flops, read / bandwidth)
    return seconds


def prompt_widths(tokenizer, problems, task, cfg) -> np.ndarray:
    """[agents, batch]: each row's prompt tokens per agent, without the padding (`latent_mas.solve`
    left-pads each agent's prompts to the batch's longest)."""
    lm = types.SimpleNamespace(tokenizer=tokenizer, device="cpu")
    return np.stack([encode(lm, [agent_prompt(agent, p.question, task.answer_instruction, cfg.prompt, "latent_mas")
                                 for p in problems], thinking_of(cfg))[2].sum(dim=1).numpy() for agent in AGENTS])


@click.command()
@click.option("--model_name", required=True, help="a folder with config.json and the tokenizer (no weights needed), "
              "or tiny-qwen3")
@click.option("--data_file", required=True, help="the GSM8K jsonl")
@click.option("--batch_sizes", default="1,16,64,128", show_default=True)
@click.option("--batches", default=4, show_default=True, help="batches per batch size, averaged (their prompts differ)")
@click.option("--latent_steps", default=10, show_default=True)
@click.option("--max_new_tokens", default=256, show_default=True)
@click.option("--bandwidth", default=4.8, show_default=True, help="memory bandwidth, TB/s")
@click.option("--tflops", default=989.0, show_default=True, help="dense matrix throughput, TFLOP/s")
def main(model_name, data_file, batch_sizes, batches, latent_steps, max_new_tokens, bandwidth, tflops):
    from latentmas.config import RunConfig

    cfg = RunConfig(latent_steps=latent_steps, max_new_tokens=max_new_tokens)
    task = get_task("gsm8k")
    sizes = [int(b) for b in batch_sizes.split(",")]
    problems = load_problems(task, data_file, max(sizes) * batches)
    shapes = Shapes.of(AutoConfig.from_pretrained(model_path(model_name)))
    tokenizer = AutoTokenizer.from_pretrained(model_path(model_name))
    print(f"{model_name}: {shapes.layers} layers, decoder weights {shapes.layer_params / 1e9:.3f} B, LM head "
          f"{shapes.head_params / 1e9:.3f} B ({(shapes.layer_params + shapes.head_params) * 2 / 1e9:.2f} GB in "
          f"bf16), {shapes.cache_bytes(1) / 1024:.0f} KiB of cache a token; {bandwidth} TB/s, {tflops:.0f} TFLOP/s; "
          f"latent_steps {latent_steps}, {max_new_tokens} new tokens; {batches} batches a size")
    print("\nms a problem; 'padded' prefills every agent's prompts at the batch's longest (--padded_prefill), "
          "'unpadded' each row's own tokens (as packed prefills compute their projections)\n\n| batch | prompts | prompt tokens a problem | prefills | latent steps "
          "| judger steps | floor s/problem | floor problems/s | target problems/s | target / floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        groups = [prompt_widths(tokenizer, problems[b * size:(b + 1) * size], task, cfg) for b in range(batches)]
        for cache in ("padded", "unpadded"):
            totals = {"prefills": 0.0, "latent steps": 0.0, "judger steps": 0.0}
            tokens, padded = 0.0, cache == "padded"
            for widths in groups:
                tokens += (widths.max(axis=1).sum() if padded else widths.sum(axis=0).mean()) / batches
                for part, s in floor_seconds(shapes, widths, latent_steps, max_new_tokens, bandwidth * 1e12,
                                             tflops * 1e12, padded).items():
                    totals[part] += s / widths.shape[1] / batches
            per_problem = sum(totals.values())
            target = TARGETS.get(size)
            asks = f"{target} | {target * per_problem:.0%}" if target else " | "
            print(f"| {size} | {cache} | {tokens:.0f} | {totals['prefills'] * 1e3:.2f} | "
                  f"{totals['latent steps'] * 1e3:.2f} | {totals['judger steps'] * 1e3:.2f} | {per_problem:.4f} | "
                  f"{1 / per_problem:.1f} | {asks} |")


if __name__ == "__main__":
    main()
