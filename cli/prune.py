"""`secateurs prune`: one pruning run from the command line, with a progress bar per block and a
closing table. Bad arguments exit with status 2 and a one-line explanation, before anything is written."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.pruning.config import NAMED_SETS, PruneConfig
from core.pruning.errors import PruningError
from core.pruning.locations import is_local_model
from core.pruning.progress import Progress as Report

err = Console(stderr=True)
out = Console()


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _floats(s: str | None, what: str) -> list[float] | None:
    if s is None:
        return None
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        fail(f"{what}: expected comma-separated numbers, got {s!r}")
        return None


def _overrides(items: list[str]) -> dict[str, float]:
    res = {}
    for it in items:
        pat, sep, val = it.rpartition("=")
        try:
            if not sep or not pat:
                raise ValueError
            res[pat] = float(val)
        except ValueError:
            fail(f"--override: expected REGEX=SPARSITY, got {it!r}")
    return res


def build_config(**o: Any) -> PruneConfig:
    structure = None
    if o["structure_mlp"] or o["structure_heads"] or o["structure_blocks"]:
        structure = {"mlp_channels": o["structure_mlp"], "heads": o["structure_heads"],
                     "blocks": o["structure_blocks"], "score": o["structure_score"],
                     "bias_compensation": o["bias_compensation"]}
    calib = Path(o["calibration"])
    raw = {
        "model": o["model"], "method": o["method"], "sparsity": o["sparsity"], "pattern": o["pattern"],
        "dtype": o["dtype"], "device": o["device"], "revision": o["revision"],
        "trust_remote_code": o["trust_remote_code"], "magnitude_scope": o["magnitude_scope"],
        "wanda_alpha_search": o["wanda_alpha_search"], "blocksize": o["blocksize"], "percdamp": o["percdamp"],
        "true_sequential": o["true_sequential"], "propagate": o["propagate"], "exclude": o["exclude"],
        "overrides": _overrides(o["override"]),
        "calibration": {"source": str(calib.resolve()) if calib.suffix else o["calibration"],
                        "nsamples": o["nsamples"], "seqlen": o["seqlen"], "seed": o["seed"]},
        "evaluation": None if o["eval"] is None else {
            "source": o["eval"] if o["eval"] in NAMED_SETS else str(Path(o["eval"]).resolve()),
            "seqlen": o["eval_seqlen"], "max_windows": o["eval_windows"], "batch_size": o["eval_batch_size"]},
        "schedule": {"kind": o["schedule"], "values": _floats(o["schedule_values"], "--schedule-values"),
                     "first": o["schedule_first"], "last": o["schedule_last"],
                     "owl_m": o["owl_m"], "owl_lambda": o["owl_lambda"]},
        "structure": structure,
        "export": {"save_model": o["save_model"], "masks": o["masks"], "compact": o["compact"]},
    }
    try:
        return PruneConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "arguments"
        fail(f"{where}: {first['msg'].removeprefix('Value error, ')}")
        raise  # unreachable


def prune(
    model: Annotated[str, typer.Option("--model", "-m", help="Hugging Face hub id or local model directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory (must be absent or empty)")],
    method: Annotated[str, typer.Option(help="magnitude | wanda | sparsegpt")] = "wanda",
    sparsity: Annotated[Optional[float], typer.Option(help="unstructured sparsity in [0, 1)")] = None,
    pattern: Annotated[Optional[str], typer.Option(help="N:M, e.g. 2:4 (at most N non-zeros per M inputs)")] = None,
    calibration: Annotated[str, typer.Option(help="c4 | wikitext2 | ptb | FILE (.txt .jsonl .pt .npy)")] = "c4",
    nsamples: Annotated[int, typer.Option(help="calibration windows")] = 128,
    seqlen: Annotated[int, typer.Option(help="tokens per window (capped at the model's limit)")] = 2048,
    seed: Annotated[int, typer.Option(help="calibration sampling seed")] = 0,
    eval: Annotated[Optional[str], typer.Option("--eval", help="perplexity on wikitext2 | c4 | ptb | FILE")] = None,
    eval_seqlen: Annotated[Optional[int], typer.Option(help="evaluation window (default: --seqlen)")] = None,
    eval_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows")] = None,
    eval_batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 8,
    dtype: Annotated[str, typer.Option(help="auto | float32 | float16 | bfloat16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    revision: Annotated[Optional[str], typer.Option(help="hub revision")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="allow custom model code from the hub")] = False,
    exclude: Annotated[list[str], typer.Option(help="regex of layer names not to prune (repeatable)")] = [],
    override: Annotated[list[str], typer.Option(help="REGEX=SPARSITY per-layer override (repeatable)")] = [],
    magnitude_scope: Annotated[str, typer.Option(help="layer (reference) | row")] = "layer",
    wanda_alpha_search: Annotated[bool, typer.Option(help="Wanda's cumulative-score α variant")] = False,
    blocksize: Annotated[int, typer.Option(help="SparseGPT column block")] = 128,
    percdamp: Annotated[float, typer.Option(help="SparseGPT damping")] = 0.01,
    true_sequential: Annotated[bool, typer.Option(help="prune [q,k,v]→[o]→[gate,up]→[down] in turn")] = False,
    propagate: Annotated[str, typer.Option(help="pruned (papers) | dense block outputs")] = "pruned",
    schedule: Annotated[str, typer.Option(help="uniform | explicit | linear | owl")] = "uniform",
    schedule_values: Annotated[Optional[str], typer.Option(help="explicit: comma-separated per block")] = None,
    schedule_first: Annotated[Optional[float], typer.Option(help="linear: first block's sparsity")] = None,
    schedule_last: Annotated[Optional[float], typer.Option(help="linear: last block's sparsity")] = None,
    owl_m: Annotated[float, typer.Option(help="OWL outlier threshold M")] = 5.0,
    owl_lambda: Annotated[float, typer.Option(help="OWL maximum deviation λ")] = 0.08,
    structure_mlp: Annotated[float, typer.Option(help="structured: fraction of MLP channels to remove")] = 0.0,
    structure_heads: Annotated[float, typer.Option(help="structured: fraction of attention heads to remove")] = 0.0,
    structure_blocks: Annotated[float, typer.Option(help="structured: fraction of blocks to remove")] = 0.0,
    structure_score: Annotated[str, typer.Option(help="activation | weight")] = "activation",
    bias_compensation: Annotated[bool, typer.Option(help="structured: FLAP bias compensation")] = False,
    save_model: Annotated[bool, typer.Option(help="write the pruned model")] = True,
    masks: Annotated[bool, typer.Option(help="write masks.safetensors")] = True,
    compact: Annotated[bool, typer.Option(help="also write the compact sparse checkpoint")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print metrics.json to stdout at the end")] = False,
) -> None:
    """Prune a model block by block and write a directory transformers loads."""
    cfg = build_config(**locals())
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out: {out} exists and is not empty")
    if is_local_model(model) and not Path(model.removeprefix("file://")).expanduser().is_dir():
        fail(f"--model: directory {model} does not exist")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from core.pruning.run import prune as run  # heavy imports only once the arguments are valid

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(p: Report) -> None:
            if p.stage not in tasks:  # a new stage: close the previous one, open a row for this one
                for t in tasks.values():
                    bar.update(t, completed=bar.tasks[t].total or 1, total=bar.tasks[t].total or 1)
                if p.stage == "done":
                    return
                tasks[p.stage] = bar.add_task(p.stage, total=p.total_blocks)
            if p.total_blocks:
                bar.update(tasks[p.stage], total=p.total_blocks, completed=(p.block or 0) + 1)

        try:
            result = run(cfg, out, on_progress=on_progress)
        except PruningError as e:
            bar.stop()
            fail(f"{e.code}: {e}", code=1)
        except (ValueError, FileExistsError) as e:
            bar.stop()
            fail(str(e), code=2)
        on_progress(Report("done"))
    m = result.metrics
    if json_out:
        out.print_json(json.dumps(m))
        return
    summary(m, result.out_dir)


def summary(m: dict[str, Any], where: Path) -> None:
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
        t.add_row("perplexity", f"{fmt(p['dense'])} → {fmt(p.get('pruned'))} "
                                f"({p['protocol']['source']}, {p['protocol']['windows']}×{p['protocol']['seqlen']})")
    t.add_row("time", ", ".join(f"{k} {v:.2f}s" for k, v in m["timings"].items()))
    t.add_row("peak RSS", f"{m['memory']['peak_rss_bytes'] / 2**20:.0f} MiB")
    if m["damping_retries"]:
        t.add_row("damping retries", f"[yellow]{m['damping_retries']} (see metrics.json)[/]")
    t.add_row("output", str(where))
    out.print(t)
