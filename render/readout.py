"""`latentmas readout`: every latent step's readout in a capture, as a table (terminal or CSV).

A latent step's readout is the model's own next-token distribution at that step (the LM head on
the hidden state the step fed back): its top tokens with probabilities and its entropy. Each
agent's steps appear in several hand-offs with the same readout; a step is listed once, from
the first hand-off that holds it (kNN trims may drop a step from every hand-off).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import click

from capture.text import one_line

from .info import safe


@dataclass
class LatentStep:
    """One latent step of one agent of one problem; tokens/probs most likely first."""

    problem: int
    agent: str
    step: int
    tokens: list[str]
    probs: list[float]
    entropy: float
    realign_cosine: float
    realign_token: str


def latent_steps(reader, number: int) -> list[LatentStep]:
    """Every latent step of problem `number` with a readout, in run order (agents as they ran, then steps)."""
    seen: dict[tuple[str, int], LatentStep] = {}
    for handoff in reader.handoffs(number):
        readout = handoff.readout
        if readout is None:
            return []
        for segment in handoff.segments:
            if segment.kind != "latent":
                continue
            for column in range(segment.start, segment.stop):
                if not readout.has[column]:
                    continue
                key = (segment.agent, int(readout.step[column]))
                if key not in seen:
                    seen[key] = LatentStep(number, segment.agent, key[1], list(readout.tokens[column]),
                                           [float(p) for p in readout.probs[column]], float(readout.entropy[column]),
                                           float(readout.realign_cosine[column]), readout.realign_token[column])
    order = list(dict.fromkeys(agent for agent, _ in seen))
    return sorted(seen.values(), key=lambda s: (order.index(s.agent), s.step))


def readout_lines(steps: list[LatentStep]) -> list[str]:
    """One line per agent: 'planner latent: 18 → 17 → + → ...' (each step's top token)."""
    agents = list(dict.fromkeys(s.agent for s in steps))
    return [f"{safe(agent, 30)} latent: " + " → ".join(_token(s.tokens[0]) for s in steps if s.agent == agent)
            for agent in agents]


def _token(text: str) -> str:
    """A token as plain text on one line: unprintable characters escaped (`\\n`), quoted when it has
    leading or trailing spaces (or is empty), cut to 24 characters."""
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    if len(shown) > 24:
        shown = shown[:23] + "…"
    return f'"{shown}"' if shown != shown.strip() or not shown else shown


def _table(steps: list[LatentStep], top: int) -> str:
    realigned = any(s.realign_token for s in steps)
    head = f"{'problem':>7}  {'agent':<10} {'step':>4}  {'entropy':>7}  top tokens (probability)"
    lines = [head + ("  nearest embedding (cosine)" if realigned else "")]
    for s in steps:
        tops = "  ".join(f"{_token(t)} ({p:.3f})" for t, p in list(zip(s.tokens, s.probs))[:top])
        line = f"{s.problem:>7}  {safe(s.agent, 10):<10} {s.step:>4}  {s.entropy:>7.3f}  {tops}"
        if realigned:
            line += f"  {_token(s.realign_token)} ({s.realign_cosine:.3f})"
        lines.append(line)
    return "\n".join(lines)


def write_csv(steps: list[LatentStep], path: Path, top_k: int) -> None:
    """Columns: problem, agent, step, entropy, token_1, prob_1, ..., token_k, prob_k, realign_token, realign_cosine."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["problem", "agent", "step", "entropy",
                      *[f"{name}_{i}" for i in range(1, top_k + 1) for name in ("token", "prob")],
                      "realign_token", "realign_cosine"])
        for s in steps:
            pairs = [v for t, p in zip(s.tokens, s.probs) for v in (t, f"{p:.6g}")]
            cosine = "" if s.realign_cosine != s.realign_cosine else f"{s.realign_cosine:.6g}"
            out.writerow([s.problem, s.agent, s.step, f"{s.entropy:.6g}", *pairs, s.realign_token, cosine])


@click.command("readout")
@click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--problems", default=None, metavar="SPEC", help="Problems to list, e.g. 1-5,8 (default: all).")
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as CSV to this file (every top-k token).")
@click.option("--top", default=3, show_default=True, type=click.IntRange(min=1),
              help="Top tokens shown per step in the terminal.")
def readout_command(capture, problems, csv_file, top):
    """Every latent step's readout: problem, agent, step, entropy, top tokens with their probabilities."""
    from capture.format import CaptureError, CaptureReader
    from capture.selection import parse_problem_spec

    try:
        with CaptureReader(capture) as reader:
            if not reader.readout_top_k:
                raise click.ClickException(f"{safe(capture)} has no latent readout (captured with "
                                           "--readout_top_k 0, or before the readout existed)")
            wanted = parse_problem_spec(problems)
            numbers = [n for n in reader.problem_numbers if wanted is None or n in wanted]
            missing = sorted(wanted - set(numbers)) if wanted else []
            if missing:
                raise click.ClickException(f"{safe(capture)} has no problem {missing[0]}")
            steps = [s for number in numbers for s in latent_steps(reader, number)]
            top_k = reader.readout_top_k
    except CaptureError as error:
        raise click.ClickException(safe(error)) from None
    except ValueError as error:
        raise click.ClickException(safe(one_line(error))) from None
    if csv_file is not None:
        try:
            write_csv(steps, csv_file, top_k)
        except OSError as error:
            raise click.ClickException(f"cannot write {safe(csv_file)}: {error.strerror or error}") from None
    click.echo(_table(steps, top) if steps else "(no latent steps with a readout)")
