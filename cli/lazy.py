"""Command groups whose commands are imported when they are used, so that a command starts with only what it
needs: `secateurs jobs list` never imports torch (which `secateurs prune` and the workers need, and which
takes seconds to import).

A lazy command is named with where it lives, ``"module:attr"``, and the one-line help the group's own
``--help`` shows (so listing the commands imports none of them). ``attr`` is a Typer app (a sub-group), a
click command, or a function (a command of its own, as ``app.command(name)(fn)`` would make it); with a
trailing ``()`` it is a function called without arguments that returns one of these."""

from __future__ import annotations

import importlib
from difflib import get_close_matches
from typing import Any, ClassVar

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

try:  # recent typer carries its own copy of click, whose classes its commands are
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]


def load(name: str, target: str) -> click.Command:
    module, _, attr = target.partition(":")
    factory = attr.endswith("()")
    obj: Any = getattr(importlib.import_module(module), attr.removesuffix("()"))
    if factory:
        obj = obj()
    if isinstance(obj, typer.Typer):
        cmd: click.Command = typer.main.get_group(obj)
    elif isinstance(obj, click.Command):
        cmd = obj
    else:
        holder = typer.Typer()
        holder.command(name)(obj)
        cmd = typer.main.get_command(holder)
    cmd.name = name
    return cmd


class LazyGroup(TyperGroup):
    """Subclass it with ``lazy = {"name": ("module:attr", "one-line help"), ...}`` and pass it as a Typer's
    ``cls``; commands registered on the Typer the usual way are listed after the lazy ones."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *(n for n in super().list_commands(ctx) if n not in self.lazy)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        target, short_help = self.lazy[cmd_name]
        if self._listing:  # the group's --help: a stand-in that carries the help line, nothing imported
            return TyperCommand(name=cmd_name, help=short_help, short_help=short_help)
        self.commands[cmd_name] = load(cmd_name, target)
        return self.commands[cmd_name]

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return self._click_resolve_command(ctx, args)
        except click.exceptions.UsageError as e:
            if self.suggest_commands and args:
                matches = get_close_matches(args[0], self.list_commands(ctx))
                if matches:
                    e.message = f"{e.message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
            raise
