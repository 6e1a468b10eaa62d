"""Comparing two capture files in tests (imported by the test modules; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np

from capture.format import CaptureReader


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
