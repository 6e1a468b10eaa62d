"""Load any Hugging Face causal LM (hub name or local folder) or the built-in `tiny-qwen3`."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fused_projections import fuse_projections as fuse
from . import tiny_qwen3


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message is one line."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer (left padding) and the shapes capture needs."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    static_steps: OrderedDict = field(default_factory=OrderedDict, repr=False)  # fast_decode.static_step's reuse
    kv_storage: object = field(default=None, repr=False)  # the last batch's cache buffers (kv_storage.storage_for)

    @property
    def config(self):
        return self.model.config.get_text_config()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    return resolved


def model_path(name: str) -> str:
    """What `from_pretrained` reads for `name`: the built-in tiny-qwen3's folder (built on first use), else `name`."""
    return str(tiny_qwen3.ensure_built()) if name == tiny_qwen3.NAME else name


def load_model(
    name: str,
    device: str | torch.device = "auto",
    random_weights: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    fuse_projections: bool | None = None,
) -> LoadedModel:
    """Load `name` on `device`: bf16 on CUDA, fp32 on CPU, in eval mode.

    random_weights: build the model from its config with seeded random weights on
    the device instead of reading weights (benchmarks on real shapes, no download).
    fuse_projections: compute q/k/v and gate/up projections as one product each
    (`latentmas.fused_projections`); None = on CUDA, where it makes a decoding step faster.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = model_path(name)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if random_weights:
            config = AutoConfig.from_pretrained(path, **extra)
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
    except (OSError, ValueError) as error:
        if Path(path).exists():
            hint = ""
        elif path.startswith((".", "/", "~")):
            hint = " (no such local folder)"
        elif offline():
            hint = " (not a local folder, and HF_HUB_OFFLINE is set so the hub is not asked)"
        else:
            hint = " (not a local folder, and the hub did not provide it: set HF_HUB_OFFLINE=1 to fail fast)"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model {name!r}{hint}: {first_line}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.requires_grad_(False)
    if device.type == "cuda" if fuse_projections is None else fuse_projections:
        fuse(model)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=device)


def offline() -> bool:
    """True when the user asked Hugging Face libraries not to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
