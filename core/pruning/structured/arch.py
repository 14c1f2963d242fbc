"""Where the removable channels live in each architecture, how to cut layers, and whether stock transformers
can load the result (checked by building the model from the edited config on the meta device)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.pruning import models
from core.pruning.errors import InvalidModelError


@dataclass(frozen=True)
class Mlp:
    ins: tuple[str, ...]  # layers whose output features are the intermediate channels
    out: str  # layer whose input features are the intermediate channels
    size_key: str  # config attribute holding the intermediate size
    bias_flag: str | None = None  # config flag that gives the MLP biases (for bias compensation)


@dataclass(frozen=True)
class Attn:
    q: str
    k: str
    v: str
    o: str
    bias_flag: str | None = None


# block-relative names; the first spec whose layers all exist in block 0 applies
MLPS = (
    Mlp(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "intermediate_size", "mlp_bias"),  # Llama, Mistral, Qwen
    Mlp(("fc1",), "fc2", "ffn_dim"),  # OPT
    Mlp(("mlp.c_fc",), "mlp.c_proj", "n_inner"),  # GPT-2 (Conv1D)
    Mlp(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "intermediate_size"),  # GPT-NeoX
    Mlp(("intermediate.dense",), "output.dense", "intermediate_size"),  # BERT
)
ATTNS = (Attn("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "attention_bias"),)
PER_LAYER_KEYS = ("layer_types",)  # config lists with one entry per block


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


def find_mlp(block: nn.Module) -> Mlp | None:
    return next((s for s in MLPS if all(_has(block, n) for n in (*s.ins, s.out))), None)


def find_attn(block: nn.Module) -> Attn | None:
    return next((s for s in ATTNS if all(_has(block, n) for n in (s.q, s.k, s.v, s.o))), None)


def head_layout(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim)."""
    h = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    hd = getattr(config, "head_dim", None) or config.hidden_size // h
    return h, kv, hd


# ------------------------------------------------------------------------------------------ cutting


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def keep_outputs(layer: Any, idx: torch.Tensor) -> None:
    """Keep output features idx (rows of a Linear weight, columns of a Conv1D weight)."""
    conv = not isinstance(layer, nn.Linear)
    w = layer.weight.data
    layer.weight = _param(w[:, idx] if conv else w[idx], layer.weight)
    if layer.bias is not None:
        layer.bias = _param(layer.bias.data[idx], layer.bias)
    if conv:
        layer.nf = len(idx)
    else:
        layer.out_features = len(idx)


def keep_inputs(layer: Any, idx: torch.Tensor) -> None:
    """Keep input features idx (columns of a Linear weight, rows of a Conv1D weight)."""
    conv = not isinstance(layer, nn.Linear)
    w = layer.weight.data
    layer.weight = _param(w[idx] if conv else w[:, idx], layer.weight)
    if conv:
        layer.nx = len(idx)
    else:
        layer.in_features = len(idx)


def add_to_bias(layer: Any, delta: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(
            torch.zeros(delta.shape[0], dtype=layer.weight.dtype, device=layer.weight.device),
            requires_grad=layer.weight.requires_grad,
        )
    layer.bias.data += delta.to(layer.bias.dtype)


# ------------------------------------------------------------------------------- what transformers loads


def reference(model: nn.Module, config) -> nn.Module:
    """The model stock transformers builds from `config`, on the meta device (no memory)."""
    with torch.device("meta"):
        try:
            return type(model)(config)
        except Exception as e:  # noqa: BLE001 - any failure means the config cannot express the model
            raise InvalidModelError(
                f"transformers cannot build {type(model).__name__} from the edited config: {e}"
            ) from e


def edited(config, **changes):
    """The config with `changes`, passed through the same validation as saving and loading it (transformers 5
    rejects e.g. hidden_size % num_attention_heads != 0 even with an explicit head_dim): InvalidModelError if
    transformers refuses it."""
    cfg = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    try:
        cfg = type(cfg).from_dict(cfg.to_dict())
        if callable(getattr(cfg, "validate", None)):
            cfg.validate()
    except Exception as e:
        raise InvalidModelError(f"transformers rejects {changes}: {str(e).strip().splitlines()[-1].strip()}") from e
    return cfg


def shapes_in_block0(ref: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    _, blocks = models.find_blocks(ref)
    return {n: tuple(models.get_weight(blocks[0].get_submodule(n)).shape) for n in names}


def has_bias(ref: nn.Module, name: str) -> bool:
    _, blocks = models.find_blocks(ref)
    return blocks[0].get_submodule(name).bias is not None


def sync_with_reference(model: nn.Module) -> None:
    """Give the model the zero biases its config now implies (after setting a bias flag), then check that every
    tensor transformers will load has the shape we wrote."""
    ref = reference(model, model.config)
    mods = dict(model.named_modules())
    for name, r in ref.named_modules():
        m = mods.get(name)
        if m is None or not models.is_prunable(m):
            continue
        if getattr(r, "bias", None) is not None and m.bias is None:
            add_to_bias(m, torch.zeros(r.bias.shape[0]))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    bad = [k for k in theirs.keys() & ours.keys() if theirs[k] != ours[k]]
    missing = [k for k in theirs.keys() - ours.keys() if not k.endswith(("inv_freq", "masked_bias", ".attn.bias"))]
    if bad or missing:
        k = (bad or missing)[0]
        raise InvalidModelError(
            f"the pruned model does not match what transformers builds from its config: {k} "
            f"{ours.get(k)} vs {theirs.get(k)}"
        )
