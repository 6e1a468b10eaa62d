"""Run settings shared by every method and command (no torch here).

`RunConfig` is the one source of every run setting: each field carries its default, its
help text, its CLI group and (where it has them) its choices, through `setting(...)`.
The CLI builds its options from these fields (`latentmas.app.options`), so defaults,
help and choices cannot drift apart.

Choices may be a tuple or a zero-argument callable that returns the names of a registry
(similarity modes, methods, tasks); the callable is only called when the CLI needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

# CLI option groups, in the order `--help` shows them.
GROUPS = ("model", "method", "kNN", "capture", "output", "benchmark-only")

PROMPTS = ("sequential", "hierarchical")
KNN_STRATEGIES = ("top", "bottom", "random")
KNN_POSITIONS = ("keep", "renumber")
BATCH_ORDERS = ("number", "length")


def _similarity_modes() -> tuple[str, ...]:
    from .similarity import mode_names

    return mode_names()


def _methods() -> tuple[str, ...]:
    from .methods import method_names

    return method_names()


def _tasks() -> tuple[str, ...]:
    from .tasks import task_names

    return task_names()


def setting(default, help: str, group: str, choices: tuple | Callable[[], tuple] | None = None,
            minimum: float | None = None, maximum: float | None = None, open_min: bool = False,
            path: bool = False, cli: bool = True, negative: str | None = None):
    """A `RunConfig` field with what the CLI needs to offer it.

    minimum/maximum (open_min: the minimum itself excluded) bound numbers; path: an existing
    file; cli=False: a setting with no command-line option (set from code); negative: the
    name of the off switch of an on/off setting whose default is None (`--fast_decode/--plain_decode`).
    """
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}; choose from {', '.join(GROUPS)}")
    metadata = dict(help=help, group=group, choices=choices, minimum=minimum, maximum=maximum,
                    open_min=open_min, path=path, cli=cli, negative=negative)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything that decides a run's results. Field names match the CLI flags."""

    # -- model
    model_name: str = setting("tiny-qwen3", "Hugging Face model id or local folder; 'tiny-qwen3' is the "
                              "built-in offline model.", "model")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.", "model")
    # -- method
    method: str = setting("latent_mas", "baseline: one agent; text_mas: agents pass text; latent_mas: agents "
                          "share a KV cache.", "method", choices=_methods)
    task: str = setting("gsm8k", "Benchmark whose problems are solved.", "method", choices=_tasks)
    data_file: str | None = setting(None, "Local JSONL/JSON with the dataset's own fields. Default: the hub, "
                                    "else bundled samples.", "method", path=True)
    max_samples: int = setting(-1, "Number of problems; -1 = all.", "method", minimum=-1)
    prompt: str = setting("sequential", "Agent topology.", "method", choices=PROMPTS)
    think: bool = setting(False, "Let agents open a <think> block (Qwen3 thinking mode).", "method")
    latent_steps: int = setting(10, "Latent steps per non-judger agent.", "method", minimum=0)
    latent_space_realign: bool = setting(False, "Map hidden states back to the input-embedding space before "
                                         "feeding them in.", "method")
    max_new_tokens: int = setting(2048, "Most tokens the judger (and text_mas agents) decode.", "method",
                                  minimum=1)
    temperature: float = setting(0.6, "Sampling temperature; 0 = greedy.", "method", minimum=0)
    top_p: float = setting(0.95, "Nucleus sampling: smallest token set with this much probability.", "method",
                           minimum=0, maximum=1, open_min=True)
    generate_bs: int = setting(1, "Problems per batch.", "method", minimum=1)
    batch_order: str = setting("number", "Which problems share a batch. number: consecutive problem numbers. "
                               "length: problems of similar question length, longest first, so prefills compute "
                               "less padding (each agent's prompts are padded to the batch's longest); results "
                               "change only by rounding, as with another --generate_bs, and a capture file holds "
                               "the problems in the order solved.", "method",
                               choices=BATCH_ORDERS)
    seed: int = setting(42, "Seed of sampling, kNN 'random' and --random_weights.", "method")
    text_mas_context_length: int = setting(2048, "text_mas: most tokens of earlier agents' text passed on.",
                                           "method", minimum=1)
    no_think: bool = setting(False, "Turn Qwen3's thinking off for every agent: the chat template writes an empty "
                             "<think></think> block (this project's former default; the original never "
                             "does this).", "method")
    top_k: int = setting(-1, "Sample from the k most likely tokens (before top-p); -1 = the model's generation "
                         "config, as the original's `generate` (Qwen3: 20; none: off); 0 = off.", "method",
                         minimum=-1)
    # -- kNN
    knn_filter: bool = setting(False, "Trim the shared cache before each hand-off.", "kNN")
    knn_percentage: float = setting(0.8, "Fraction of cached tokens kept, in (0, 1].", "kNN", minimum=0,
                                    maximum=1, open_min=True)
    knn_min_keep: int = setting(5, "The most recent tokens always kept.", "kNN", minimum=0)
    knn_strategy: str = setting("top", "Which older tokens to keep: most similar, least similar, or random.",
                                "kNN", choices=KNN_STRATEGIES)
    knn_score: str = setting("seed", "The similarity (middle layer) that ranks tokens for --knn_strategy "
                             "top/bottom. Modes that need the prompt's prefill cost a scoring pass: the incoming "
                             "prompt runs on the cache up to the middle layer before the trim, then the cache is "
                             "put back.", "kNN", choices=_similarity_modes)
    knn_positions: str = setting("keep", "Positions of the columns written after a trim. keep: count on from "
                                 "the last original position (kept columns keep theirs); renumber: restart at the "
                                 "number of kept columns, as the kNN-latentMAS fork does.", "kNN",
                                 choices=KNN_POSITIONS)
    # -- capture
    similarity: str = setting("seed", "What the captured matrices hold; `latentmas modes` describes each mode.",
                              "capture", choices=_similarity_modes)
    readout_top_k: int = setting(5, "Latent readout: for every latent step, keep the k most likely next tokens of the "
                                 "model's own distribution (LM head on the hidden state fed back), their "
                                 "probabilities and its entropy; 0 = off.", "capture", minimum=0)
    # -- benchmark-only
    random_weights: bool = setting(False, "Build the model from its config with seeded random weights (no "
                                   "weights needed).", "benchmark-only")
    ignore_eos: bool = setting(False, "Always decode max_new_tokens.", "benchmark-only")
    fast_decode: bool | None = setting(None, "Run decoding and latent steps on a static KV buffer replayed as "
                                       "a CUDA graph, and prompt prefills in chunks replayed the same way "
                                       "(default: on CUDA only).", "benchmark-only", negative="plain_decode")
    graph_prefill: bool = setting(True, "With the fast path, prefill the prompts of batches of up to 4 in chunks "
                                  "replayed as CUDA graphs where nothing hooks the model (on an H200, 0.89x the time "
                                  "per Qwen3-4B problem at batch size 1); kNN scoring hooks its prefill eagerly, and "
                                  "the query and attention similarities read the chunks' queries. --eager_prefill: "
                                  "always eagerly.",
                                  "benchmark-only", negative="eager_prefill")
    packed_prefill: bool = setting(True, "Prefill a batch's left-padded prompts on their real tokens only, "
                                   "packed into one row (attention still reads each problem's own columns), "
                                   "where nothing hooks the model and the chunks do not run: no projection or "
                                   "MLP work on padding. --padded_prefill: on every column, padding included.",
                                   "benchmark-only", negative="padded_prefill")
    compile_step: bool = setting(False, "Compile that static step with torch.compile (inductor) before "
                                 "recording it: ~3 ms faster per Qwen3-4B step on an H200, but each kind of "
                                 "step compiles for 60-85 s, so it pays off on long runs only.",
                                 "benchmark-only")
    compile_prefill: bool = setting(False, "Run the prefills that the graphed chunks leave (batches of more "
                                    "than 4, or --eager_prefill) through one torch.compile'd forward of the "
                                    "decoder layers (dynamic shapes, shared by every layer) where nothing hooks "
                                    "the model: on an H200, 0.7x the eager time per Qwen3-4B prefill at batch "
                                    "sizes 16 and 64, after a first compile of about 23 s.",
                                    "benchmark-only")

    def knn_settings(self) -> dict | None:
        if not self.knn_filter:
            return None
        return {"percentage": self.knn_percentage, "min_keep": self.knn_min_keep, "strategy": self.knn_strategy}

    def identity(self) -> dict:
        """The settings a capture file must share with a run that resumes it."""
        # no_think and top_k are always recorded: captures made before them ran with thinking off and no
        # top-k cut, which are no longer the defaults, so they must not resume under the new ones.
        keys = ("method", "model_name", "random_weights", "task", "data_file", "prompt", "think", "no_think",
                "latent_steps", "latent_space_realign", "max_new_tokens", "temperature", "top_p", "top_k",
                "ignore_eos", "seed", "text_mas_context_length", "similarity")
        identity = {k: getattr(self, k) for k in keys}
        identity["knn"] = self.knn_settings()
        if identity["knn"] is not None and self.knn_score != "seed":
            # only when not the default, so captures made before knn_score existed still resume
            identity["knn"]["score"] = self.knn_score
        if identity["knn"] is not None and self.knn_positions != "keep":
            identity["knn"]["positions"] = self.knn_positions
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

    @classmethod
    def from_params(cls, params: dict) -> RunConfig:
        """A config from CLI parameters (other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})
