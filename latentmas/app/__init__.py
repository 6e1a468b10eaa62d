"""The application layer: the one place that wires the system (`latentmas`), `capture` and `render`.

- `cli.py`: the `latentmas` command (and `python run.py`), options from `options.py`;
- `run.py`: one run path, from one process to many (torchrun): batches, resume, capture;
- `results.py`: `results.jsonl` and its per-rank parts; `summary.py`: `summary.json`;
- `recording.py`: what a capture records about its run; `progress.py`: the progress bar;
- `distributed.py`: the ranks of a torchrun launch.

Nothing in `latentmas` outside this package imports `capture` or `render`.
"""
