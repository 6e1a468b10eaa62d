"""What a capture file records about its run, and opening the run's recorder."""

from __future__ import annotations

import json
import shlex
import sys

import latentmas
from capture.selection import DEFAULT_TRANSITIONS

from ..config import RunConfig


def run_attributes(cfg: RunConfig, lm, origin: dict | None = None) -> dict:
    """The run's self-description, stored as the capture file's attributes; `origin`: where the problems
    came from and how many (`latentmas.tasks.loading.problem_origin`)."""
    import torch

    device = lm.device
    knn = cfg.knn_settings() or {}
    return {
        "package_version": latentmas.__version__,
        "command": shlex.join(sys.argv),
        "model_name": cfg.model_name,
        "random_weights": cfg.random_weights,
        "num_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "head_dim": lm.head_dim,
        "hidden_size": lm.hidden_size,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "method": cfg.method,
        "task": cfg.task,
        "prompt": cfg.prompt,
        "latent_steps": cfg.latent_steps,
        "latent_space_realign": cfg.latent_space_realign,
        "knn_filter": cfg.knn_filter,
        "knn_percentage": knn.get("percentage", 0.0),
        "knn_min_keep": knn.get("min_keep", 0),
        "knn_strategy": knn.get("strategy", ""),
        "knn_score": cfg.knn_score if knn else "",
        "seed": cfg.seed,
        "generate_bs": cfg.generate_bs,
        "batch_order": cfg.batch_order,
        **(origin or {}),
    }


def capture_identity(cfg: RunConfig, transitions: tuple[str, ...] | None, capture_dtype: str) -> dict:
    """The settings a capture file stores and a resume must match (as JSON types, like the file's copy)."""
    identity = dict(cfg.identity(), transitions="all" if transitions is None else list(transitions),
                    capture_dtype=capture_dtype)
    if cfg.readout_top_k:  # only when on, so captures made before the readout existed resume with it off
        identity["readout_top_k"] = cfg.readout_top_k
    return json.loads(json.dumps(identity, sort_keys=True))


def open_recorder(path, cfg: RunConfig, lm, transitions=DEFAULT_TRANSITIONS, capture_dtype: str = "float16",
                  overwrite: bool = False, questions: dict[int, str] | None = None, recorder_class=None,
                  origin: dict | None = None):
    """A `capture.recorder.CaptureRecorder` (or `recorder_class`) writing this run's hand-offs into `path`."""
    from capture.recorder import CaptureRecorder

    return (recorder_class or CaptureRecorder).open(path, lm, run_attributes=run_attributes(cfg, lm, origin),
                                identity=capture_identity(cfg, transitions, capture_dtype),
                                similarity=cfg.similarity, transitions=transitions, overwrite=overwrite,
                                dtype=capture_dtype, questions=questions, readout_top_k=cfg.readout_top_k)
