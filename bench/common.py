"""What the benchmarks share: timing passes of latent_mas with capture off or on."""

from __future__ import annotations

import contextlib
import gc
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.recorder import CaptureRecorder
from latentmas.app.heap import survivors_frozen
from latentmas.app.recording import open_recorder
from latentmas.app.shares import batches
from latentmas.methods import common, get_method


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_seconds(function, replays: int):
    """(seconds per replay, output) of `function()` recorded once in a CUDA graph (after a warm-up on a
    side stream: triton compiles, cuDNN plans, cuBLAS workspaces) and replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays, output


@contextlib.contextmanager
def stop21_sampler():
    """`sampling` as it was before 16-bit sort keys and the cumulative sum in slices (stop 21): top-p
    sorts the float32 logits and takes one scan over the row. For side-by-side timings; compile (or
    record) the sampler inside the block."""
    from latentmas import sampling

    warp = sampling.warp_logits

    def float32_sort(logits, temperature, top_k, top_p, sort_keys=None):
        return warp(logits, temperature, top_k, top_p)

    one_scan = torch.compiler.disable(lambda x: x.cumsum(dim=-1))
    with mock.patch.object(sampling, "warp_logits", float32_sort), \
            mock.patch.object(sampling, "_cumulative_sum", one_scan):
        yield


def top_kernels(prof, rows: int) -> str:
    """A torch profiler's table of its `rows` kernels with the most CUDA time."""
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


