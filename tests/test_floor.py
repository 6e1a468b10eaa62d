"""bench/floor.py: the least time a problem can take, against sums worked by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def floor():
    spec = importlib.util.spec_from_file_location("floor_bench", ROOT / "bench" / "floor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _shapes(floor):
    # cache_bytes(c) = 2 (k, v) x 2 layers x 1 kv head x 4 dims x 2 bytes x c = 32 c
    return floor.Shapes(layer_params=1000, head_params=100, layers=2, heads=2, kv_heads=1, head_dim=4,
                        bytes_per_value=2)


def test_bandwidth_bound_passes_read_the_weights_once_and_every_written_column(floor):
    """One row, 3 prompt tokens per agent, 1 latent step per thinking agent, 2 new tokens; 1 byte/s."""
    widths = np.full((4, 1), 3)
    seconds = floor.floor_seconds(_shapes(floor), widths, latent_steps=1, new_tokens=2, bandwidth=1.0, flops=1e30)
    # prefills read 2000 bytes of weights and the cache through their prompt: columns 3, 7, 11, 15
    assert seconds["prefills"] == pytest.approx(4 * 2000 + 32 * (3 + 7 + 11 + 15))
    # a latent step after each thinking prompt: columns 4, 8, 12
    assert seconds["latent steps"] == pytest.approx(3 * 2000 + 32 * (4 + 8 + 12))
    # the one judger step after the judger's prefill reads the LM head too: column 16
    assert seconds["judger steps"] == pytest.approx(2000 + 200 + 32 * 16)


def test_compute_bound_prefill_counts_weights_and_causal_attention(floor):
    widths = np.array([[3], [0], [0], [0]])
    seconds = floor.floor_seconds(_shapes(floor), widths, latent_steps=0, new_tokens=1, bandwidth=1e30, flops=1.0)
    # 2 x 1000 x 3 for the weights; 4 x 2 layers x 2 heads x 4 dims x 3 queries x 2 keys on average
    assert seconds["prefills"] == pytest.approx(6000 + 384)
    assert seconds["latent steps"] == seconds["judger steps"] == 0.0


def test_rows_add_their_work_and_cache_but_share_the_weights(floor):
    shapes = _shapes(floor)
    args = dict(latent_steps=2, new_tokens=4)
    one, two = np.full((4, 1), 5), np.full((4, 2), 5)
    compute = [floor.floor_seconds(shapes, w, bandwidth=1e30, flops=1.0, **args) for w in (one, two)]
    assert all(compute[1][part] == pytest.approx(2 * compute[0][part]) for part in compute[0])
    memory = [floor.floor_seconds(shapes, w, bandwidth=1.0, flops=1e30, **args) for w in (one, two)]
    # 4 prefills, 6 latent steps, 3 judger steps: the weights once a pass however many rows
    weights = 4 * 2000 + 6 * 2000 + 3 * (2000 + 200)
    assert sum(memory[1].values()) - weights == pytest.approx(2 * (sum(memory[0].values()) - weights))


def test_padded_prefills_compute_the_longest_prompt_but_steps_read_only_own_columns(floor):
    shapes = _shapes(floor)
    ragged, longest = np.array([[2, 6]] * 4), np.full((4, 2), 6)
    args = dict(latent_steps=2, new_tokens=4)
    compute = dict(bandwidth=1e30, flops=1.0)
    assert floor.floor_seconds(shapes, ragged, padded=True, **args, **compute)["prefills"] == \
        pytest.approx(floor.floor_seconds(shapes, longest, **args, **compute)["prefills"])
    assert floor.floor_seconds(shapes, ragged, padded=True, **args, **compute)["prefills"] > \
        floor.floor_seconds(shapes, ragged, **args, **compute)["prefills"]
    memory = dict(bandwidth=1.0, flops=1e30)
    for part in ("latent steps", "judger steps"):
        assert floor.floor_seconds(shapes, ragged, padded=True, **args, **memory)[part] == \
            pytest.approx(floor.floor_seconds(shapes, ragged, **args, **memory)[part])


def test_command_prints_a_row_per_batch_size_and_cache(floor, tiny_lm_cache_env):
    result = CliRunner().invoke(floor.main, ["--model_name", "tiny-qwen3", "--data_file", str(ROOT / "data" / "gsm8k.jsonl"),
                                             "--batch_sizes", "1,2", "--batches", "1", "--max_new_tokens", "4"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [row.split(" | ")[1] for row in rows] == ["padded", "unpadded", "padded", "unpadded"]
