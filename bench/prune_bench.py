"""secateurs vs llm-compressor: prune wall time, peak RSS and perplexity, method x pattern.

    python bench/prune_bench.py                       # stories260k (default model)
    python bench/prune_bench.py --model llama100m     # ~110M-param random-init Llama, built here

Every run happens in its own subprocess (peak RSS = that child's own VmHWM):
our engine in this environment (bench/_ours_runner.py), llm-compressor's `oneshot` in its
own virtualenv (bench/llmc_runner.py), and perplexity for both with the same evaluator on the
same windows (bench/_eval_runner.py). Both tools get the identical token ids (a .pt file).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ASSETS = (ROOT / ".." / "shared" / "assets").resolve()
DEFAULT_MODEL = ASSETS / "stories260k-hf"
DEFAULT_TEXT = ASSETS / "text" / "tinystories-valid.txt"
DEFAULT_LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
LLMC_METHODS = ("wanda", "sparsegpt")  # llm-compressor modifiers compared here
MB = 1024 * 1024

# Targets of issue 2.
TIME_RATIO_MAX = 0.5
PPL_RATIO_MAX = 1.01
MEM_FACTOR = 1.5


# ----------------------------------------------------------------------------- model + data
def build_llama100m(dst: Path, tokenizer_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """A Llama-shaped model, random init: hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, saved in
    `dtype` (the same random weights, rounded), so that loading it converts nothing, as with a real checkpoint."""
    if (dst / "config.json").exists() and any(dst.glob("*.safetensors")):
        return dst
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).float().to(getattr(torch, dtype))
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    # The stories tokenizer (512 ids < 32000), so the same text feeds both models.
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (tokenizer_dir / f).exists():
            shutil.copyfile(tokenizer_dir / f, tmp / f)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def prepare_tokens(args, model_dir: Path, work: Path) -> dict:
    """Tokenise once; eval = the first `eval_windows` windows, calibration = random windows after them."""
    import torch
    from transformers import AutoTokenizer

    tok_dir = model_dir if (model_dir / "tokenizer_config.json").exists() else DEFAULT_MODEL
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.model_max_length = 10**9  # whole-corpus encoding; silence the length warning
    calib_ids = tok(Path(args.calib_text).read_text(), return_tensors="pt").input_ids[0]
    same = Path(args.eval_text).resolve() == Path(args.calib_text).resolve()
    eval_ids = calib_ids if same else tok(Path(args.eval_text).read_text(), return_tensors="pt").input_ids[0]

    esl = args.eval_seqlen or args.seqlen
    n_eval = min(args.eval_windows, eval_ids.numel() // esl)
    eval_windows = eval_ids[: n_eval * esl].reshape(n_eval, esl).clone()
    # Calibration windows never overlap the evaluation windows when both come from one file.
    pool = calib_ids[n_eval * esl :] if same else calib_ids
    if pool.numel() <= args.seqlen:
        raise SystemExit("calibration text too short for the requested seqlen")
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, pool.numel() - args.seqlen, (args.nsamples,), generator=g)
    calib = torch.stack([pool[s : s + args.seqlen] for s in starts.tolist()]).long()

    paths = {"calib": work / "calib_tokens.pt", "eval": work / "eval_tokens.pt"}
    torch.save(calib, paths["calib"])
    torch.save(eval_windows, paths["eval"])
    return {
        "calib_tokens": str(paths["calib"]),
        "eval_tokens": str(paths["eval"]),
        "calib_shape": list(calib.shape),
        "eval_shape": list(eval_windows.shape),
        "tokenizer": str(tok_dir),
    }


# ----------------------------------------------------------------------------- subprocesses
def run_worker(python: str, script: Path, spec: dict, work: Path, tag: str, timeout: float) -> dict:
    """Run one worker in its own process; its peak RSS is the VmHWM the worker reports (wait4's as fallback)."""
    spec_p, res_p, log_p = work / f"{tag}.spec.json", work / f"{tag}.result.json", work / f"{tag}.log"
    spec_p.write_text(json.dumps(spec, indent=1))
    res_p.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(spec["threads"]),
        MKL_NUM_THREADS=str(spec["threads"]),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT),
    )
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_p, "wb") as log:
        proc = subprocess.Popen([python, str(script), str(spec_p), str(res_p)], stdout=log, stderr=log, env=env)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out: dict = {
        "process_wall_s": wall,
        "peak_rss": ru.ru_maxrss * 1024,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "loadavg_before": load_before,
        "rc": proc.returncode,
        "log": str(log_p),
    }
    if proc.returncode == 0 and res_p.exists():
        out.update(json.loads(res_p.read_text()))
        # the child's own peak (VmHWM): wait4's ru_maxrss includes this orchestrator's size at fork
        out["peak_rss_wait4"] = out["peak_rss"]
        out["peak_rss"] = out.get("peak_rss_self") or out["peak_rss"]
    else:
        tail = log_p.read_text(errors="replace").splitlines()[-15:]
        out["error"] = "\n".join(tail)
    return out


