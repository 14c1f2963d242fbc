"""Loading models and finding, generically, the repeated blocks and the linears inside them we may prune."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from core.pruning import memory
from core.pruning.errors import InvalidModelError, ModelNotFoundError
from core.pruning.locations import is_local_model

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment, misc]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    causal: bool  # has an LM head we can score perplexity with
    source: str  # resolved local directory or hub id


def load(model_id: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None) -> Loaded:
    """Load a checkpoint (local directory or hub id) on CPU; blocks are moved to the device one at a time."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model_id.removeprefix("file://")).expanduser()
    looks_local = is_local_model(model_id)
    if looks_local and not path.is_dir():
        raise ModelNotFoundError(f"model directory {model_id!r} does not exist")
    if looks_local and not (path / "config.json").is_file():
        raise InvalidModelError(f"{model_id!r} has no config.json: not a Hugging Face model directory")
    src = str(path) if looks_local else model_id
    kw = dict(trust_remote_code=trust_remote_code, revision=revision)
    try:
        config = AutoConfig.from_pretrained(src, **kw)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {model_id!r}: {_first_line(e)}") from e
    except (ValueError, KeyError) as e:
        raise InvalidModelError(f"{model_id!r} is not a supported model: {_first_line(e)}") from e
    torch_dtype: torch.dtype | str = DTYPES.get(dtype, "auto")
    load_kw: dict[str, Any] = dict(
        kw, low_cpu_mem_usage=True, use_safetensors=_has_safetensors(path) if looks_local else None
    )
    load_kw[_dtype_kwarg()] = torch_dtype
    cls, causal = model_class(config, trust_remote_code)
    try:
        model = cls.from_pretrained(src, **load_kw)
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {model_id!r}: {_first_line(e)}") from e
    except (ValueError, KeyError, RuntimeError) as e:
        raise InvalidModelError(f"cannot load model {model_id!r}: {_first_line(e)}") from e
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, causal=causal, source=src)


def model_class(config: object, trust_remote_code: bool) -> tuple[Any, bool]:
    """The class the checkpoint declares (so an encoder keeps its own head, or none), else a causal LM."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls, arch.endswith(("ForCausalLM", "LMHeadModel"))
    if trust_remote_code or type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM, True
    return AutoModel, False


def _dtype_kwarg() -> str:
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _has_safetensors(path: Path) -> bool | None:
    return True if any(path.glob("*.safetensors")) else None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# ---------------------------------------------------------------------------------------------- blocks


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of same-class modules that contain linears: the model's repeated blocks.
    Where the model names its text decoder (vision-language models), only lists inside it count."""
    try:
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, TypeError):
        decoder = None
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else None
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if inside is not None and id(mod) not in inside:
            continue
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or not any(is_prunable(m) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise InvalidModelError(f"no repeated blocks with linear layers found in {type(model).__name__}")
    return best


def is_prunable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (bool(Conv1D) and isinstance(m, Conv1D))


ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")  # MoE routers: tiny, and pruning them breaks routing


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if is_prunable(m) and not ROUTER.search(n)}


def get_weight(layer: nn.Module) -> torch.Tensor:
    """Weight as [out_features, in_features] (a view; Conv1D stores the transpose)."""
    w = _weight(layer).data
    return w if isinstance(layer, nn.Linear) else w.t()


def set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Write a [out, in] weight back in the layer's own layout and dtype."""
    target = _weight(layer).data
    src = w if isinstance(layer, nn.Linear) else w.t()
    if src.data_ptr() == target.data_ptr() and src.stride() == target.stride():
        return  # already pruned in place (masks_only methods)
    target.copy_(src)  # converts to the layer's dtype in the same pass


def own_weights(layers: list[nn.Module]) -> None:
    """Before the layers' weights are written: those that still lie in the checkpoint's file mapping move to
    memory of their own, and the file's pages are let go. A write into the mapping faults page by page,
    copying each page of the file first (~9 µs a page on a VM, where a fresh page costs ~1 µs: 0.7 s of a
    110M float32 model's run); writing into new memory while the mapping stays would hold both."""
    weights = [_weight(layer).data for layer in layers]
    for layer, old, mapped in zip(layers, weights, memory.file_mapped(weights), strict=True):
        if mapped:
            layer.weight.data = old.clone()
            memory.release_file_pages(old)


def _weight(layer: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, layer.weight)


def in_features(layer: nn.Module) -> int:
    return get_weight(layer).shape[1]


def select(names: list[str], exclude: list[str]) -> list[str]:
    pats = [re.compile(p) for p in exclude]
    return [n for n in names if not any(p.search(n) for p in pats)]


def override_for(name: str, overrides: dict[str, float]) -> float | None:
    """Last matching regex wins, so users can write general rules first and exceptions after."""
    hit = None
    for pat, s in overrides.items():
        if re.search(pat, name):
            hit = s
    return hit


def max_positions(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a block (embeddings, norms, rotary, head)."""
    inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
    moving = [
        t
        for mod in model.modules()
        for store in (mod._parameters, mod._buffers)
        for t in store.values()
        if t is not None and id(t) not in inside and t.device != device
    ]
    with _letting_go_of_mapped(moving, device):
        for t in moving:
            t.data = t.data.to(device)


def move(module: nn.Module, device: torch.device) -> None:
    """module.to(device). Tensors that leave the CPU let go of the checkpoint's mapped pages; else on a GPU run
    the host would hold those pages and then the copies that come back (2× the model)."""
    with _letting_go_of_mapped(list(module.parameters()) + list(module.buffers()), device):
        module.to(device)


@contextmanager
def _letting_go_of_mapped(tensors: list[torch.Tensor], device: torch.device) -> Iterator[None]:
    old = [t.data for t in tensors] if device.type != "cpu" else []
    mapped = [t for t, m in zip(old, memory.file_mapped(old), strict=True) if m]
    del old
    yield
    for t in mapped:
        memory.release_file_pages(t)


def count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
