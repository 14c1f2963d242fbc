"""The `secateurs prune` flags, derived from PruneConfig's fields and the registered methods' options: a field
added there (or a method with its own options) is a flag here, with the field's description as help and its
default shown, without being written again."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from rich.markup import escape

from core.pruning.config import PruneConfig, registered_methods

FieldPath = tuple[str, ...]

# Fields that are not flags: the model is the command's required -m option, inline texts are for the API, and
# method_options is spread into one flag per method option.
NOT_FLAGS: set[FieldPath] = {("model",), ("calibration", "texts"), ("recovery", "texts"), ("method_options",)}

# Flag names the CLI had before they were generated, and lm-eval's own names, where they differ from the
# generated ones.
HISTORICAL_NAMES: dict[FieldPath, str] = {
    ("calibration", "source"): "calibration",
    ("evaluation", "source"): "eval",
    ("evaluation", "max_windows"): "eval_windows",
    ("evaluation", "tasks"): "tasks",
    ("evaluation", "task_paths"): "task_path",
    ("evaluation", "num_fewshot"): "num_fewshot",
    ("schedule", "kind"): "schedule",
    ("schedule", "owl_m"): "owl_m",
    ("schedule", "owl_lambda"): "owl_lambda",
    ("structure", "mlp_channels"): "structure_mlp",
    ("structure", "bias_compensation"): "bias_compensation",
    ("overrides",): "override",
}

# A block's fields are flags named `<prefix><field>`; a block that is None by default (evaluation, structure)
# is built when any of its flags is given.
BLOCK_PREFIX = {
    "calibration": "",
    "evaluation": "eval_",
    "schedule": "schedule_",
    "structure": "structure_",
    "export": "",
    "recovery": "recovery_",
    "gradual": "gradual_",
}
MODEL_FIELDS = {"revision", "dtype", "trust_remote_code", "device"}  # how the model is loaded, in a panel of their own
PANELS = {
    "model": "Model loading",
    "calibration": "Calibration",
    "evaluation": "Evaluation (perplexity and lm-eval tasks before and after; runs when any of these is given)",
    "schedule": "Layer-wise schedule",
    "structure": "Structured pruning (runs when any of these is given)",
    "export": "Output",
    "recovery": "Recovery fine-tuning, masks held exactly (runs when any of these is given)",
    "gradual": "Gradual pruning in stages, recovering between them (runs when any of these is given)",
    "method_options": "Method options (each applies to the methods named in its help)",
}


@dataclass(frozen=True)
class Flag:
    param: str  # the Python parameter name; the flag is --param with - for _
    path: FieldPath  # where the value goes in PruneConfig's input
    annotation: Any  # what typer parses (str for choices and lists PruneConfig checks itself)
    help: str  # with the default in it: typer's default is None, so that flags not given leave the field's own
    panel: str | None
    parse: Callable[[Any], Any] | None = None  # turns what typer gives into the field's input
    metavar: str | None = None

    @property
    def cli_name(self) -> str:
        return "--" + self.param.replace("_", "-")


def _without_none(annotation: Any) -> Any:
    """X for `X | None`; any other annotation as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    inner = _without_none(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _parse_floats(flag: str) -> Callable[[str], list[float]]:
    def parse(s: str) -> list[float]:
        try:
            return [float(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise FlagError(f"{flag}: expected comma-separated numbers, got {s!r}") from None

    return parse


def _parse_comma_lists(items: list[str]) -> list[str]:
    """Repeatable and comma-separated: `--patterns 2:4,4:8` or `--patterns 2:4 --patterns 4:8` (for values that
    cannot hold a comma; an empty item is left for the field to refuse)."""
    return [p.strip() for it in items for p in it.split(",")]


def _parse_pairs(flag: str, metavar: str) -> Callable[[list[str]], dict[str, float]]:
    def parse(items: list[str]) -> dict[str, float]:
        res = {}
        for it in items:
            key, sep, val = it.rpartition("=")
            try:
                if not sep or not key:
                    raise ValueError
                res[key] = float(val)
            except ValueError:
                raise FlagError(f"{flag}: expected {metavar}, got {it!r}") from None
        return res

    return parse


class FlagError(ValueError):
    """A flag's text could not be turned into its field's value."""


def _default_text(field: FieldInfo) -> str:
    d = field.default
    if d is PydanticUndefined or d is None or field.default_factory is not None:
        return ""
    if isinstance(d, bool):
        return " [dim]\\[default: on][/]" if d else ""
    return f" [dim]\\[default: {d}][/]"


def _flag(
    param: str,
    path: FieldPath,
    field: FieldInfo,
    panel: str | None,
    applies_to: str = "",
    choices: tuple[str, ...] = (),
) -> Flag:
    inner = _without_none(field.annotation)
    text = field.description or ""
    parse: Callable[[Any], Any] | None = None
    metavar: str | None = None
    annotation: Any = inner
    cli_name = "--" + param.replace("_", "-")
    if get_origin(inner) is Literal:
        choices = tuple(map(str, get_args(inner)))
    if choices:
        annotation, text = str, f"{text}: {' | '.join(choices)}"
    elif get_origin(inner) is dict:  # regex → value maps: a repeatable KEY=VALUE
        annotation, parse, metavar = list[str], _parse_pairs(cli_name, "REGEX=SPARSITY"), "REGEX=SPARSITY"
        text += " (repeatable)"
    elif get_origin(inner) is list and get_args(inner) == (float,):
        annotation, parse, metavar = str, _parse_floats(cli_name), "X,Y,..."
        text += " (comma-separated)"
    elif get_origin(inner) is list and _comma_free_items(field):
        annotation, parse, metavar = list[str], _parse_comma_lists, "A,B,..."
        text += " (comma-separated or repeatable)"
    elif get_origin(inner) is list:
        annotation, metavar = list[str], "TEXT"
        text += " (repeatable)"
    return Flag(param, path, annotation, escape(text + applies_to) + _default_text(field), panel, parse, metavar)


def _comma_free_items(field: FieldInfo) -> bool:
    """The items are N:M patterns, which hold no comma: a comma can only separate them."""
    from core.pruning.config_schema import NM

    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    items = extra.get("items")
    return isinstance(items, dict) and items.get("pattern") == f"^(?:{NM})$"


def _name(path: FieldPath) -> str:
    if path in HISTORICAL_NAMES:
        return HISTORICAL_NAMES[path]
    return path[0] if len(path) == 1 else BLOCK_PREFIX[path[0]] + "_".join(path[1:])


def config_flags() -> list[Flag]:
    """One flag per PruneConfig field (a block's fields one level down), then one per method option."""
    flags = []
    for name, field in PruneConfig.model_fields.items():
        block = _model_in(field.annotation)
        if block is None:
            if (name,) not in NOT_FLAGS:
                choices = tuple(sorted(registered_methods())) if name == "method" else ()
                panel = PANELS["model"] if name in MODEL_FIELDS else None
                flags.append(_flag(_name((name,)), (name,), field, panel, choices=choices))
            continue
        for sub, subfield in block.model_fields.items():
            inner = _model_in(subfield.annotation)
            if inner is not None:  # a block inside a block (recovery.lora): --recovery-lora-r
                flags += [
                    _flag(_name((name, sub, f)), (name, sub, f), ff, PANELS[name])
                    for f, ff in inner.model_fields.items()
                ]
            elif (name, sub) not in NOT_FLAGS:
                flags.append(_flag(_name((name, sub)), (name, sub), subfield, PANELS[name]))
    return flags + method_option_flags()


def method_option_flags() -> list[Flag]:
    """One flag per option name of every registered method; the value goes into PruneConfig's input flat,
    where PruneConfig moves it into `method_options` or refuses it for another method."""
    owners: dict[str, list[str]] = {}
    fields: dict[str, FieldInfo] = {}
    for method_name, cls in sorted(registered_methods().items()):
        for opt, field in cls.Options.model_fields.items():
            owners.setdefault(opt, []).append(method_name)
            fields.setdefault(opt, field)
    return [
        _flag(opt, (opt,), fields[opt], PANELS["method_options"], f" (for {', '.join(owners[opt])})") for opt in owners
    ]


def typer_parameter(flag: Flag) -> inspect.Parameter:
    decl = f"{flag.cli_name}/--no-{flag.cli_name[2:]}" if flag.annotation is bool else flag.cli_name
    option = typer.Option(decl, help=flag.help, rich_help_panel=flag.panel, show_default=False, metavar=flag.metavar)
    annotation = flag.annotation | None
    return inspect.Parameter(
        flag.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[annotation, option]
    )


def config_input(flags: list[Flag], given: dict[str, Any]) -> dict[str, Any]:
    """PruneConfig's input from the flags that were given (None and empty lists are flags not given: the
    field's own default applies). Raises FlagError for a value that cannot be parsed."""
    raw: dict[str, Any] = {}
    for flag in flags:
        value = given.get(flag.param)
        if value is None or value == []:
            continue
        value = flag.parse(value) if flag.parse else value
        target = raw
        for key in flag.path[:-1]:
            target = target.setdefault(key, {})
        target[flag.path[-1]] = value
    return raw


def flag_for(loc: tuple[int | str, ...], flags: list[Flag]) -> str:
    """The flag a validation error's location points at (its dotted path when no flag sets it)."""
    path = tuple(str(p) for p in loc)
    if path[:1] == ("method_options",):
        path = path[1:]
    for flag in flags:
        if flag.path == path:
            return flag.cli_name
    return ".".join(path) or "arguments"
