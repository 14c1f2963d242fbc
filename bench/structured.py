"""Structured pruning and the compact checkpoint, measured side by side in one process.

    python bench/structured.py [--threads 2] [--rounds 3] [--models stories260k,llama100m] [--json out.json]

Table 1, per model: dense and each structure (25%/50% MLP channels, 25% heads, 25% blocks) × params, file
bytes (safetensors written by save_pretrained), perplexity, prefill and decode tokens/s on CPU. All variants sit
in memory together and are timed round-robin (same threads, same process); the best round is reported
(the machine may be shared), with the median decode rate and the decode rate per second of the process's CPU
time (steadier when other processes compete for the cores) beside it.
Table 2: compact checkpoint bytes / dense checkpoint bytes after magnitude pruning of every block linear at
50%, 70% and 2:4, in fp16 and bf16 (whole files, and the pruned tensors alone); the round trip is checked.

stories260k is the real trained model in ../shared (perplexity on TinyStories validation text); llama100m is
a randomly initialised ~99M-parameter Llama-shaped model (hidden 768, 12 blocks, 16 heads of 48 in 4 KV
groups, MLP 2048, vocab 32000, tied embeddings): its perplexity is on random tokens and only shows that the
model still runs — its speed and sizes are the point.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.pruning import compact, models, patterns
from core.pruning.config import StructureConfig
from core.pruning.evaluate import perplexity
from core.pruning.structured import apply_structure
from core.pruning.structured.measure import dir_bytes, generation_speed

SHARED = ROOT.parent / "shared" / "assets"
STRUCTURES = {
    "dense": None,
    "MLP channels 25%": StructureConfig(mlp_channels=0.25),
    "MLP channels 50%": StructureConfig(mlp_channels=0.5),
    "heads 25%": StructureConfig(heads=0.25),
    "blocks 25%": StructureConfig(blocks=0.25),
}


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = SHARED / "stories260k-hf"
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok((SHARED / "text" / "tinystories-valid.txt").read_text(), return_tensors="pt").input_ids[0]
    calib = ids[: 32 * 256].view(32, 256)
    evalw = ids[32 * 256 :]
    return (lambda: AutoModelForCausalLM.from_pretrained(d).eval()), calib, evalw, 256, 64


def load_llama100m():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=48,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    state = LlamaForCausalLM(cfg).eval().state_dict()

    def build():
        m = LlamaForCausalLM(copy.deepcopy(cfg)).eval()  # structured pruning edits the model's own config
        m.load_state_dict(state)
        return m

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 32000, (8, 256), generator=g)
    evalw = torch.randint(0, 32000, (8 * 256,), generator=g)
    return build, calib, evalw, 256, 8


def structure_table(name: str, loader, rounds: int, prompt_len: int, new_tokens: int) -> list[dict]:
    build, calib, evalw, seqlen, windows = loader()
    rows, variants = [], {}
    for label, cfg in STRUCTURES.items():
        model = build()
        m = apply_structure(model, calib, cfg, batch_size=8) if cfg else {"notes": []}
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size = dir_bytes(tmp)
        ppl = perplexity(model, evalw, seqlen, batch_size=8, max_windows=windows)["perplexity"]
        variants[label] = model
        rows.append(
            {
                "model": name,
                "structure": label,
                "params": models.count_params(model),
                "file_bytes": size,
                "perplexity": ppl,
                "notes": m["notes"],
                "shape": _shape(model),
            }
        )
    # timing: round-robin over all variants so that drifts of the machine hit all alike
    times: dict[str, list[dict]] = {k: [] for k in variants}
    for i in range(rounds):
        for label, model in variants.items():
            times[label].append(
                generation_speed(
                    model, prompt_len=prompt_len, new_tokens=new_tokens, repeats=1, warmup=2 if i == 0 else 0
                )
            )
    for r in rows:  # best round: the one least disturbed by other processes (the machine may be shared)
        t = times[r["structure"]]
        r["prefill_tok_s"] = max(x["prefill_tokens_per_s"] for x in t)
        r["decode_tok_s"] = max(x["decode_tokens_per_s"] for x in t)
        r["decode_tok_s_median"] = statistics.median(x["decode_tokens_per_s"] for x in t)
        r["decode_tok_cpu_s"] = max(x["decode_tokens_per_cpu_s"] for x in t)
    base = rows[0]
    for r in rows:
        r["params_removed"] = 1 - r["params"] / base["params"]
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_cpu_speedup"] = r["decode_tok_cpu_s"] / base["decode_tok_cpu_s"]
    return rows


def _shape(model) -> str:
    c = model.config
    return f"L{c.num_hidden_layers} H{c.num_attention_heads}/{c.num_key_value_heads} I{c.intermediate_size}"


def _prune_magnitude(model, how: str) -> None:
    _, blocks = models.find_blocks(model)
    with torch.no_grad():
        for b in blocks:
            for layer in models.prunable_layers(b).values():
                w = models.get_weight(layer)
                score = w.float().abs()
                mask = patterns.nm_mask(score, 2, 4) if how == "2:4" else patterns.lowest_per_row(score, float(how))
                w.masked_fill_(mask, 0)


def compact_table(name: str, loader) -> list[dict]:
    build = loader()[0]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for how in ("0.5", "0.7", "2:4"):
            model = build().to(dtype)
            _prune_magnitude(model, how)
            with tempfile.TemporaryDirectory() as tmp:
                dense, packed = Path(tmp) / "dense", Path(tmp) / "compact"
                model.save_pretrained(dense)
                t0 = time.perf_counter()
                s = compact.pack_checkpoint(dense, packed)
                t_pack = time.perf_counter() - t0
                meta = compact.read_meta(packed)["tensors"]
                sparse_dense_bytes = sum(
                    math.prod(e["shape"]) * (2 if dtype != torch.float32 else 4)
                    for e in meta.values()
                    if e["encoding"] != "dense"
                )
                sparse_compact = sum(_encoded_bytes(e) for e in meta.values() if e["encoding"] != "dense")
                t0 = time.perf_counter()
                sd = compact.unpack_state_dict(packed)
                t_unpack = time.perf_counter() - t0
                ref = model.state_dict()
                exact = all(
                    torch.equal(sd[k].view(torch.int16), ref[k].contiguous().view(torch.int16))
                    for k in sd
                    if sd[k].dtype == dtype
                )
                rows.append(
                    {
                        "model": name,
                        "dtype": str(dtype).removeprefix("torch."),
                        "sparsity": how,
                        "dense_file_bytes": dir_bytes(dense),
                        "compact_file_bytes": s["file_bytes_compact"],
                        "ratio_files": s["file_bytes_compact"] / dir_bytes(dense),
                        "ratio_pruned_tensors": sparse_compact / sparse_dense_bytes,
                        "encodings": s["encodings"],
                        "bit_exact": exact,
                        "pack_s": t_pack,
                        "unpack_s": t_unpack,
                    }
                )
    return rows


def _encoded_bytes(e: dict) -> int:
    """Bytes the compact format stores for one tensor (values planes, mask or positions), headers aside."""
    return e["stored_bytes"]


def _md(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join(" --- " for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="stories260k,llama100m")
    ap.add_argument("--tables", default="structure,compact")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    _quiet()
    torch.set_num_threads(a.threads)
    loaders = {"stories260k": (load_stories, 128, 64), "llama100m": (load_llama100m, 128, 32)}  # prompt, new tokens
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "structure": [], "compact": []}
    for name in a.models.split(",") if "structure" in a.tables else []:
        loader, prompt, new = loaders[name]
        rows = structure_table(name, loader, a.rounds, prompt, new)
        out["structure"] += rows
        print(
            f"\n### {name}: structured pruning (CPU, {out['threads']} threads, batch 1, prompt {prompt}, "
            f"{new} decoded tokens, best of {a.rounds} round-robin rounds; load average "
            f"{os.getloadavg()[0]:.1f})\n"
        )
        print(
            _md(
                rows,
                [
                    ("structure", "structure", ""),
                    ("shape", "shape", ""),
                    ("params", "params", ","),
                    ("params_removed", "removed", ".1%"),
                    ("file_bytes", "file bytes", ","),
                    ("perplexity", "ppl", ".2f"),
                    ("prefill_tok_s", "prefill tok/s", ".0f"),
                    ("prefill_speedup", "×", ".2f"),
                    ("decode_tok_s", "decode tok/s", ".1f"),
                    ("decode_speedup", "×", ".2f"),
                    ("decode_tok_s_median", "decode median", ".1f"),
                    ("decode_tok_cpu_s", "decode tok/CPU-s", ".1f"),
                    ("decode_cpu_speedup", "×", ".2f"),
                ],
            )
        )
        for r in rows:
            for n in r["notes"]:
                if "requested" in n:
                    print(f"- {r['structure']}: {n}")
    for name in a.models.split(",") if "compact" in a.tables else []:
        rows = compact_table(name, loaders[name][0])
        out["compact"] += rows
        print(f"\n### {name}: compact checkpoint (magnitude pruning of every block linear, per row / 2:4)\n")
        print(
            _md(
                rows,
                [
                    ("dtype", "dtype", ""),
                    ("sparsity", "sparsity", ""),
                    ("dense_file_bytes", "dense bytes", ","),
                    ("compact_file_bytes", "compact bytes", ","),
                    ("ratio_files", "ratio (files)", ".4f"),
                    ("ratio_pruned_tensors", "ratio (pruned tensors)", ".4f"),
                    ("bit_exact", "bit-exact", ""),
                    ("pack_s", "pack s", ".2f"),
                    ("unpack_s", "unpack s", ".2f"),
                ],
            )
        )
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
