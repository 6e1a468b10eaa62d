"""Run settings shared by every method and command (no torch here)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

METHODS = ("baseline", "text_mas", "latent_mas")
PROMPTS = ("sequential", "hierarchical")
KNN_STRATEGIES = ("top", "bottom", "random")
SIMILARITY_MODES = ("seed", "query", "attention")  # capture.similarity.MODES, without importing torch


@dataclass
class RunConfig:
    """Everything that decides a run's results. Field names match the CLI flags."""

    method: str = "latent_mas"
    model_name: str = "tiny-qwen3"
    task: str = "gsm8k"
    data_file: str | None = None
    max_samples: int = -1
    prompt: str = "sequential"
    think: bool = False
    latent_steps: int = 10
    latent_space_realign: bool = False
    max_new_tokens: int = 2048
    temperature: float = 0.6
    top_p: float = 0.95
    ignore_eos: bool = False
    fast_decode: bool | None = None
    generate_bs: int = 1
    seed: int = 42
    device: str = "auto"
    random_weights: bool = False
    text_mas_context_length: int = 2048
    knn_filter: bool = False
    knn_percentage: float = 0.8
    knn_min_keep: int = 5
    knn_strategy: str = "top"
    knn_score: str = "seed"  # which similarity ranks columns for kNN (one of SIMILARITY_MODES)
    similarity: str = "seed"

    def knn_settings(self) -> dict | None:
        if not self.knn_filter:
            return None
        return {"percentage": self.knn_percentage, "min_keep": self.knn_min_keep, "strategy": self.knn_strategy}

    def identity(self) -> dict:
        """The settings a capture file must share with a run that resumes it."""
        keys = ("method", "model_name", "random_weights", "task", "data_file", "prompt", "think", "latent_steps",
                "latent_space_realign", "max_new_tokens", "temperature", "top_p", "ignore_eos", "seed",
                "text_mas_context_length", "similarity")
        identity = {k: getattr(self, k) for k in keys}
        identity["knn"] = self.knn_settings()
        if identity["knn"] is not None and self.knn_score != "seed":
            # only when not the default, so captures made before knn_score existed still resume
            identity["knn"]["score"] = self.knn_score
        return identity

    def run_name(self) -> str:
        """A stable name for the run's outputs, so rerunning a command finds (and resumes) them.

        Readable parts plus a digest of every setting that changes results, so runs with
        other settings never share a results folder or a default capture file.
        """
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model_name.rstrip("/").split("/")[-1])
        name = f"{self.method}_{self.task}_{model}"
        if self.knn_filter:
            name += f"_knn{self.knn_strategy}{self.knn_percentage:g}"
            if self.knn_score != "seed":
                name += f"-{self.knn_score}"
        if self.similarity != "seed":
            name += f"_{self.similarity}"
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:6]
        return f"{name}_{digest}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
