"""`tiny-qwen3`: a small Qwen3-architecture model built offline, for tests and the demo.

It has the real architecture (grouped-query attention, q/k RMSNorm, RoPE), seeded
random weights and a byte-level BPE tokenizer trained with `tokenizers` on a short
built-in text, with a Qwen-style chat template (`<|im_start|>role ... <|im_end|>`,
`<think>`). It is written once to a cache folder and then loaded through
`from_pretrained`, exactly like a model from the hub. Its text is meaningless.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

NAME = "tiny-qwen3"
VERSION = 2  # bump when the recipe changes, so caches rebuild (2: no weight left at a constant)
SEED = 1234

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

ARCHITECTURE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=8192,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

# Training text for the tokenizer: enough for common English and maths pieces.
_CORPUS = """
system user assistant system user assistant think answer question
You are a careful planner. Read the question, break it into steps and plan the solution.
You are a critic. Check the plan for mistakes, missing steps and wrong arithmetic.
You are a refiner. Improve the plan using the critique and state the refined reasoning.
You are the judger. Use the shared reasoning to give the final answer.
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many
clips in May. How many clips did Natalia sell altogether in April and May?
Answer: In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. #### 72
The answer is \\boxed{72}. Let's think step by step. First, second, third, therefore, total,
each, per, hour, minute, dollars, cost, price, buy, sell, more, less, twice, half, times.
Which of the following is correct? A. B. C. D. Options: option, patient, cell, energy, force.
Give the final answer as a number in \\boxed{}. Give the final answer as the option letter.
""" * 4


def cache_dir() -> Path:
    """Where built models live: $LATENTMAS_CACHE or ~/.cache/latentmas."""
    root = os.environ.get("LATENTMAS_CACHE") or Path.home() / ".cache" / "latentmas"
    return Path(root) / f"{NAME}-v{VERSION}"


def ensure_built() -> Path:
    """Build tiny-qwen3 into the cache folder once; return the folder."""
    target = cache_dir()
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        build(staging)
        with contextlib.suppress(OSError):  # another process finished first
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tokenizer():
    """A byte-level BPE (digits split one by one, as Qwen does) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(folder: Path) -> None:
    """Write tokenizer and seeded model into `folder` (save_pretrained format)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        **ARCHITECTURE,
    )
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    vary_constant_weights(model, SEED)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def vary_constant_weights(model, seed: int, spread: float = 0.5) -> list[str]:
    """Give every parameter that is one constant (RMSNorm weights of 1, biases of 0) seeded random values.

    A test model whose norm weights are all 1 cannot tell a code path that skips a norm from one
    that applies it (cosine is blind to a per-head scale of 1); a zero bias hides a missing bias.
    Norm weights become uniform in [1 - spread, 1 + spread], other constants N(0, spread / 4).
    Returns the names of the parameters changed.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.numel() < 2 or bool((parameter != parameter.flatten()[0]).any()):
                continue
            if "norm" in name:
                values = 1 + spread * (2 * torch.rand(parameter.shape, generator=generator) - 1)
            else:
                values = spread / 4 * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(values.to(parameter.dtype))
            changed.append(name)
    return changed


def sharpen_attention(model, factor: float) -> None:
    """Scale every layer's q_proj and k_proj weights by `factor`: attention logits grow by about factor².

    Models without q/k norms (Llama, Qwen2) at their initial weight scale attend almost uniformly,
    which hides mistakes in positions (RoPE) and in the attention maths; this makes them attend sharply.
    """
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