def pick_fastest(runs: list[dict]) -> dict:
    """Keep the fastest attempt (the machine is shared: others' load only adds time); keep every attempt's record."""
    bad = [r for r in runs if r.get("error")]
    if bad:
        return bad[0]
    best = dict(min(runs, key=lambda r: r["prune_s"]))
    best["attempts"] = [
        {k: r.get(k) for k in ("prune_s", "prune_cpu_s", "process_wall_s", "cpu_s", "peak_rss", "loadavg_before")}
        for r in runs
    ]
    best["peak_rss_max"] = max(r["peak_rss"] for r in runs)
    return best


# ----------------------------------------------------------------------------- formatting
def fmt_s(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def fmt_mb(x) -> str:
    return "—" if x is None else f"{x / MB:.0f}"


def fmt_ppl(x) -> str:
    if x is None:
        return "—"
    return f"{x:.4g}" if x < 1e4 else f"{x:.4e}"


def fmt_ratio(x, limit) -> str:
    if x is None:
        return "—"
    return f"{x:.3f} {'ok' if x <= limit else 'MISS'}"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in headers:
            t.add_column(h, justify="right" if h not in ("method", "pattern", "tool") else "left")
        for r in rows:
            t.add_row(*r)
        Console(width=250).print(t)
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print(f"\n{title}")
        print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("-+-".join("-" * w for w in widths))
        for r in rows:
            print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="model directory, or 'llama100m' to build/use the random-init ~110M Llama",
    )
    p.add_argument("--calib-text", default=str(DEFAULT_TEXT))
    p.add_argument(
        "--eval-text", default=None, help="default: --calib-text (eval windows are then kept out of calibration)"
    )
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=None, help="default: --seqlen")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every run, both tools")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="dtype the model is loaded in, by both tools and by the evaluator",
    )
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--patterns", default="0.5,2:4", help="comma list: unstructured sparsities and/or N:M patterns")
    p.add_argument("--llmc-python", default=str(DEFAULT_LLMC_PY), help="python of the llm-compressor virtualenv")
    p.add_argument("--llmc-batch-size", type=int, default=1, help="oneshot batch_size (its default is 1)")
    p.add_argument(
        "--repeat", type=int, default=1, help="prune runs per cell; the fastest is reported (shared machine)"
    )
    p.add_argument("--show-attempts", action="store_true", help="print the per-attempt table even with --repeat 1")
    p.add_argument("--no-llmc", action="store_true", help="only our engine")
    p.add_argument("--no-ours", action="store_true", help="only llm-compressor")
    p.add_argument("--workdir", default=str(ROOT / "out" / "bench"))
    p.add_argument("--timeout", type=float, default=3600, help="seconds per subprocess")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    p.add_argument("--from-json", default=None, help="print the tables of a saved --json run again (no pruning)")
    p.add_argument(
        "--remeasure-baseline", action="store_true", help="with --from-json: measure the runtime baseline anew"
    )
    a = p.parse_args(argv)
    a.eval_text = a.eval_text or a.calib_text
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    py = sys.executable
    if args.from_json:
        return rereport(args)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    if args.model == "llama100m":
        print("building / reusing the random-init ~110M Llama ...", flush=True)
        name = "llama100m" if args.dtype == "float32" else f"llama100m-{args.dtype}"
        model_dir = build_llama100m(work / name, DEFAULT_MODEL, dtype=args.dtype)
    else:
        model_dir = Path(args.model).resolve()
    suffix = "" if args.dtype == "float32" or model_dir.name.endswith(args.dtype) else f"-{args.dtype}"
    mtag = model_dir.name + suffix
    work = work / mtag
    work.mkdir(parents=True, exist_ok=True)

    llmc = not args.no_llmc
    if llmc and not Path(args.llmc_python).exists():
        print(f"llm-compressor python not found at {args.llmc_python}: skipping its side (see bench/README.md)")
        llmc = False

    data = prepare_tokens(args, model_dir, work)
    print(
        f"model {model_dir}  dtype {args.dtype}  calibration {data['calib_shape']}  "
        f"eval windows {data['eval_shape']}  threads {args.threads}",
        flush=True,
    )
    common = {"threads": args.threads, "model": str(model_dir), "dtype": args.dtype}

    base = run_worker(py, HERE / "_eval_runner.py", {**common, "mode": "baseline"}, work, "baseline", args.timeout)
    if base.get("error"):
        print(base["error"])
        return 1
    dense = run_worker(
        py,
        HERE / "_eval_runner.py",
        {**common, "mode": "eval", "eval_tokens": data["eval_tokens"], "batch_size": args.eval_batch},
        work,
        "dense_eval",
        args.timeout,
    )
    print(f"dense ppl {fmt_ppl(dense.get('ppl'))}", flush=True)

    results = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for pat in [p.strip() for p in args.patterns.split(",") if p.strip()]:
            nm = ":" in pat
            sparsity = None if nm else float(pat)
            label = pat if nm else f"unstructured {sparsity:g}"
            tag = f"{method}_{pat.replace(':', 'of').replace('.', 'p')}"
            row = {"method": method, "pattern": label}
            out_dir = work / f"ours_{tag}"
            weights = work / f"llmc_{tag}.safetensors"
            jobs = {}
            if not args.no_ours:
                jobs["ours"] = (
                    py,
                    HERE / "_ours_runner.py",
                    {
                        **common,
                        "tokens": data["calib_tokens"],
                        "method": method,
                        "sparsity": sparsity,
                        "pattern": pat if nm else None,
                        "out_dir": str(out_dir),
                    },
                )
            if llmc and method in LLMC_METHODS:
                jobs["llmc"] = (
                    args.llmc_python,
                    HERE / "llmc_runner.py",
                    {
                        **common,
                        "tokens": data["calib_tokens"],
                        "method": method,
                        "sparsity": 0.5 if nm else sparsity,
                        "mask_structure": pat if nm else "0:0",
                        "batch_size": args.llmc_batch_size,
                        "save": str(weights),
                    },
                )
            # Attempts alternate between the tools (ours, llmc, ours, llmc, ...) so that both see
            # about the same background load on a shared machine.
            runs: dict[str, list[dict]] = {k: [] for k in jobs}
            for k in range(max(1, args.repeat)):
                for tool, (python, script, spec) in jobs.items():
                    if runs[tool] and runs[tool][-1].get("error"):
                        continue
                    print(f"[{tool}] {method} {label} attempt {k + 1}/{args.repeat} ...", flush=True)
                    r = run_worker(python, script, spec, work, f"{tool}_{tag}", args.timeout)
                    if r.get("error"):
                        print(r["error"])
                    runs[tool].append(r)
            for tool in jobs:
                res = pick_fastest(runs[tool])
                if not res.get("error"):
                    ev_spec = {
                        **common,
                        "mode": "eval",
                        "eval_tokens": data["eval_tokens"],
                        "batch_size": args.eval_batch,
                    }
                    if tool == "ours":
                        ev_spec["model"] = str(out_dir)
                    else:
                        ev_spec["weights"] = str(weights)
                    ev = run_worker(py, HERE / "_eval_runner.py", ev_spec, work, f"{tool}_{tag}_eval", args.timeout)
                    res["ppl"], res["stats"], res["eval_error"] = ev.get("ppl"), ev.get("stats"), ev.get("error")
                    if ev.get("error"):
                        print(ev["error"])
                row[tool] = res
            shutil.rmtree(out_dir, ignore_errors=True)
            weights.unlink(missing_ok=True)
            results.append(row)

    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "model_dir": str(model_dir),
                    "data": data,
                    "baseline": base,
                    "dense": dense,
                    "results": results,
                },
                indent=1,
                default=str,
            )
        )
    report(args, mtag, data, base, dense, results)
    return 0


