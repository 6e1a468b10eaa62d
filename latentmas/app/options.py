"""Command-line options, declared once: the run settings come from `RunConfig`'s fields.

Each option keeps the seed's spelling (`--max_samples`) and also accepts the dashed one
(`--max-samples`); help shows one. Choices that come from a registry (similarity modes,
methods, tasks) are read when needed, so a mode registered later is offered too.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable

import click
import cloup

from ..config import GROUPS, RunConfig

GROUP_TITLES = {"model": "Model", "method": "Method", "kNN": "kNN filtering", "capture": "Capture",
                "output": "Output", "benchmark-only": "Benchmark-only"}


class OneSpelling(cloup.Option):
    """An option with several spellings whose help shows only the first of each switch."""

    def get_help_record(self, ctx):
        opts, secondary = self.opts, self.secondary_opts
        self.opts, self.secondary_opts = opts[:1], secondary[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = opts, secondary


class RegistryChoice(click.Choice):
    """A `click.Choice` whose names come from a registry function each time they are needed."""

    def __init__(self, names: Callable[[], tuple[str, ...]]):  # no super().__init__: `choices` is computed
        self._names = names
        self.case_sensitive = True

    @property
    def choices(self):
        try:
            return tuple(self._names())
        except ModuleNotFoundError as error:
            raise click.ClickException(missing_stack_message(error)) from None


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite (no nan, no inf)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def missing_stack_message(error: ModuleNotFoundError) -> str:
    return (f"this command runs models and needs {error.name or 'torch'}, which is not installed: "
            'pip install "latentmas[capture]" (render, info, analyze and view work without it)')


def option(*names: str, **kwargs) -> Callable:
    """An option spelled as in the seed (`--model_name`) that also accepts `--model-name`."""
    spellings = []
    for name in names:
        if not name.startswith("-"):  # the parameter's name
            spellings.append(name)
            continue
        switches = name.split("/")
        spellings.append("/".join(switches))
        if any("_" in s for s in switches):
            spellings.append("/".join(s.replace("_", "-") for s in switches))
    return cloup.option(*spellings, cls=OneSpelling, **kwargs)


def _click_type(field: dataclasses.Field, hint):
    meta = field.metadata
    if meta["choices"] is not None:
        choices = meta["choices"]
        return RegistryChoice(choices) if callable(choices) else click.Choice(choices)
    if meta["path"]:
        return click.Path(exists=True, dir_okay=False)
    base = {int, float, str, bool} & set(typing.get_args(hint) or (hint,))
    kind = next(iter(base)) if len(base) == 1 else str
    if kind is int:
        bounded = meta["minimum"] is not None or meta["maximum"] is not None
        return click.IntRange(min=meta["minimum"], max=meta["maximum"]) if bounded else click.INT
    if kind is float:
        return FiniteFloat(min=meta["minimum"], max=meta["maximum"], min_open=meta["open_min"])
    return None


def setting_option(field: dataclasses.Field, hint) -> Callable:
    """The click option of one `RunConfig` field."""
    meta = field.metadata
    if meta["negative"]:
        return option(f"--{field.name}/--{meta['negative']}", field.name, default=field.default, help=meta["help"])
    if field.default is False:
        return option(f"--{field.name}", is_flag=True, help=meta["help"])
    kwargs = dict(default=field.default, help=meta["help"], show_default=field.default is not None)
    click_type = _click_type(field, hint)
    if click_type is not None:
        kwargs["type"] = click_type
    return option(f"--{field.name}", **kwargs)


def run_settings(exclude: tuple[str, ...] = (), override: dict[str, Callable] | None = None) -> dict[str, list]:
    """The options of every `RunConfig` field, by group (`exclude`: fields to leave out; `override`:
    field name -> an option to use instead)."""
    hints = typing.get_type_hints(RunConfig)
    groups: dict[str, list] = {g: [] for g in GROUPS}
    for field in dataclasses.fields(RunConfig):
        if not field.metadata.get("cli", True) or field.name in exclude:
            continue
        made = (override or {}).get(field.name) or setting_option(field, hints[field.name])
        groups[field.metadata["group"]].append(made)
    return groups


def apply_groups(groups: dict[str, list]) -> Callable:
    """Decorate a cloup command with the options of `groups`, one titled section each."""
    def decorate(command):
        for group in reversed(GROUPS):
            if groups.get(group):
                command = cloup.option_group(GROUP_TITLES[group], *groups[group])(command)
        return command
    return decorate
