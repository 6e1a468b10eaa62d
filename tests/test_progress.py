"""Rank 0's progress bar: problems and accuracy from the results parts, and the capture's size on disk."""

from __future__ import annotations

import json

from latentmas.app.progress import Progress, format_size


class _Bar:
    def __init__(self):
        self.n, self.postfix = 0, None

    def update(self, n):
        self.n += n

    def set_postfix(self, postfix):
        self.postfix = postfix

    def close(self):
        pass


def test_progress_counts_parts_and_sizes_the_capture_and_its_shards(tmp_path):
    part = tmp_path / "results.rank-0.jsonl"
    part.write_text("".join(json.dumps({"number": n, "correct": n == 1}) + "\n" for n in (1, 2)) + '{"torn')
    capture = tmp_path / "run.h5"
    capture.write_bytes(b"x" * 3000)  # one process writes the capture file itself
    shards = tmp_path / "run.h5.shards"
    shards.mkdir()
    (shards / "rank-1.h5").write_bytes(b"y" * 2000)
    bar = _Bar()
    progress = Progress(bar, [part], {}, capture)
    progress.close()
    assert bar.n == 2 and progress.correct == 1  # the torn last line is not counted yet
    assert bar.postfix == {"acc": "0.50", "capture": format_size(5000)} and format_size(5000) == "4.9KB"
