"""Structured pruning of a loaded model, in place: one dense calibration pass (block by block, with the engine's
walker) collects block influence and channel statistics; then whole blocks go, then MLP channels and key/value
groups in every remaining block. The result is a smaller dense model that stock transformers loads from its
edited config. Configs hold one intermediate size and one head count for all blocks, so every block loses the
same number of channels/heads (chosen per block by score)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.pruning import models
from core.pruning.config import StructureConfig
from core.pruning.errors import InvalidModelError
from core.pruning.progress import Progress, ProgressFn, StopFn, never_stop, no_progress
from core.pruning.structured import arch, depth, width
from core.pruning.structured.measure import generation_speed, weight_bytes
from core.pruning.structured.scores import ChannelStats, Influence
from core.pruning.walk import BlockInputs, hooked, walk_blocks


def _count(frac: float, n: int) -> int:
    """round(frac·n), at least 1 when frac > 0 and at most n − 1."""
    return min(max(round(frac * n), 1 if frac > 0 else 0), n - 1)


def plan(model: nn.Module, cfg: StructureConfig) -> dict[str, Any]:
    """Check, before touching the model, that transformers can express the requested shapes; return the plan."""
    _, blocks = models.find_blocks(model)
    b0, conf = blocks[0], model.config
    p: dict[str, Any] = {"n_blocks": len(blocks), "notes": []}
    p["blocks_remove"] = _count(cfg.blocks, len(blocks))
    p["mlp"] = p["attn"] = None
    if cfg.mlp_channels:
        spec = arch.find_mlp(b0)
        if spec is None:
            raise InvalidModelError(f"no known MLP layout in {type(b0).__name__}: cannot prune MLP channels")
        hidden, n = models.get_weight(b0.get_submodule(spec.out)).shape
        k = _count(cfg.mlp_channels, n)
        ref = arch.reference(model, arch.edited(conf, **{spec.size_key: n - k}))
        if arch.shapes_in_block0(ref, [spec.out])[spec.out] != (hidden, n - k):
            raise InvalidModelError(
                f"config key {spec.size_key!r} does not set the MLP width of {type(model).__name__}"
            )
        p["mlp"] = {
            "spec": spec,
            "before": n,
            "remove": k,
            "compensate": cfg.bias_compensation and _bias_ok(model, spec.out, spec.bias_flag, p, "MLP"),
        }
    if cfg.heads:
        attn = arch.find_attn(b0)
        if attn is None:
            raise InvalidModelError(
                f"{type(model).__name__}: attention heads cannot be removed: its config derives head_dim from "
                "hidden_size / num_attention_heads (or fuses q, k, v), so stock transformers could not load fewer heads"
            )
        h, kv, hd = arch.head_layout(conf)
        want = _count(cfg.heads, kv)
        removed: int | None = None
        why: str | None = None
        for cand in sorted(range(1, kv), key=lambda c: (abs(c - want), c)):  # nearest count transformers accepts
            try:
                _check_heads(model, attn, h - cand * (h // kv), kv - cand, hd)
                removed = cand
                break
            except InvalidModelError as e:
                why = why or str(e)
        if removed is None:
            raise InvalidModelError(f"{type(model).__name__}: no head count below {h} can be saved: {why}")
        if removed != want:
            p["notes"].append(f"heads: {want} of {kv} key/value groups requested, {removed} removed instead ({why})")
        p["attn"] = {
            "spec": attn,
            "layout": (h, kv, hd),
            "remove": removed,
            "requested": want,
            "compensate": cfg.bias_compensation and _bias_ok(model, attn.o, attn.bias_flag, p, "attention"),
        }
        if kv < h:
            p["notes"].append(
                f"grouped-query attention: removing {removed} of {kv} key/value groups, each with its "
                f"{h // kv} query heads"
            )
    if cfg.heads or cfg.mlp_channels:
        p["notes"].append(
            "the config holds one size for all blocks: every block loses the same number of "
            "channels/heads, chosen per block by score"
        )
    return p


def _check_heads(model: nn.Module, spec: arch.Attn, h2: int, kv2: int, hd: int) -> None:
    _, blocks = models.find_blocks(model)
    ref = arch.reference(model, arch.edited(model.config, num_attention_heads=h2, num_key_value_heads=kv2, head_dim=hd))
    got = arch.shapes_in_block0(ref, [spec.q, spec.k, spec.o])
    hidden = models.get_weight(blocks[0].get_submodule(spec.o)).shape[0]
    if got != {spec.q: (h2 * hd, hidden), spec.k: (kv2 * hd, hidden), spec.o: (hidden, h2 * hd)}:
        raise InvalidModelError(f"{type(model).__name__}: its config cannot express {h2} heads of size {hd}")


def _bias_ok(model: nn.Module, out: str, flag: str | None, p: dict, what: str) -> bool:
    _, blocks = models.find_blocks(model)
    if blocks[0].get_submodule(out).bias is not None:
        return True
    if flag and arch.has_bias(arch.reference(model, arch.edited(model.config, **{flag: True})), out):
        p.setdefault("bias_flags", []).append(flag)
        return True
    p["notes"].append(f"{what} bias compensation skipped: {type(model).__name__}'s config cannot add a bias to {out}")
    return False


def collect(
    model: nn.Module,
    tokens: torch.Tensor,
    p: dict,
    *,
    device: torch.device,
    batch_size: int,
    on_progress: ProgressFn,
    should_stop: StopFn,
) -> tuple[list[float], list[dict[str, ChannelStats]]]:
    """Dense pass, one block on the device at a time: influence of each block, statistics of the inputs of each
    block's MLP output projection and attention output projection."""
    n_blocks = len(models.find_blocks(model)[1])
    influence, stats = [], []
    watch = {k: p[k]["spec"].out if k == "mlp" else p[k]["spec"].o for k in ("mlp", "attn") if p[k]}

    def measure_block(i: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
        st = {k: ChannelStats(models.in_features(block.get_submodule(n))) for k, n in watch.items()}
        with hooked({k: block.get_submodule(n) for k, n in watch.items()}, lambda k, x: st[k].add(x)):
            outs = inputs.run(block)
        bi = Influence()
        for h_in, h_out in zip(inputs.hidden, outs, strict=True):
            bi.add(h_in, h_out)
        influence.append(bi.value)
        stats.append(st)
        on_progress(
            Progress(
                "structure",
                f"statistics of block {i + 1}/{n_blocks}",
                block=i,
                total_blocks=n_blocks,
                data={"influence": bi.value},
            )
        )
        return outs

    walk_blocks(model, tokens, measure_block, device=device, batch_size=batch_size, should_stop=should_stop)
    return influence, stats


def apply_structure(
    model: nn.Module,
    tokens: torch.Tensor,
    cfg: StructureConfig,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    on_progress: ProgressFn = no_progress,
    should_stop: StopFn = never_stop,
    evaluate: Callable[[nn.Module], float] | None = None,
    measure_speed: bool = False,
    speed: dict | None = None,
) -> dict[str, Any]:
    """Prune `model` in place. tokens: calibration windows [n, seqlen]. evaluate(model) -> perplexity, if given,
    runs before and after; measure_speed times prefill/decode before and after (kwargs of generation_speed in
    `speed`). Returns the metrics."""
    device = torch.device(device or "cpu")
    p = plan(model, cfg)
    m: dict[str, Any] = {
        "config": cfg.model_dump(),
        "notes": p["notes"],
        "params_before": models.count_params(model),
        "weight_bytes_before": weight_bytes(model),
    }
    if evaluate:
        m["perplexity_before"] = evaluate(model)
    if measure_speed:
        m["speed_before"] = generation_speed(model, **(speed or {}))
    t0 = time.perf_counter()
    influence, stats = collect(
        model, tokens, p, device=device, batch_size=batch_size, on_progress=on_progress, should_stop=should_stop
    )
    m["block_influence"] = influence

    removed_blocks = depth.least_influential(influence, p["blocks_remove"])
    if removed_blocks:
        depth.drop_blocks(model, removed_blocks)
        stats = [s for i, s in enumerate(stats) if i not in set(removed_blocks)]
    m["blocks"] = {"before": p["n_blocks"], "after": p["n_blocks"] - len(removed_blocks), "removed": removed_blocks}

    _, blocks = models.find_blocks(model)
    conf: Any = model.config
    for flag in p.get("bias_flags", []):
        setattr(conf, flag, True)
    if p["mlp"]:
        q = p["mlp"]
        for i, b in enumerate(blocks):
            width.prune_mlp(b, q["spec"], stats[i].get("mlp"), q["remove"], cfg.score, q["compensate"])
        setattr(conf, q["spec"].size_key, q["before"] - q["remove"])
        m["mlp"] = {
            "before": q["before"],
            "after": q["before"] - q["remove"],
            "removed_per_block": q["remove"],
            "config_key": q["spec"].size_key,
            "bias_compensation": q["compensate"],
        }
    if p["attn"]:
        q = p["attn"]
        h, kv, hd = q["layout"]
        gone = [
            width.prune_heads(b, q["spec"], stats[i].get("attn"), q["remove"], q["layout"], cfg.score, q["compensate"])
            for i, b in enumerate(blocks)
        ]
        conf.num_attention_heads = h - q["remove"] * (h // kv)
        if hasattr(conf, "num_key_value_heads"):
            conf.num_key_value_heads = kv - q["remove"]
        conf.head_dim = hd
        m["heads"] = {
            "heads_before": h,
            "heads_after": conf.num_attention_heads,
            "kv_heads_before": kv,
            "kv_heads_after": kv - q["remove"],
            "kv_groups_requested": q["requested"],
            "kv_groups_removed": q["remove"],
            "head_dim": hd,
            "removed_groups": gone,
            "bias_compensation": q["compensate"],
        }
    arch.sync_with_reference(model)
    m["uniform_per_block"] = bool(p["mlp"] or p["attn"])
    m["seconds"] = time.perf_counter() - t0
    m["params_after"] = models.count_params(model)
    m["weight_bytes_after"] = weight_bytes(model)
    m["params_ratio"] = m["params_after"] / m["params_before"]
    if evaluate:
        m["perplexity_after"] = evaluate(model)
    if measure_speed:
        m["speed_after"] = generation_speed(model, **(speed or {}))
    on_progress(
        Progress("structure", "done", data={"params_before": m["params_before"], "params_after": m["params_after"]})
    )
    return m
