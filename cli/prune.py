"""`secateurs prune`: one pruning run from the command line, with a progress bar per block and a
closing table. Bad arguments exit with status 2 and a one-line explanation, before anything is written."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli import flags
from core.pruning import preflight
from core.pruning.config import NAMED_SETS, PruneConfig
from core.pruning.errors import PruningError
from core.pruning.progress import Progress as Report

err = Console(stderr=True)
stdout = Console()


def fail(msg: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


FLAGS = flags.config_flags()
OWN_FLAGS = {"model": "--model", preflight.OUT: "--out"}  # the command's own options, not PruneConfig fields


def flag_name(loc: tuple[int | str, ...]) -> str:
    return OWN_FLAGS.get(".".join(map(str, loc))) or flags.flag_for(loc, FLAGS)


def _absolute_if_file(source: str) -> str:
    """Relative file paths become absolute (the metrics record where the text came from); named sets stay."""
    return source if source in NAMED_SETS or not Path(source).suffix else str(Path(source).resolve())


def build_config(given: dict[str, Any], model: str) -> PruneConfig:
    try:
        raw = flags.config_input(FLAGS, given)
    except flags.FlagError as e:
        fail(str(e))
    raw["model"] = model
    for block in ("calibration", "evaluation"):
        if "source" in raw.get(block, {}):
            raw[block]["source"] = _absolute_if_file(raw[block]["source"])
    if "task_paths" in raw.get("evaluation", {}):
        raw["evaluation"]["task_paths"] = [str(Path(p).expanduser().resolve()) for p in raw["evaluation"]["task_paths"]]
    try:
        return PruneConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        fail(f"{flag_name(first['loc'])}: {first['msg'].removeprefix('Value error, ')}")


def prune(
    model: Annotated[str, typer.Option("--model", "-m", help="Hugging Face hub id or local model directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (must be absent or empty)")],
    json_out: Annotated[bool, typer.Option("--json", help="print metrics.json to stdout at the end")] = False,
    **given: Any,
) -> None:
    """Prune a model block by block and write a directory transformers loads."""
    cfg = build_config(given, model)
    problems = preflight.check(cfg, out)
    if problems:
        fail(preflight.describe(problems, {p.field: flag_name(tuple(p.field.split("."))) for p in problems}))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from transformers.utils import logging as hf_logging

    from core.pruning.run import prune as run  # heavy imports only once the arguments are valid

    hf_logging.disable_progress_bar()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
    ) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(p: Report) -> None:
            # a row per stage; gradual pruning's stages each get their own prune and recover rows
            row = (
                f"{p.stage} {p.data['gradual_stage']}/{p.data['gradual_stages']}"
                if "gradual_stage" in p.data
                else p.stage
            )
            if row not in tasks:  # a new stage: close the previous one, open a row for this one
                for t in tasks.values():
                    bar.update(t, completed=bar.tasks[t].total or 1, total=bar.tasks[t].total or 1)
                if p.stage == "done":
                    return
                tasks[row] = bar.add_task(row, total=p.total_blocks, info="")
            info = f"loss {p.data['loss']:.4f}" if p.stage == "recover" and "loss" in p.data else ""
            if p.total_blocks:
                bar.update(tasks[row], total=p.total_blocks, completed=0 if p.block is None else p.block + 1, info=info)

        try:
            result = run(cfg, out, on_progress=on_progress)
        except PruningError as e:
            bar.stop()
            fail(f"{e.code}: {e}", code=1)
        except ValueError as e:
            bar.stop()
            fail(str(e), code=2)
        on_progress(Report("done"))
    m = result.metrics
    if json_out:
        stdout.print_json(json.dumps(m))
        return
    summary(m, result.out_dir)


_own = list(inspect.signature(prune, eval_str=True).parameters.values())[:-1]
prune.__signature__ = inspect.Signature(_own + [flags.typer_parameter(f) for f in FLAGS])  # type: ignore[attr-defined]
prune.__annotations__ = {p.name: p.annotation for p in prune.__signature__.parameters.values()}  # type: ignore[attr-defined]


def summary(m: dict[str, Any], where: Path) -> None:
    if m.get("sweep"):
        return sweep_summary(m, where)
    t = Table(title=f"secateurs: {m['method']} on {Path(m['model']['source']).name}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    cfg = m["config"]
    if m["pruned_weights"]:
        t.add_row("pattern", cfg["pattern"] or f"unstructured {cfg['sparsity']} ({cfg['schedule']['kind']})")
        t.add_row("achieved sparsity", f"{m['achieved_sparsity']:.4f} of {m['pruned_weights']:,} prunable weights")
    if m.get("structure"):
        st = m["structure"]
        parts = [f"{k} {st[k]['before']} → {st[k]['after']}" for k in ("blocks", "mlp") if st.get(k)]
        if st.get("heads"):
            parts.append(f"heads {st['heads']['heads_before']} → {st['heads']['heads_after']}")
        t.add_row("structure", ", ".join(parts))
        sb, sa = st.get("speed_before"), st.get("speed_after")
        if sb and sa:
            t.add_row("decode tokens/s", f"{sb['decode_tokens_per_s']:.1f} → {sa['decode_tokens_per_s']:.1f}")
    t.add_row("params", f"{m['model']['params_before']:,} → {m['model']['params_after']:,}")
    cal = m["calibration"]
    t.add_row("calibration", f"{cal['source']}: {cal['nsamples']}×{cal['seqlen']} tokens, seed {cal['seed']}")
    if m["perplexity"]:
        p = m["perplexity"]
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        t.add_row(
            "perplexity",
            f"{fmt(p['dense'])} → {fmt(p.get('pruned'))}"
            + (f" → {fmt(p['recovered'])} recovered" if "recovered" in p else "")
            + f" ({p['protocol']['source']}, {p['protocol']['windows']}×{p['protocol']['seqlen']})",
        )
    if m.get("recovery"):
        r = m["recovery"]
        t.add_row(
            "recovery",
            f"{r['config']['mode']}{' + distill' if r['config']['distill'] else ''}: {r['steps']} steps, "
            f"{r['tokens_seen']:,} tokens, loss {r['runs'][0]['loss_first']} → {r['runs'][-1]['loss_last']}, "
            f"masks held ({r['mask_violations']} violations)",
        )
    for task, dense in ((m.get("tasks") or {}).get("dense") or {}).items():
        pruned = m["tasks"].get("pruned", {}).get(task, {})
        for metric, value in dense.items():
            if not metric.endswith("_stderr") and value is not None:
                after = pruned.get(metric)
                t.add_row(f"{task} {metric}", f"{value:.4f} → {'n/a' if after is None else f'{after:.4f}'}")
    t.add_row("time", ", ".join(f"{k} {v:.2f}s" for k, v in m["timings"].items()))
    t.add_row("peak RSS", f"{m['memory']['peak_rss_bytes'] / 2**20:.0f} MiB")
    if m["damping_retries"]:
        t.add_row("damping retries", f"[yellow]{m['damping_retries']} (see metrics.json)[/]")
    t.add_row("output", str(where))
    stdout.print(t)


def sweep_summary(m: dict[str, Any], where: Path) -> None:
    from cli.sweep_view import sweep_table

    p = m.get("perplexity") or {}
    proto = p.get("protocol") or {}
    title = f"secateurs sweep: {m['method']} on {Path(m['model']['source']).name}"
    if proto:
        title += f" (perplexity on {Path(str(proto.get('source'))).name}, {proto.get('windows')}×{proto.get('seqlen')})"
    stdout.print(sweep_table(m["sweep"], title))
    shared = ", ".join(f"{k} {v:.2f}s" for k, v in m["timings"]["shared"].items())
    stdout.print(f"shared: {shared}; targets {m['timings']['targets']:.2f}s; total {m['timings']['total']:.2f}s")
    stdout.print(f"output: {where} (plot: {where / m['sweep']['plot']})")
