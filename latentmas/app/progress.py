"""Rank 0's progress bar over a whole run, from every rank's results part."""

from __future__ import annotations

import json
import threading
from pathlib import Path


class Progress:
    """Rank 0's bar over the whole run: it tails every rank's results part (one JSON line per
    finished problem), after each of its own batches and once a second from a thread, so
    no rank ever waits for it."""

    def __init__(self, bar, files: list[Path], offsets: dict[str, int], capture_file: Path | None):
        self.bar = bar
        self.files = files
        self.offsets = {f: offsets.get(f.name, 0) for f in files}
        self.capture_file = capture_file
        self.solved = self.correct = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latentmas-progress", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(1.0):
            self.poll()

    def poll(self) -> None:
        with self._lock:
            new = 0
            for path in self.files:
                try:
                    with open(path, "rb") as f:
                        f.seek(self.offsets[path])
                        chunk = f.read()
                except OSError:
                    continue
                end = chunk.rfind(b"\n") + 1
                for line in chunk[:end].splitlines():
                    new += 1
                    try:
                        self.correct += bool(json.loads(line)["correct"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn or foreign line counts as not correct
                self.offsets[path] += end
            if not new:
                return
            self.solved += new
            self.bar.update(new)
            postfix = {"acc": f"{self.correct / self.solved:.2f}"}
            if self.capture_file is not None:
                from capture.merge import sources

                total = sum(p.stat().st_size for p in sources(self.capture_file) if p.exists())
                postfix["capture"] = format_size(total)
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()



def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return "?"
