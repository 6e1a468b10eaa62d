"""How much two captures of the same problems differ when only the arithmetic differs.

Captures the same problems (greedy, latent_mas) several ways and compares each with a reference,
hand-off by hand-off, per segment kind (each agent's prompt columns, each agent's latent columns)
and per latent step (how a difference grows step by step):

    repeat   the reference again (same batch size, same path): 0 where runs are reproducible
    bs<N>    batch size N instead of 1
    fast     the static-buffer step (a CUDA graph on GPUs) instead of plain forward passes
    bf16     bf16 against the fp32 reference (only when both dtypes are measured)

The reference is batch size 1, plain path, in the same dtype. Differences are |a - b| of the
captured similarities (written as float32), over every layer and real column.

    python bench/noise_floor.py                                     # CPU, tiny-qwen3, fp32
    python bench/noise_floor.py --model_name .gpu_inputs/qwen3-4b-arch --random_weights \\
        --device cuda --dtypes bf16,fp32 --problems 8 --batch_size 8 --json noise_floor.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import click
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.format import LATENT_TOKEN, CaptureReader
from latentmas.app.recording import open_recorder
from latentmas.config import RunConfig
from latentmas.methods import get_method, latent_mas
from latentmas.models import load_model
from latentmas.prompts import AGENTS
from latentmas.tasks import get_task, load_problems

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def capture(lm, problems, cfg: RunConfig, batch_size: int, path: Path) -> Path:
    """Solve `problems` in batches of `batch_size` into the capture file `path` (float32 matrices)."""
    solve, task = get_method(cfg.method), get_task(cfg.task)
    recorder = open_recorder(path, cfg, lm, capture_dtype="float32", overwrite=True)
    try:
        for start in range(0, len(problems), batch_size):
            recorder.write_batch(solve(lm, problems[start:start + batch_size], task, cfg, observer=recorder))
        recorder.finish({})
    finally:
        recorder.close()
    return path


def column_labels(handoff) -> list[tuple[str, int | None]]:
    """Per column: (segment label, latent step or None). Labels read like 'critic latent'."""
    labels: list[tuple[str, int | None]] = [("?", None)] * handoff.num_columns
    for segment in handoff.segments:
        for offset, column in enumerate(range(segment.start, segment.stop)):
            step = offset + 1 if segment.kind == "latent" else None
            labels[column] = (f"{segment.agent} {segment.kind}", step)
    return labels


def differences(reference: Path, other: Path) -> tuple[dict, dict]:
    """|reference - other| of the captured similarities, gathered two ways:

    by (hand-off, segment label) over every hand-off, and by (agent, latent step) at the hand-off
    that agent makes (the cache as it leaves it). Returns two dicts of lists of arrays [layers].
    Both captures must hold the same problems and tokens."""
    by_segment, by_step = defaultdict(list), defaultdict(list)
    with CaptureReader(reference) as a, CaptureReader(other) as b:
        if a.problem_numbers != b.problem_numbers:
            raise ValueError(f"{other} holds other problems than {reference}")
        for number in a.problem_numbers:
            for ha, hb in zip(a.handoffs(number), b.handoffs(number), strict=True):
                if ha.tokens != hb.tokens:
                    raise ValueError(f"problem {number} {ha.name}: the two captures read different tokens")
                delta = np.abs(ha.layer_similarities.astype(np.float64) - hb.layer_similarities.astype(np.float64))
                for column, (label, step) in enumerate(column_labels(ha)):
                    by_segment[(ha.name, label)].append(delta[:, column])
                    agent = label.split()[0]
                    if step is not None and agent == ha.from_agent and ha.tokens[column] == LATENT_TOKEN:
                        by_step[(agent, step)].append(delta[:, column])
    return by_segment, by_step


def summarise(groups: dict) -> dict:
    """key -> (mean, max) over every value gathered under it."""
    return {key: (float(np.concatenate(arrays).mean()), float(np.concatenate(arrays).max()))
            for key, arrays in groups.items()}


def print_table(title: str, key_names: list[str], table: dict) -> None:
    """table: (dtype, key) -> {comparison: (mean, max)}; one row per (dtype, key), mean / max per comparison."""
    comparisons = list(dict.fromkeys(c for row in table.values() for c in row))
    print(f"\n{title}\n")
    print("| dtype | " + " | ".join(key_names) + " | " + " | ".join(f"{c} mean / max" for c in comparisons) + " |")
    print("|---" * (1 + len(key_names) + len(comparisons)) + "|")
    for (dtype, key), row in table.items():
        cells = [f"{row[c][0]:.1e} / {row[c][1]:.1e}" if c in row else "-" for c in comparisons]
        print(f"| {dtype} | " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")


@click.command()
@click.option("--model_name", default="tiny-qwen3", show_default=True)
@click.option("--random_weights", is_flag=True, help="Seeded random weights from the model's config.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtypes", default="fp32", show_default=True, help="Comma separated: bf16, fp32.")
@click.option("--task", default="gsm8k", show_default=True)
@click.option("--data_file", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--problems", "num_problems", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--batch_size", type=click.IntRange(min=2), default=4, show_default=True,
              help="The batched capture's batch size (the reference is 1).")
@click.option("--latent_steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--similarity", default="seed", show_default=True)
@click.option("--fast/--no_fast", default=True, show_default=True, help="Also compare the static-buffer path.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Also write every figure here.")
def main(model_name, random_weights, device, dtypes, task, data_file, num_problems, batch_size, latent_steps,
         similarity, fast, json_path):
    names = [d.strip() for d in dtypes.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown or not names:
        raise click.BadParameter(f"unknown dtype {', '.join(unknown) or '(none)'}; choose bf16, fp32",
                                 param_hint="--dtypes")
    lm = load_model(model_name, device, random_weights=random_weights)
    problems = load_problems(get_task(task), max_samples=num_problems, data_file=data_file)
    base = dict(model_name=model_name, random_weights=random_weights, task=task, data_file=data_file,
                latent_steps=latent_steps, max_new_tokens=1, temperature=0.0, similarity=similarity,
                device=str(lm.device))
    import transformers

    gpu = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    print(f"{model_name} ({'random weights' if random_weights else 'its weights'}) on {gpu}; torch "
          f"{torch.__version__}; transformers {transformers.__version__}; {len(problems)} {task} problems, "
          f"latent_steps {latent_steps}, similarity {similarity}, greedy")
    by_segment_table, by_step_table = defaultdict(dict), defaultdict(dict)

    def add(comparison: str, dtype: str, reference: Path, other: Path) -> None:
        by_segment, by_step = differences(reference, other)
        for key, value in summarise(by_segment).items():
            by_segment_table[(dtype, key)][comparison] = value
        for key, value in sorted(summarise(by_step).items(), key=lambda item: (AGENTS.index(item[0][0]), item[0][1])):
            by_step_table[(dtype, key)][comparison] = value

    references = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for name in names:
            lm.model.to(DTYPES[name])
            latent_mas._LATENT_INPUT[:] = [None, None, None]  # its LatentInput holds the old dtype
            plain = RunConfig(**base, fast_decode=False)
            references[name] = capture(lm, problems, plain, 1, folder / f"{name}-bs1.h5")
            add("repeat", name, references[name], capture(lm, problems, plain, 1, folder / f"{name}-repeat.h5"))
            add(f"bs{batch_size}", name, references[name],
                capture(lm, problems, plain, batch_size, folder / f"{name}-bs.h5"))
            if fast:
                add("fast", name, references[name],
                    capture(lm, problems, RunConfig(**base, fast_decode=True), 1, folder / f"{name}-fast.h5"))
        if "bf16" in references and "fp32" in references:
            add("bf16 vs fp32", "bf16", references["fp32"], references["bf16"])
    print_table("By segment (every hand-off, every layer and real column of the segment):",
                ["hand-off", "columns"], by_segment_table)
    print_table("By latent step (each agent's latent columns at the hand-off it makes):",
                ["agent", "step"], by_step_table)
    if json_path:
        figures = [{"table": table_name, "dtype": dtype, "key": list(key), "comparison": c, "mean": m, "max": x}
                   for table_name, table in (("segment", by_segment_table), ("latent_step", by_step_table))
                   for (dtype, key), row in table.items() for c, (m, x) in row.items()]
        Path(json_path).write_text(json.dumps({"machine": gpu, "figures": figures}, indent=1) + "\n")


if __name__ == "__main__":
    main()
