"""One short check of the engine on a CUDA GPU, for a session that is lent one (bench/README.md, "GPU check").

    PYTHONPATH=.gpu-deps:. python3 bench/gpu_check.py --out "$OUT"
    python bench/gpu_check.py --device cpu --small      # a smoke test of this script, here

Needs no ../shared and no network: it builds its models (random init) and token ids itself. Prints and
writes gpu_check.json (to --out):
  1. the in-place Hessian factorisation at d = 4096 and 11008 (Llama-7B's down_proj): its error against a
     float64 reference, its time, and the device memory it takes beyond the Hessian itself;
  2. the engine, prune(), on the ~110M random Llama in bf16 with the papers' calibration (128 × 2048):
     wanda and sparsegpt × {0.5, 2:4}: prune seconds, device peak, host peak RSS, sparsity, 2:4 check;
  3. sparsegpt 2:4 on two Llama-7B-shaped blocks (hidden 4096, MLP 11008) in bf16, 128 × 2048: seconds
     per block, device peak;
  4. a tiny Llama pruned on the CPU and on the device: the share of identical mask entries.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.pruning.config import CalibrationConfig, ExportConfig, PruneConfig  # noqa: E402
from core.pruning.linalg import factor_in_place  # noqa: E402
from core.pruning.run import prune  # noqa: E402
from tests.fixtures import tiny_models  # noqa: E402

MiB = 1 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_factor(d: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2 * d, d, generator=g) @ (torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5)
    H64 = (x.t().double() @ x.double()) / x.shape[0]
    del x
    H = H64.float().to(device)
    T = H.triu()
    del H
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    U, _, damp, _ = factor_in_place(T, 0.01)
    sync(device)
    seconds = time.perf_counter() - t
    extra = (torch.cuda.max_memory_allocated(device) - base) / MiB if device.type == "cuda" else None
    damped = H64 + 0.01 * H64.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    U64 = U.double().cpu()
    err = (U64.t() @ U64 @ damped - torch.eye(d, dtype=torch.float64)).abs().max().item()
    return {
        "d": d,
        "seconds": round(seconds, 4),
        "max |UᵀU·H − I|": err,
        "extra_device_mib": extra,
        "hessian_mib": d * d * 4 / MiB,
    }


def build_llama(where: Path, dtype: torch.dtype, **shape) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True, **shape)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(where, safe_serialization=True)
    tiny_models.tokenizer().save_pretrained(where)  # the engine loads one; token ids below are given
    return where


def run_engine(model: Path, tokens: Path, method: str, pattern: str, device: str, dtype: str) -> dict:
    nm = ":" in pattern
    t = torch.load(tokens)
    cfg = PruneConfig(
        model=str(model),
        method=method,
        sparsity=None if nm else float(pattern),
        pattern=pattern if nm else None,
        device=device,
        dtype=dtype,
        calibration=CalibrationConfig(source=str(tokens), nsamples=t.shape[0], seqlen=t.shape[1]),
        evaluation=None,
        export=ExportConfig(save_model=False, masks=False),
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        res = prune(cfg, Path(tmp) / "out")
        wall = time.perf_counter() - started
    m = res.metrics
    nm_ok = None
    if nm:
        nm_ok = all(layer["sparsity"] >= 0.5 - 1e-6 for layer in m["layers"])
    return {
        "method": method,
        "pattern": pattern,
        "prune_s": m["timings"].get("prune"),
        "wall_s": round(wall, 2),
        "device_peak_mib": (m["memory"].get("cuda_peak_bytes") or 0) / MiB,
        "process_peak_rss_mib_so_far": m["memory"]["peak_rss_bytes"] / MiB,
        "sparsity": m["achieved_sparsity"],
        "every_layer_at_least_half_zero": nm_ok,
        "blocks": m["model"]["blocks"],
    }


def mask_agreement(work: Path, device: str) -> dict:
    src = tiny_models.build("llama", work / "tiny")
    from safetensors.torch import load_file

    masks = []
    for i, dev in enumerate(("cpu", device)):
        cfg = PruneConfig(
            model=str(src),
            method="sparsegpt",
            pattern="2:4",
            device=dev,
            dtype="float32",
            calibration=CalibrationConfig(source=str(src / "calibration.txt"), nsamples=8, seqlen=32),
            evaluation=None,
            export=ExportConfig(save_model=False, masks=True),
        )
        prune(cfg, work / f"tiny-{i}")
        masks.append(load_file(work / f"tiny-{i}" / "masks.safetensors"))
    same = sum(int((masks[0][k] == masks[1][k]).sum()) for k in masks[0])
    total = sum(masks[0][k].numel() for k in masks[0])
    return {"packed_mask_bytes_equal": same / total}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="tiny sizes: a smoke test of this script")
    args = p.parse_args()
    device = torch.device(args.device)
    report: dict = {
        "torch": torch.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(report, flush=True)
    small = args.small
    report["factor"] = [check_factor(d, device) for d in ((256, 512) if small else (4096, 11008))]
    print(report["factor"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n, s = (4, 64) if small else (128, 2048)
        tokens = work / "tokens.pt"
        torch.save(torch.randint(0, 32000, (n, s), generator=torch.Generator().manual_seed(0)), tokens)
        shape100m = dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=2 if small else 12,
            num_attention_heads=12,
            num_key_value_heads=12,
        )
        m100 = build_llama(work / "llama100m", torch.bfloat16, **shape100m)
        report["llama100m_bf16"] = []
        for method in ("wanda", "sparsegpt"):
            for pattern in ("0.5", "2:4"):
                r = run_engine(m100, tokens, method, pattern, args.device, "bfloat16")
                print(r, flush=True)
                report["llama100m_bf16"].append(r)
        shape7b = dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
        )
        if small:
            shape7b.update(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
        m7 = build_llama(work / "llama7b-2blocks", torch.bfloat16, **shape7b)
        r = run_engine(m7, tokens, "sparsegpt", "2:4", args.device, "bfloat16")
        r["prune_s_per_block"] = r["prune_s"] / r["blocks"]
        print(r, flush=True)
        report["llama7b_shaped_2_blocks_bf16"] = r
        report["cpu_vs_device"] = mask_agreement(work, args.device)
        print(report["cpu_vs_device"], flush=True)

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
