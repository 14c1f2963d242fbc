"""Models larger than memory, and runs that resume (issue 22).

    python bench/scale.py gen DIR --blocks 24 [--hidden 2048]          # a random Llama, sharded safetensors
    python bench/scale.py run DIR --method wanda [--resume CK] [--kill-at K] [--mem-limit 2G] [--json F]
    python bench/scale.py all --blocks 12,24,48 --methods wanda,sparsegpt --root /tmp/scale [--json F]

`gen` writes the model tensor by tensor (never whole in memory). `run` prunes it in a fresh process (so peak
RSS is this run's: VmHWM) and reports wall time, peak RSS, RSS after each block and the resume notes;
`--kill-at K` SIGKILLs the process once block K (1-based) is finished and checkpointed; `--mem-limit` runs it
in a memory cgroup of its own (v2 via systemd-run if there is one, else a cgroup v1/v2 directory made under
this process's own cgroup) and says which. `all` does the figures of bench/README.md section 8: each model
pruned whole, then the resume experiment (killed at block ceil(0.8 N), resumed; masks compared with the
uninterrupted run's), then one run under a limit smaller than the model file. Memory-heavy: run alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def gen(where: Path, blocks: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000) -> int:
    """A random-init Llama (fp32) saved as one safetensors shard per block + one for the rest."""
    import torch
    from transformers import LlamaConfig

    from core.pruning.streaming import write_safetensors
    from tests.fixtures import tiny_models

    where.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )
    cfg.save_pretrained(where)
    tiny_models.tokenizer().save_pretrained(where)
    (where / "calibration.txt").write_text(tiny_models.CORPUS * 200)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    n = blocks + 1
    weight_map: dict[str, str] = {}
    total = 0
    shards: list[tuple[str, dict[str, Any]]] = [
        (
            "rest",
            {
                "model.embed_tokens.weight": (vocab, hidden),
                "lm_head.weight": (vocab, hidden),
                "model.norm.weight": (hidden,),
            },
        )
    ]
    for i in range(blocks):
        p = f"model.layers.{i}."
        shapes = {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {p + f"mlp.{x}_proj.weight": (intermediate, hidden) for x in ("gate", "up")}
        shapes |= {p + "mlp.down_proj.weight": (hidden, intermediate)}
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        shards.append((str(i), shapes))
    for k, (_, shapes) in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        ts = {key: torch.ones(s) if len(s) == 1 else rnd(*s) for key, s in shapes.items()}
        write_safetensors(where / name, ts, {"format": "pt"})
        total += sum(t.numel() * 4 for t in ts.values())
        weight_map.update(dict.fromkeys(ts, name))
        del ts
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (where / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# ------------------------------------------------------------------------------------------- one run


def _child(args: argparse.Namespace) -> None:
    """The run itself, in the process whose memory is measured."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import peak_rss_self_bytes, rss_bytes

    from core.pruning.checkpoints import ResumeSpec
    from core.pruning.config import CalibrationConfig, PruneConfig
    from core.pruning.run import prune

    notes: list[str] = []
    per_block: list[int] = []
    spec = ResumeSpec(Path(args.resume), note=notes.append) if args.resume else None

    def on_progress(p: Any) -> None:
        if p.stage == "prune" and p.block is not None:
            per_block.append(rss_bytes())
            if args.kill_at and p.block + 1 == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = PruneConfig(
        model=args.model,
        method=args.method,
        sparsity=0.5,
        calibration=CalibrationConfig(
            source=str(Path(args.model) / "calibration.txt"), nsamples=args.nsamples, seqlen=args.seqlen
        ),
    )
    res = prune(cfg, args.out, on_progress=on_progress, resume=spec)
    print(
        json.dumps(
            {
                "wall_s": round(time.perf_counter() - t0, 2),
                "peak_rss_bytes": peak_rss_self_bytes(),
                "rss_per_block": per_block,
                "timings": res.metrics["timings"],
                "notes": notes,
            }
        )
    )