KINDS = [  # (kind, pattern on the kernel's name), first match wins
    ("GEMM", r"nvjet|gemm|cutlass.*(?:gemm|Kernel)|splitKreduce|cublas"),
    ("step attention (split-KV)", r"^split_kernel|^combine_kernel"),
    ("fused triton", r"^triton_"),  # before attention: inductor names kernels after the ops they fuse
    ("prefill attention", r"fmha|flash|sdpa|attention|efficient"),
    ("sort (top-p)", r"radix_sort|RadixSort|sort"),
    ("copies", r"[Cc]opy|Memcpy|Memset|cat_|CatArray"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other elementwise / reductions"


def kernel_times(prof, device_type=torch.autograd.DeviceType.CUDA) -> dict[str, tuple[int, float]]:
    """A torch profiler's CUDA kernels (or another device type's events): name -> (calls, self µs)."""
    cuda = device_type == torch.autograd.DeviceType.CUDA
    return {e.key: (e.count, e.self_device_time_total if cuda else e.self_cpu_time_total)
            for e in prof.key_averages() if e.device_type == device_type}


def by_kind(kernels: dict[str, tuple[int, float]]) -> dict[str, float]:
    kinds: dict[str, float] = defaultdict(float)
    for name, (_, us) in kernels.items():
        kinds[kind_of(name)] += us
    return kinds


def log_autotuning(pattern: str) -> None:
    """Print inductor's autotuning timings (its debug log: one line per config tried) for the generated
    kernels whose name contains `pattern`."""
    import logging

    class Kernels(logging.Handler):
        showing = False

        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Benchmark all input configs for "):
                self.showing = pattern in message
            if self.showing:
                print(f"  autotune: {message}", flush=True)
            if message.startswith("Best config for "):  # the last line of a kernel's tuning
                self.showing = False

    log = logging.getLogger("torch._inductor.runtime.triton_heuristics")
    log.setLevel(logging.DEBUG)
    log.propagate = False  # torch's own handlers would print every kernel's debug lines
    log.addHandler(Kernels())


def chosen_configs(pattern: str) -> str:
    """The config each of this process's tuned generated kernels named like `pattern` runs with."""
    import gc

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    lines = [f"  {tuner.fn.__name__}: {', '.join(str(launcher.config) for launcher in tuner.launchers)}"
             for tuner in gc.get_objects() if issubclass(type(tuner), CachingAutotuner)  # (not isinstance:
             and tuner.launchers and pattern in tuner.fn.__name__]  # that asks dead weak proxies, and raises)
    return "\n".join(["kernels named like " + pattern + " run with:", *sorted(lines)])


def peak_bytes(device) -> int:
    """The peak memory so far: torch's peak allocated bytes on CUDA, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_result(script: str, *args: str) -> dict:
    """Run `python script *args` in a fresh process (its peak memory its own) and return the JSON object
    its last output line prints."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rotations(items: list, repeats: int) -> list[list]:
    """Each repeat runs every item once; the order rotates so no item always follows the same one."""
    return [items[r % len(items):] + items[: r % len(items)] for r in range(repeats)]


def machine(lm) -> str:
    import transformers

    gpu = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    return f"{gpu}; torch {torch.__version__}; transformers {transformers.__version__}"


class TimedRecorder(CaptureRecorder):
    """A CaptureRecorder that adds up the wall time of its own calls (device synced around each,
    except `while_decoding`, whose point is to run while the device is busy: its host time only)."""

    seconds = 0.0

    def _timed(self, method, *args):
        sync(self.lm.device)
        start = time.perf_counter()
        method(*args)
        sync(self.lm.device)
        self.seconds += time.perf_counter() - start

    def while_decoding(self):
        start = time.perf_counter()
        work = super().while_decoding()
        self.seconds += time.perf_counter() - start
        return None if work is None else self._timed_pieces(work)

    def _timed_pieces(self, work):
        """`work`'s pieces, each one's host time added up."""
        while True:
            start = time.perf_counter()
            finished = next(work, StopIteration) is StopIteration
            self.seconds += time.perf_counter() - start
            if finished:
                return
            yield

    def on_handoff(self, event):
        self._timed(super().on_handoff, event)

    def write_batch(self, results):
        self._timed(super().write_batch, results)


@dataclass
class Pass:
    """One pass over the problems. Times are seconds per problem."""

    per_problem: float
    peak_mib: float
    judger: float = 0.0  # the judger's prefill + decode
    recorder: float = float("nan")  # inside the recorder (timed passes only)
    decoded_tokens: int = 0
    writing: float = float("nan")  # in `write_batch` (the commit and its fsyncs), capture passes, no added syncs
    gc_seconds: float = 0.0  # in Python's garbage collector (the whole pass, not per problem)
    gc_full: int = 0  # full (oldest-generation) collections in the pass
    gc_longest: float = 0.0  # the longest collection's seconds
    graphs_recorded: int = 0  # CUDA graphs recorded during the pass (steps, prefill chunks)
    compiled_graphs: int = 0  # graphs torch.compile made during the pass

    def notes(self) -> str:
        """What besides solving took time in the pass, where any of it happened: '' or '; gc 0.012 s, ...'."""
        collector = f"gc {self.gc_seconds:.3f} s ({self.gc_full} full, longest {self.gc_longest:.3f} s)"
        parts = [text for text, shown in ((collector, self.gc_seconds >= 0.001),
                                          (f"{self.graphs_recorded} CUDA graphs recorded", self.graphs_recorded),
                                          (f"{self.compiled_graphs} graphs compiled", self.compiled_graphs)) if shown]
        return "; " + ", ".join(parts) if parts else ""


OLDEST_GENERATION = 2  # CPython's collector: generations 0, 1, 2


@contextlib.contextmanager
def garbage_collection_clock():
    """Yields a three-item list that ends up holding, for the block: the seconds Python's garbage collector
    ran, its full (oldest-generation) collections, its longest collection's seconds."""
    seconds, started = [0.0, 0, 0.0], [0.0]

    def clock(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            took = time.perf_counter() - started[0]
            seconds[0] += took
            seconds[1] += info["generation"] == OLDEST_GENERATION
            seconds[2] = max(seconds[2], took)

    gc.callbacks.append(clock)
    try:
        yield seconds
    finally:
        gc.callbacks.remove(clock)


@contextlib.contextmanager
def graph_recordings():
    """Yields a one-item list that ends up holding how many CUDA graphs were recorded inside the block
    (`torch.cuda.CUDAGraph.capture_begin` calls: steps and prefill chunks; always 0 without CUDA)."""
    count = [0]
    graph_class = getattr(torch.cuda, "CUDAGraph", None)
    if graph_class is None or not torch.cuda.is_available():
        yield count
        return
    begin = graph_class.capture_begin

    def counted(self, *args, **kwargs):
        count[0] += 1
        return begin(self, *args, **kwargs)

    with mock.patch.object(graph_class, "capture_begin", counted):
        yield count


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_pass(lm, problems, task, cfg, capture_path: Path | None = None, timed: bool = False) -> Pass:
    """Solve `problems` in batches of cfg.generate_bs, capture on when `capture_path` is set.

    timed: sync around recorder calls and the judger's decode to split the time
    (the syncs cost a little, so timed passes are reported apart from the on/off ratio).
    """
    solve = get_method(cfg.method)
    recorder_class = TimedRecorder if timed else CaptureRecorder
    recorder = (open_recorder(capture_path, cfg, lm, overwrite=True, recorder_class=recorder_class)
                if capture_path else None)
    judger_seconds = [0.0]
    original_generate = common.generate

    def timed_generate(*args, **kwargs):
        sync(lm.device)
        start = time.perf_counter()
        out = original_generate(*args, **kwargs)
        sync(lm.device)
        judger_seconds[0] += time.perf_counter() - start
        return out

    compiled_before = _compiled_graphs()
    with (mock.patch.object(common, "generate", timed_generate) if timed else contextlib.nullcontext(),
          garbage_collection_clock() as gc_seconds, graph_recordings() as recorded):
        sync(lm.device)
        if lm.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(lm.device)
        start = time.perf_counter()
        decoded, writing = 0, 0.0
        for batch in batches(problems, cfg.generate_bs, cfg.batch_order):  # as the run loop batches them
            results = solve(lm, batch, task, cfg, observer=recorder)
            decoded += sum(r.generated_tokens for r in results)
            if recorder is not None:
                written = time.perf_counter()
                recorder.write_batch(results)
                writing += time.perf_counter() - written
        sync(lm.device)
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(lm.device) / 2**20 if lm.device.type == "cuda" else float("nan")
    inside = getattr(recorder, "seconds", float("nan"))
    if recorder is not None:
        recorder.close()
    n = len(problems)
    return Pass(elapsed / n, peak, judger_seconds[0] / n, inside / n, decoded,
                writing / n if recorder is not None else float("nan"), *gc_seconds, recorded[0],
                _compiled_graphs() - compiled_before)


def prefill_kind(compiled: bool, eager: bool, batch: int) -> str:
    """How the benches' prompt prefills of `batch` rows run: "graphed" (chunks, where nothing hooks the
    model and `batch` is at most `graph_prefill.BATCH_LIMIT`, unless `eager`), else "compiled" (layers) or
    "eager"."""
    from latentmas.graph_prefill import BATCH_LIMIT

    if not eager and batch <= BATCH_LIMIT:
        return "graphed"
    return "compiled" if compiled else "eager"


def speed_config(**settings):
    """The speed benchmark's `RunConfig`: latent_mas, latent_steps 10, EOS ignored, temperature 0.6,
    top_p 0.95, then `settings` (model, data, batch size, max_new_tokens, similarity, ...)."""
    from latentmas.config import RunConfig

    return RunConfig(**{**dict(latent_steps=10, ignore_eos=True, temperature=0.6, top_p=0.95), **settings})


def alternating_passes(lm, problems, task, variants: dict, repeats: int, show_rounds: bool = False) -> dict:
    """`variants` name -> (cfg, capture path or None): one warm-up pass each (kernels, graphs, the
    allocator, file creation); what is alive then is frozen out of the garbage collector, as the run
    loop does after its first batch (`latentmas.app.heap`); then `repeats` rounds that run every variant
    once in rotating order, so drift hits all of them. Returns name -> [Pass per round]."""
    for cfg, path in variants.values():
        run_pass(lm, problems, task, cfg, path)
    passes = {name: [] for name in variants}
    with survivors_frozen() as freeze:  # as the run loop does after its first batch
        tracked, frozen_before = len(gc.get_objects()), gc.get_freeze_count()
        full = freeze()
        started = time.perf_counter()
        gc.collect()
        state = "frozen (latentmas.app.heap)" + (f"; the process had frozen {frozen_before:,} objects before it, "
                                                 "which stay frozen" if frozen_before else "")
        print(f"  heap after the warm-up: {tracked:,} objects tracked, a full collection {full:.3f} s; {state}, "
              f"a full collection {time.perf_counter() - started:.3f} s", flush=True)
        for r, order in enumerate(rotations(list(variants), repeats)):
            for name in order:
                result = run_pass(lm, problems, task, *variants[name])
                passes[name].append(result)
                if show_rounds:
                    print(f"  round {r + 1} {name!s:9s}: {result.per_problem:.3f} s/problem, "
                          f"peak {result.peak_mib:.0f} MiB", flush=True)
    return passes