def rereport(args) -> int:
    saved = json.loads(Path(args.from_json).read_text())
    base = saved["baseline"]
    model_dir = Path(saved.get("model_dir") or saved["args"]["model"])
    if args.remeasure_baseline:
        work = Path(args.workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        base = run_worker(
            sys.executable,
            HERE / "_eval_runner.py",
            {
                "threads": saved["args"]["threads"],
                "model": str(model_dir),
                "mode": "baseline",
                "dtype": saved["args"].get("dtype", "float32"),
            },
            work,
            f"baseline_{model_dir.name}",
            args.timeout,
        )
        if base.get("error"):
            print(base["error"])
            return 1
    for k in ("repeat", "show_attempts"):
        setattr(args, k, saved["args"].get(k, getattr(args, k)))
    args.threads = saved["args"]["threads"]
    args.dtype = saved["args"].get("dtype", "float32")
    report(args, model_dir.name, saved["data"], base, saved["dense"], saved["results"])
    return 0


def report(args, mtag: str, data: dict, base: dict, dense: dict, results: list[dict]) -> None:
    hidden, dbytes = base["hidden_size"], base["dtype_bytes"]
    ns, sl = data["calib_shape"]
    act_bytes = ns * sl * hidden * dbytes
    mem_limit = (base["largest_block_bytes"] + act_bytes) * MEM_FACTOR + base["baseline_rss"]
    dppl = dense.get("ppl")
    rows, arows = [], []
    for r in results:
        o, t = r.get("ours") or {}, r.get("llmc") or {}
        o_s, t_s = o.get("prune_s"), t.get("prune_s")
        o_c, t_c = o.get("prune_cpu_s"), t.get("prune_cpu_s")
        o_p, t_p = o.get("ppl"), t.get("ppl")
        tr = (o_s / t_s) if (o_s and t_s) else None
        cr = (o_c / t_c) if (o_c and t_c) else None
        pr = (o_p / t_p) if (o_p and t_p) else None

        def sp(d: dict) -> str:
            return "—" if not d.get("stats") else f"{d['stats']['sparsity']:.3f}"

        rows.append(
            [
                r["method"],
                r["pattern"],
                fmt_s(o_s),
                fmt_s(t_s),
                fmt_ratio(tr, TIME_RATIO_MAX),
                fmt_s(o_c),
                fmt_s(t_c),
                "—" if cr is None else f"{cr:.3f}",
                fmt_ppl(dppl),
                fmt_ppl(o_p),
                fmt_ppl(t_p),
                fmt_ratio(pr, PPL_RATIO_MAX),
                fmt_mb(o.get("peak_rss")),
                fmt_mb(t.get("peak_rss")),
                f"{sp(o)} / {sp(t)}",
            ]
        )
        for tool, d in (("ours", o), ("llmc", t)):
            for k, a in enumerate(d.get("attempts") or []):
                arows.append(
                    [
                        r["method"],
                        r["pattern"],
                        tool,
                        str(k + 1),
                        fmt_s(a.get("prune_s")),
                        fmt_s(a.get("prune_cpu_s")),
                        fmt_s(a.get("process_wall_s")),
                        fmt_mb(a.get("peak_rss")),
                        "—" if a.get("loadavg_before") is None else f"{a['loadavg_before']:.2f}",
                    ]
                )
    headers = [
        "method",
        "pattern",
        "ours prune s",
        "llmc prune s",
        f"time ours/llmc (≤{TIME_RATIO_MAX})",
        "ours cpu s",
        "llmc cpu s",
        "cpu ours/llmc",
        "ppl dense",
        "ours ppl",
        "llmc ppl",
        f"ppl ours/llmc (≤{PPL_RATIO_MAX})",
        "ours peak MB",
        "llmc peak MB",
        "sparsity ours / llmc",
    ]
    print()
    print_table(
        f"{mtag}: {args.dtype}, calibration {ns}x{sl} tokens, eval {data['eval_shape'][0]}x{data['eval_shape'][1]}, "
        f"torch threads {args.threads}, fastest of {args.repeat}",
        headers,
        rows,
    )
    if args.repeat > 1 or args.show_attempts:
        print_table(
            "every attempt (load average = 1-min load of the machine just before the run)",
            ["method", "pattern", "tool", "#", "prune s", "cpu s", "proc s", "peak MB", "load avg"],
            arows,
        )

    warm = base.get("baseline_rss_warm")
    warm_limit = mem_limit - base["baseline_rss"] + warm if warm else None
    mrows = []
    for r in results:
        for tool in ("ours", "llmc"):
            d = r.get(tool)
            if not d or d.get("error"):
                continue
            peak = d["peak_rss"]
            mrows.append(
                [
                    r["method"],
                    r["pattern"],
                    tool,
                    fmt_mb(peak),
                    fmt_mb(mem_limit),
                    fmt_mb(peak - base["baseline_rss"]),
                    "ok" if peak <= mem_limit else "MISS",
                    fmt_mb(warm_limit),
                    "—" if warm_limit is None else ("ok" if peak <= warm_limit else "MISS"),
                ]
            )
    print_table(
        "memory target: peak RSS ≤ (largest block + calibration activations) × 1.5 + runtime baseline",
        [
            "method",
            "pattern",
            "tool",
            "peak MB",
            "limit MB",
            "peak − baseline MB",
            "check",
            "limit, warm runtime MB",
            "check (warm)",
        ],
        mrows,
    )
    print(
        f"  largest block      {base['largest_block_bytes'] / MB:10.2f} MB  ({base['n_blocks']} blocks, model "
        f"{base['model_params'] / 1e6:.2f}M params = {base['model_param_bytes'] / MB:.1f} MB)\n"
        f"  calib activations  {act_bytes / MB:10.2f} MB  (nsamples {ns} × seqlen {sl} × hidden {hidden} × {dbytes} B)\n"
        f"  runtime baseline   {base['baseline_rss'] / MB:10.2f} MB  (RSS of a fresh process after importing torch, "
        f"transformers{' and core.pruning.run' if base.get('engine_imported') else ''} and loading the dense model on CPU,\n"
        f"                     every weight read once; imports alone {base['rss_imports'] / MB:.0f} MB"
        + (
            f", right after from_pretrained before reading the weights {base['baseline_rss_lazy'] / MB:.0f} MB"
            if base.get("baseline_rss_lazy")
            else ""
        )
        + ")\n"
        f"  limit = ({base['largest_block_bytes'] / MB:.2f} + {act_bytes / MB:.2f}) × {MEM_FACTOR} + "
        f"{base['baseline_rss'] / MB:.2f} = {mem_limit / MB:.2f} MB"
    )
    if warm:
        print(
            f"  warm runtime       {warm / MB:10.2f} MB  (the same process after one forward of one token: "
            f"OpenMP threads and kernel workspaces, +{(warm - base['baseline_rss']) / MB:.1f} MB); "
            f"limit with it {warm_limit / MB:.2f} MB"
        )
    vers = next((r["llmc"].get("versions") for r in results if r.get("llmc", {}).get("versions")), None)
    print(
        "  prune s: ours = engine prune() minus its load/export stages; llmc = the oneshot() call "
        "(model already loaded, nothing saved). cpu s = process CPU time (all threads) of that same span\n"
        "  (ours: engine progress events 'calibrate' -> 'export'); less sensitive than wall time to other load on the machine."
    )
    if vers:
        print(f"  llm-compressor side: {vers}")


if __name__ == "__main__":
    sys.exit(main())