def _cgroup_cmd(limit: int) -> tuple[list[str], str, Path | None]:
    """A prefix that runs a command under a memory limit, how, and a cgroup directory to remove after."""
    if (
        shutil.which("systemd-run")
        and subprocess.run(["systemd-run", "--scope", "true"], capture_output=True).returncode == 0
    ):
        return ["systemd-run", "--scope", "-p", f"MemoryMax={limit}", "--"], "systemd-run --scope MemoryMax", None
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            own[c or "unified"] = path
    v1 = Path("/sys/fs/cgroup/memory") / own.get("memory", "/").lstrip("/")
    if v1.is_dir() and os.access(v1, os.W_OK):
        d = v1 / f"secateurs-scale-{os.getpid()}"
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit))
        if (d / "memory.memsw.limit_in_bytes").exists():
            (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return ["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$@"', "sh"], f"cgroup v1 {d}", d
    v2 = Path("/sys/fs/cgroup") / own.get("unified", "/").lstrip("/")
    if (v2 / "cgroup.controllers").exists() and os.access(v2, os.W_OK):
        d = v2 / f"secateurs-scale-{os.getpid()}"
        d.mkdir()
        (d / "memory.max").write_text(str(limit))
        (d / "memory.swap.max").write_text("0")
        return ["sh", "-c", f'echo $$ > {d}/cgroup.procs && exec "$@"', "sh"], f"cgroup v2 {d}", d
    raise SystemExit("no way to set a hard memory limit here (no systemd-run, no writable cgroup)")


def run(
    model: Path,
    method: str,
    out: Path,
    *,
    resume: Path | None = None,
    kill_at: int = 0,
    mem_limit: int = 0,
    nsamples: int = 16,
    seqlen: int = 128,
    threads: int = 2,
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "_child", str(model), "--method", method, "--out", str(out)]
    cmd += ["--nsamples", str(nsamples), "--seqlen", str(seqlen), "--threads", str(threads)]
    if resume:
        cmd += ["--resume", str(resume)]
    if kill_at:
        cmd += ["--kill-at", str(kill_at)]
    prefix, how, cg = ([], None, None)
    if mem_limit:
        prefix, how, cg = _cgroup_cmd(mem_limit)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    try:
        p = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        if cg is not None:
            peak = (
                int((cg / "memory.max_usage_in_bytes").read_text())
                if (cg / "memory.max_usage_in_bytes").exists()
                else None
            )
            failcnt = (cg / "memory.failcnt").read_text().strip() if (cg / "memory.failcnt").exists() else None
    finally:
        if cg is not None:
            cg.rmdir()
    result: dict[str, Any] = {"returncode": p.returncode, "outer_wall_s": round(wall, 2)}
    if mem_limit:
        result |= {"limit_bytes": mem_limit, "limit_by": how, "cgroup_peak_bytes": peak, "cgroup_failcnt": failcnt}
    if p.returncode == 0:
        result |= json.loads(p.stdout.strip().splitlines()[-1])
    elif not (kill_at and p.returncode == -signal.SIGKILL):
        raise SystemExit(f"run failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return result


def masks_equal(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two runs' masks are bit-identical, and the share of mask bits that agree."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    if x.keys() != y.keys():
        return False, 0.0
    popcount = torch.tensor([bin(v).count("1") for v in range(256)])
    bits = sum(x[k].numel() * 8 for k in x)
    diff = sum(int(popcount[(x[k] ^ y[k]).long()].sum()) for k in x)
    return diff == 0, 1 - diff / bits


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def all_figures(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    report: dict[str, Any] = {"nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads, "runs": []}

    def note(r: dict[str, Any]) -> None:
        report["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "rss_per_block"}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    kw = dict(nsamples=args.nsamples, seqlen=args.seqlen, threads=args.threads)
    for blocks in [int(b) for b in args.blocks.split(",")]:
        model = root / f"llama-{blocks}"
        if not model.exists():
            t = time.perf_counter()
            gen(model, blocks, args.hidden, args.intermediate)
            print(f"generated {model} in {time.perf_counter() - t:.0f} s", flush=True)
        size = _size(model)
        for method in args.methods.split(","):
            if blocks != args.resume_blocks and method not in args.depth_methods.split(","):
                continue
            whole = root / f"out-{blocks}-{method}"
            shutil.rmtree(whole, ignore_errors=True)
            r = run(model, method, whole, **kw)
            note({"what": "whole", "blocks": blocks, "method": method, "model_bytes": size, **r})
            if blocks == args.resume_blocks:
                ck, out = root / f"ck-{blocks}-{method}", root / f"out-{blocks}-{method}-resumed"
                shutil.rmtree(ck, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
                k = math.ceil(0.8 * blocks)
                killed = run(model, method, out, resume=ck, kill_at=k, **kw)
                resumed = run(model, method, out, resume=ck, **kw)
                same, agree = masks_equal(whole, out)
                note(
                    {
                        "what": "resume",
                        "blocks": blocks,
                        "method": method,
                        "killed_at_block": k,
                        "killed_run_wall_s": killed["outer_wall_s"],
                        "checkpoint_bytes": sum(f.stat().st_size for f in ck.iterdir()),
                        "resumed_wall_s": resumed["outer_wall_s"],
                        "whole_wall_s": r["outer_wall_s"],
                        "ratio": round(resumed["outer_wall_s"] / r["outer_wall_s"], 3),
                        "masks_bit_identical": same,
                        "mask_bits_agreeing": agree,
                        "notes": resumed["notes"],
                        "peak_rss_bytes": resumed["peak_rss_bytes"],
                    }
                )
                shutil.rmtree(ck, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
            if blocks == args.resume_blocks and method == args.limit_method:
                limit = int(args.mem_limit_gb * (1 << 30))
                lim_out = root / f"out-{blocks}-{method}-limited"
                shutil.rmtree(lim_out, ignore_errors=True)
                r2 = run(model, method, lim_out, mem_limit=limit, **kw)
                same, _ = masks_equal(whole, lim_out)
                note(
                    {
                        "what": "limited",
                        "blocks": blocks,
                        "method": method,
                        "model_bytes": size,
                        **r2,
                        "masks_bit_identical": same,
                    }
                )
                shutil.rmtree(lim_out, ignore_errors=True)
            shutil.rmtree(whole, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("dir")
    g.add_argument("--blocks", type=int, default=24)
    g.add_argument("--hidden", type=int, default=2048)
    g.add_argument("--intermediate", type=int, default=5632)
    for name in ("run", "_child"):
        r = sub.add_parser(name)
        r.add_argument("model")
        r.add_argument("--method", default="wanda")
        r.add_argument("--out", default="/tmp/scale-out")
        r.add_argument("--resume")
        r.add_argument("--kill-at", type=int, default=0)
        r.add_argument("--mem-limit-gb", type=float, default=0)
        r.add_argument("--nsamples", type=int, default=16)
        r.add_argument("--seqlen", type=int, default=128)
        r.add_argument("--threads", type=int, default=2)
        r.add_argument("--json")
    a = sub.add_parser("all")
    a.add_argument("--root", default="/tmp/secateurs-scale")
    a.add_argument("--blocks", default="12,24,48")
    a.add_argument("--hidden", type=int, default=2048)
    a.add_argument("--intermediate", type=int, default=5632)
    a.add_argument("--methods", default="wanda,sparsegpt")
    a.add_argument("--depth-methods", default="wanda", help="methods run at every depth (others at --resume-blocks)")
    a.add_argument("--resume-blocks", type=int, default=24)
    a.add_argument("--limit-method", default="wanda")
    a.add_argument("--mem-limit-gb", type=float, default=2.0)
    a.add_argument("--nsamples", type=int, default=16)
    a.add_argument("--seqlen", type=int, default=128)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--keep", action="store_true", help="keep the generated models")
    a.add_argument("--json")
    args = ap.parse_args()
    if args.cmd == "gen":
        print(gen(Path(args.dir), args.blocks, args.hidden, args.intermediate))
    elif args.cmd == "_child":
        _child(args)
    elif args.cmd == "run":
        r = run(
            Path(args.model),
            args.method,
            Path(args.out),
            resume=Path(args.resume) if args.resume else None,
            kill_at=args.kill_at,
            mem_limit=int(args.mem_limit_gb * (1 << 30)),
            nsamples=args.nsamples,
            seqlen=args.seqlen,
            threads=args.threads,
        )
        print(json.dumps(r, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=1))
    else:
        all_figures(args)


if __name__ == "__main__":
    main()
