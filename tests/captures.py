"""Capture files in tests: solving problems into one, and comparing two.

Imported by the test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np

from capture.format import CaptureReader
from capture.recorder import CaptureRecorder
from latentmas.app.recording import open_recorder


class StageAtTheEnd(CaptureRecorder):
    """Writes the hand-offs in write_batch, as if the judger never called while_decoding."""

    def while_decoding(self):
        pass


def tiny_config(**overrides):
    """A `RunConfig` for tiny-qwen3 on the CPU, greedy, short: max_new_tokens 8, latent_steps 3."""
    from latentmas.config import RunConfig

    settings = dict(model_name="tiny-qwen3", device="cpu", max_new_tokens=8, temperature=0.0, latent_steps=3)
    return RunConfig(**{**settings, **overrides})


def solve_and_capture(lm, problems, cfg, path=None, batch_size: int = 1, recorder_class=CaptureRecorder,
                      **open_args) -> list:
    """Solve `problems` with `cfg.method` in batches of `batch_size` and return the results. With
    `path`, capture them there: `open_recorder(path, cfg, lm, overwrite=True, **open_args)`,
    one `write_batch` per batch, then finished (summary {"done": True}) and closed."""
    from latentmas.methods import get_method
    from latentmas.tasks import get_task

    solve, task = get_method(cfg.method), get_task(cfg.task)
    recorder = (open_recorder(path, cfg, lm, overwrite=True, recorder_class=recorder_class, **open_args)
                if path is not None else None)
    results = []
    for start in range(0, len(problems), batch_size):
        batch = solve(lm, problems[start:start + batch_size], task, cfg, observer=recorder)
        if recorder is not None:
            recorder.write_batch(batch)
        results += batch
    if recorder is not None:
        recorder.finish({"done": True})
        recorder.close()
    return results


def assert_same_handoffs(a_path, b_path, *, atol: float = 0.0, names=None) -> None:
    """Both captures hold the same problems with the same hand-offs: names (`names`, when given, for
    every problem), tokens, positions and segments equal, matrices equal to `atol`."""
    with CaptureReader(a_path) as a, CaptureReader(b_path) as b:
        assert a.problem_numbers == b.problem_numbers and a.problem_numbers
        for number in a.problem_numbers:
            got, want = list(a.handoffs(number)), list(b.handoffs(number))
            assert [h.name for h in got] == [h.name for h in want]
            if names is not None:
                assert [h.name for h in got] == list(names)
            for ha, hb in zip(got, want):
                assert ha.tokens == hb.tokens and ha.segments == hb.segments
                np.testing.assert_array_equal(ha.positions, hb.positions)
                np.testing.assert_allclose(ha.layer_similarities.astype(np.float32),
                                           hb.layer_similarities.astype(np.float32), atol=atol, rtol=0)
