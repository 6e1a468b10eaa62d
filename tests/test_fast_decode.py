"""The fast decode path (static KV buffer; a CUDA graph on GPUs) decodes what the plain loop decodes."""

from __future__ import annotations

import pytest

from capture.format import CaptureReader
from capture.recorder import CaptureRecorder
from latentmas.config import RunConfig
from latentmas.methods import get_method
from latentmas.tasks import get_task


def _solve(lm, problems, method, tmp_path, batch_size, **settings):
    cfg = RunConfig(model_name="tiny-qwen3", device="cpu", latent_steps=3, max_new_tokens=24, **settings)
    task = get_task("gsm8k")
    path = tmp_path / f"{method}-{settings.get('fast_decode')}-{batch_size}.h5"
    recorder = CaptureRecorder.open(path, cfg, lm, overwrite=True) if method == "latent_mas" else None
    results = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        batch_results = get_method(method)(lm, batch, task, cfg, observer=recorder)
        if recorder is not None:
            recorder.write_batch(batch_results)
        results += batch_results
    if recorder is not None:
        recorder.close()
    return results, path


@pytest.mark.parametrize("method", ["latent_mas", "baseline"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_fast_decode_matches_plain(tiny_lm, fake_problems, tmp_path, method, temperature, batch_size):
    problems = fake_problems()
    plain, plain_file = _solve(tiny_lm, problems, method, tmp_path, batch_size, fast_decode=False,
                               temperature=temperature)
    fast, fast_file = _solve(tiny_lm, problems, method, tmp_path, batch_size, fast_decode=True,
                             temperature=temperature)
    assert [r.output for r in fast] == [r.output for r in plain]
    assert all(r.agents[-1].output_tokens > 0 for r in fast)
    if method == "latent_mas":
        with CaptureReader(plain_file) as a, CaptureReader(fast_file) as b:
            for number in a.problem_numbers:
                for ha, hb in zip(a.handoffs(number), b.handoffs(number)):
                    assert (ha.layer_similarities == hb.layer_similarities).all()
                    assert ha.tokens == hb.tokens

