"""Render every figure of a capture file: planning, file names, parallel workers, progress.

The unit of work is one problem (its selected hand-offs, each drawn as a multi-layer
heatmap and/or a single-layer strip). Each worker process opens the capture itself, so
only small, picklable task descriptions cross process boundaries; workers are started
with the 'spawn' method (safe with h5py, and the same on every OS).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from capture.format import CaptureError, CaptureReader, Handoff, number_ranges
from capture.selection import parse_problem_spec, parse_transitions
from capture.text import one_line

from .colormaps import DEFAULT_SINGLE_CMAP, ModeScale, UnknownColormap, as_mode_scale, check_cmap
from .figures import DEFAULT_DPI, X_AXES, pretty_handoff, save_figure
from .kinds import get_kind, kind_names
from .layout import max_labelled_tokens
from .output_files import unwritable_reason, write_atomically

KINDS = ("multi", "single")  # the seed's two figures, drawn by default
FORMATS = ("png", "svg", "pdf")

__all__ = ["render_capture", "RenderError", "RenderOptions", "figure_filename", "build_figure"]


class RenderError(CaptureError):
    """A render that cannot go on, or figures that failed; the message is one line.

    written: the figures that were written before (or despite) the error.
    """

    def __init__(self, message: str, written: Sequence[Path] = ()):
        super().__init__(message)
        self.written = list(written)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "unnamed"


def figure_filename(kind: str, handoff: str, problem: int, fmt: str = "png", occurrence: int = 1,
                    tag: str = "") -> str:
    """File name of one figure, as in the reference: 'heatmap_planner_to_critic_problem3.png'.

    The kind's prefix starts it (kind 'single': 'heatmap_singlelayer_planner_to_critic_problem3.png').
    A hand-off that occurs again in the same problem gets '_2', '_3', ... after the problem number.
    `tag` (if any) follows the hand-off's name, '-' first (`problem_filenames` uses it for names that clash).
    """
    prefix = get_kind(kind).prefix
    suffix = f"_{occurrence}" if occurrence > 1 else ""
    label = _safe(handoff) + (f"-{tag}" if tag else "")
    return f"{prefix}{label}_problem{int(problem)}{suffix}.{fmt}"


def problem_filenames(names: Sequence[str], problem: int, fmt: str) -> dict[tuple[int, str], str]:
    """(hand-off index, kind) -> file name, for every hand-off `names` of one problem and every registered
    kind, no two the same even on a file system that ignores case.

    Agent names are sanitised for file names ('a/b' and 'a b' both become 'a-b'), and a kind's prefix can
    meet an agent's name ('heatmap_' + 'singlelayer_x' = 'heatmap_singlelayer_' + 'x'). A name the
    sanitiser leaves alone keeps the reference name (`figure_filename`); a clashing one gets its hand-off
    name's digest as a tag. Only the problem's own hand-offs are looked at, never which are selected, so a
    figure's name does not change with --transitions or --kind (names of other problems cannot clash:
    each ends in its problem number).
    """
    occurrences: dict[str, int] = {}
    entries = []
    for index, name in enumerate(names):
        occurrences[name] = occurrences.get(name, 0) + 1
        entries += [(index, name, occurrences[name], kind) for kind in kind_names()]
    taken: set[str] = set()
    files: dict[tuple[int, str], str] = {}
    for index, name, occurrence, kind in sorted(entries, key=lambda e: _safe(e[1]) != e[1]):  # stable sort
        file = figure_filename(kind, name, problem, fmt, occurrence)
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        attempt = 1
        while file.casefold() in taken:
            attempt += 1
            tag = digest if attempt == 2 else f"{digest}-{attempt}"
            file = figure_filename(kind, name, problem, fmt, occurrence, tag)
        taken.add(file.casefold())
        files[index, kind] = file
    return files


# -- tasks -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderOptions:
    """How figures are drawn and written (picklable, sent to workers)."""

    kinds: tuple[str, ...] = KINDS
    cmaps: tuple[tuple[str, str], ...] = ()  # (kind, colormap) pairs; a kind not named draws its default
    vmin: float | None = None
    vmax: float | None = None
    dpi: float = DEFAULT_DPI
    fmt: str = "png"
    token_labels: bool = False
    x_axis: str = "column"  # x tick labels: "column" numbers or original cache "position"s

    def cmap(self, kind: str) -> str | None:
        return dict(self.cmaps).get(kind)


@dataclass(frozen=True)
class Task:
    """One problem of one capture: hand-offs (index within the problem, name, occurrence) to draw, and
    for each its file names (one per kind of `options.kinds`)."""

    capture: Path
    problem: int
    handoffs: tuple[tuple[int, str, int], ...]
    out_dir: Path
    options: RenderOptions
    mode: ModeScale
    notes: tuple[str, ...] = ()
    files: tuple[tuple[str, ...], ...] = ()

    @property
    def num_figures(self) -> int:
        return len(self.handoffs) * len(self.options.kinds)


@dataclass
class TaskResult:
    written: list[Path] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def plan_tasks(reader: CaptureReader, out_dir: Path, options: RenderOptions, problems: set[int] | None = None,
               transitions: Sequence[str] | None = None) -> tuple[list[Task], list[str]]:
    """The tasks for the selected problems and hand-offs, and warnings about what was asked but absent."""
    attrs = reader.attrs
    mode = ModeScale.of(attrs)
    model = str(attrs.get("model_name") or "")
    notes = (f"model: {model}",) if model else ()
    numbers = reader.problem_numbers
    warnings: list[str] = []
    if problems is not None:
        missing = sorted(problems - set(numbers))
        if missing:
            warnings.append(f"{reader.path}: no problem {number_ranges(missing)} "
                            f"(it holds {number_ranges(numbers) if numbers else 'no problems yet'})")
        numbers = [n for n in numbers if n in problems]
    wanted = set(transitions) if transitions is not None else None
    seen_names: set[str] = set()
    tasks = []
    for number in numbers:
        names = reader.problem(number).handoff_names
        seen_names.update(names)
        counts: dict[str, int] = {}
        chosen = []
        for index, name in enumerate(names):
            counts[name] = counts.get(name, 0) + 1
            if wanted is None or name in wanted:
                chosen.append((index, name, counts[name]))
        if chosen:
            named = problem_filenames(names, number, options.fmt)
            files = tuple(tuple(named[index, kind] for kind in options.kinds) for index, _, _ in chosen)
            tasks.append(Task(reader.path, number, tuple(chosen), out_dir, options, mode, notes, files))
    if wanted is not None and numbers:
        absent = sorted(wanted - seen_names)
        if absent and len(absent) == len(wanted):
            close = difflib.get_close_matches(absent[0], sorted(seen_names), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RenderError(f"{reader.path} has no hand-off {', '.join(absent)}{hint} "
                              f"(it has {', '.join(sorted(seen_names)) or 'none'})")
        if absent:
            warnings.append(f"{reader.path}: no hand-off {', '.join(absent)} in the selected problems")
    return tasks, warnings


# -- drawing one hand-off ---------------------------------------------------------------------

def _write(fig, path: Path, options: RenderOptions) -> None:
    """Write the figure through a temporary file of its own (`output_files.write_atomically`)."""
    write_atomically(path, lambda tmp: save_figure(fig, tmp, options.fmt, options.dpi))


def build_figure(kind: str, handoff: Handoff, problem: int, options: RenderOptions,
                 mode: ModeScale | str | None = None, occurrence: int = 1, notes: Sequence[str] = ()):
    """The Figure of one kind (a registered name, e.g. 'multi') for one hand-off, exactly as the batch writes it."""
    heading = f"{pretty_handoff(handoff.from_agent, handoff.to_agent)} · problem {problem}"
    if occurrence > 1:
        heading += f" (#{occurrence})"
    return get_kind(kind).draw(handoff, title=heading, mode=as_mode_scale(mode), cmap=options.cmap(kind),
                               options=options, notes=notes)


def render_handoff(handoff: Handoff, problem: int, out_dir: Path, options: RenderOptions,
                   mode: ModeScale | str | None = None,
                   occurrence: int = 1, notes: Sequence[str] = (),
                   on_figure: Callable[[], None] | None = None, files: Sequence[str] = ()) -> TaskResult:
    """Draw and write the figures of one hand-off (the kinds in `options`; `files`: their file names,
    default `figure_filename`'s)."""
    result = TaskResult()
    width = handoff.num_columns
    if options.token_labels and width > max_labelled_tokens():
        result.notices.append(f"token labels: T = {width} > {max_labelled_tokens()}")
    for i, kind in enumerate(options.kinds):
        file = files[i] if files else figure_filename(kind, handoff.name, problem, options.fmt, occurrence)
        path = out_dir / file
        fig = build_figure(kind, handoff, problem, options, mode, occurrence, notes)
        _write(fig, path, options)
        result.written.append(path)
        if on_figure is not None:
            on_figure()
    return result


def render_task(task: Task, reader: CaptureReader | None = None,
                on_figure: Callable[[], None] | None = None) -> TaskResult:
    """Draw one problem's figures; errors come back as one-line messages, never raised.

    Opens the capture itself unless an open `reader` is given (workers open their own).
    """
    result = TaskResult()
    own = reader is None
    try:
        if own:
            reader = CaptureReader(task.capture)
    except CaptureError as error:
        result.errors.append(str(error))
        return result
    try:
        # only the wanted matrices are read, in the task's (run) order
        handoffs = reader.handoffs(task.problem, [index for index, _, _ in task.handoffs])
        for position, (_, name, occurrence) in enumerate(task.handoffs):
            try:
                handoff = next(handoffs)
            except (OSError, KeyError, ValueError, CaptureError) as error:
                result.errors.append(f"{task.capture}: problem {task.problem} could not be read ({one_line(error)})")
                break
            try:
                part = render_handoff(handoff, task.problem, task.out_dir, task.options, task.mode, occurrence,
                                      task.notes, on_figure, task.files[position] if task.files else ())
            except Exception as error:  # noqa: BLE001 - one bad figure must not stop the others
                result.errors.append(f"problem {task.problem} {name}: {type(error).__name__}: {one_line(error)}")
                continue
            result.written += part.written
            result.notices += part.notices
    finally:
        if own:
            reader.close()
    return result


# -- a whole capture -----------------------------------------------------------------------------

def _stderr(message: str) -> None:
    from tqdm import tqdm
    tqdm.write(message, file=sys.stderr)


def check_options(kinds: Sequence[str], cmaps: dict[str, str], vmin: float | None,
                  vmax: float | None, dpi: float, fmt: str, jobs: int, x_axis: str = "column") -> None:
    """Raise RenderError (one line) for options that cannot work."""
    bad_kinds = [k for k in kinds if k not in kind_names()]
    if bad_kinds or not kinds:
        raise RenderError(f"unknown figure kind {', '.join(bad_kinds) or '(none)'}; use {', '.join(kind_names())}")
    if fmt not in FORMATS:
        raise RenderError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        for name in cmaps.values():
            check_cmap(name)
    except UnknownColormap as error:
        raise RenderError(str(error)) from None
    for name, value in (("vmin", vmin), ("vmax", vmax)):
        if value is not None and not math.isfinite(value):
            raise RenderError(f"{name} must be a finite number, got {value}")
    if vmin is not None and vmax is not None and not vmin < vmax:
        raise RenderError(f"vmin ({vmin:g}) must be below vmax ({vmax:g})")
    if not (10 <= dpi <= 600):
        raise RenderError(f"dpi {dpi:g} is out of range (10 to 600)")
    if jobs < 0:
        raise RenderError("jobs must be 0 (all cores) or more")
    if x_axis not in X_AXES:
        raise RenderError(f"unknown x axis {x_axis!r}; use one of {', '.join(X_AXES)}")


def _check_writable(out_dir: Path) -> None:
    """Make `out_dir` and create (and drop) a file in it, or raise RenderError (one line): before any
    figure is drawn, not once per figure."""
    reason = unwritable_reason(out_dir)
    if reason is not None:
        raise RenderError(f"cannot write to output folder {out_dir}: {reason}")


def render_capture(
    path: str | os.PathLike,
    out_dir: str | os.PathLike = "charts",
    kinds: Sequence[str] = KINDS,
    problems: str | Iterable[int] | None = None,
    transitions: str | Iterable[str] | None = None,
    cmap: str | None = None,
    single_cmap: str = DEFAULT_SINGLE_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    dpi: float = DEFAULT_DPI,
    fmt: str = "png",
    jobs: int = 1,
    token_labels: bool = False,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    cmaps: dict[str, str] | None = None,
    x_axis: str = "column",
) -> list[Path]:
    """Render the figures of one capture file into `out_dir`; returns the paths written.

    kinds: registered figure kinds (`render.kinds`): 'multi' (all layers, `cmap` on vmin..vmax,
           by default the mode's own scale, e.g. RdYlGn on -1..1 for cosine modes), 'single'
           (middle layer, min-max normalised, `single_cmap`), ...
    cmaps: kind -> colormap for any kind (`cmap` and `single_cmap` are those of multi and single).
    problems: numbers or a spec like '1-5,9' (None: all committed problems).
    transitions: hand-off names like 'planner_to_critic' (None: all present).
    jobs: worker processes (1: in this process; 0: one per core).
    warn: called with one-line warnings (default: printed to stderr).
    x_axis: "column" (x ticks count the hand-off's columns) or "position" (labelled with the original
            cache positions at those columns, which after kNN filtering have gaps).

    Raises CaptureError (unreadable capture) or RenderError (bad options, or some figures
    failed; `.written` lists those that did not), each with a one-line message.
    """
    warn = warn or _stderr
    kinds = tuple(kinds)
    chosen = {"single": single_cmap} | ({"multi": cmap} if cmap else {}) | dict(cmaps or {})
    check_options(kinds, chosen, vmin, vmax, dpi, fmt, jobs, x_axis)
    try:
        wanted_problems = parse_problem_spec(problems)
        wanted_transitions = parse_transitions(transitions)
    except ValueError as error:
        raise RenderError(str(error)) from None
    options = RenderOptions(kinds, tuple(sorted(chosen.items())), vmin, vmax, dpi, fmt, token_labels, x_axis)
    out_dir = Path(out_dir)
    with CaptureReader(path) as reader:
        try:
            tasks, warnings = plan_tasks(reader, out_dir, options, wanted_problems, wanted_transitions)
        except (OSError, KeyError) as error:
            raise RenderError(f"{path} could not be read ({one_line(error)})") from None
        for line in warnings:
            warn(f"warning: {line}")
        if not tasks:
            if not reader.problem_numbers:
                warn(f"warning: {path} has no committed problems yet; nothing to render")
                return []
            raise RenderError(f"nothing to render in {path}: no problem matches --problems "
                              f"(it holds {number_ranges(reader.problem_numbers)})")
        _check_writable(out_dir)
        total = sum(t.num_figures for t in tasks)
        workers = min(jobs or os.cpu_count() or 1, len(tasks))
        results = _run(tasks, reader if workers <= 1 else None, workers, total, progress, Path(path).name)
    written = [p for r in results for p in r.written]
    skipped = [n for r in results for n in r.notices]
    if skipped:
        warn(f"note: --token-labels: token strings fit only up to T = {max_labelled_tokens()}; "
             f"{len(skipped)} hand-offs have more tokens and show column numbers instead")
    errors = [e for r in results for e in r.errors]
    if errors:
        failed = sum(1 for r in results if r.errors)
        more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise RenderError(f"{failed} of {len(tasks)} problems could not be fully rendered: {errors[0]}{more}",
                          written)
    return written


def _run(tasks: list[Task], reader: CaptureReader | None, workers: int, total: int, progress: bool,
         label: str) -> list[TaskResult]:
    from tqdm import tqdm

    with tqdm(total=total, unit="fig", desc=label, file=sys.stderr, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        if workers <= 1:
            return [render_task(task, reader, on_figure=lambda: bar.update(1)) for task in tasks]
        results: list[TaskResult | None] = [None] * len(tasks)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(render_task, task): i for i, task in enumerate(tasks)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except Exception as error:  # noqa: BLE001 - a worker that died (e.g. killed for memory)
                        results[i] = TaskResult(errors=[f"problem {tasks[i].problem}: worker failed "
                                                        f"({type(error).__name__}: {one_line(error)})"])
                    bar.update(tasks[i].num_figures)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return [r for r in results if r is not None]
