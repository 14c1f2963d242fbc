"""Compact sparse checkpoint: bit-exact round trips, encodings chosen by size, transformers loads the result."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from core.pruning import compact
from core.pruning.errors import InvalidModelError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _unstructured(rows, cols, p, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[torch.rand(rows, cols, generator=g) < p] = 0
    return w


def _two_four(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    drop = torch.rand(rows, cols // 4, 4, generator=g).argsort(2)[..., :2]
    w = w.view(rows, -1, 4).scatter(2, drop, 0.0).view(rows, cols)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_bit_exact_state_dict(tmp_path, dtype):
    w24 = _two_four(16, 32, dtype)
    w24[0, 1] = 0  # a group with a single non-zero still encodes as 2:4
    w24[1, :4] = 0  # and one with none
    wu = _unstructured(24, 40, 0.6, dtype, seed=1)
    wu[0, 0], wu[0, 1], wu[0, 2] = -0.0, float("nan"), float("inf")  # odd bit patterns survive
    f8 = _unstructured(24, 40, 0.6, torch.float32, seed=2).to(torch.float8_e4m3fn)  # 1-byte values: stored raw
    sd = {
        "a.weight": w24,
        "b.weight": wu,
        "dense.weight": torch.randn(8, 8).to(dtype),
        "norm.weight": torch.ones(8, dtype=dtype),
        "ids": torch.arange(5),
        "f8.weight": f8,
    }
    summary = compact.pack_checkpoint(sd, tmp_path / "c")
    meta = compact.read_meta(tmp_path / "c")["tensors"]
    assert meta["a.weight"]["encoding"] == "2:4"
    assert meta["b.weight"]["encoding"] == meta["f8.weight"]["encoding"] == "bitmask"
    assert meta["b.weight"]["values"] == "planes-zstd" and meta["f8.weight"]["values"] == "raw"
    assert {meta[k]["encoding"] for k in ("dense.weight", "norm.weight", "ids")} == {"dense"}
    assert summary["sparse_tensors"] == 3
    back = compact.unpack_state_dict(tmp_path / "c")
    assert back.keys() == sd.keys()
    for k in sd:  # noqa: PLC0206
        assert _same_bits(back[k], sd[k]) if sd[k].is_floating_point() else torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sizes_at_half_sparsity(tmp_path, dtype):
    n = 256 * 512
    sd = {"u.weight": _unstructured(256, 512, 0.5, dtype), "s.weight": _two_four(256, 512, dtype)}
    compact.pack_checkpoint(sd, tmp_path / "c")
    meta = compact.read_meta(tmp_path / "c")["tensors"]
    stored = load_file(str(tmp_path / "c" / "compact-model.safetensors"))
    nnz = meta["u.weight"]["nnz"]
    assert meta["u.weight"]["values"] == meta["s.weight"]["values"] == "planes-zstd"
    assert stored["u.weight.values.lo"].numel() == nnz and stored["u.weight.mask"].numel() == n // 8
    assert stored["s.weight.values.lo"].numel() == n // 2 and stored["s.weight.pos"].numel() == n // 8
    # the exponent bytes of normally distributed values compress (fp16: 5 exponent bits share the byte with 2
    # mantissa bits; bf16: 7 exponent bits)
    bound = 0.75 if dtype == torch.float16 else 0.5
    assert stored["u.weight.values.hi"].numel() < bound * nnz
    assert stored["s.weight.values.hi"].numel() < bound * n // 2
    size = (tmp_path / "c" / "compact-model.safetensors").stat().st_size
    assert size < 0.5 * 2 * n * 2  # both tensors together, header included: under the 0.5625 of raw values


def test_forced_encodings_and_filter(tmp_path):
    w = _two_four(8, 16, torch.float32)
    compact.pack_checkpoint({"w": w, "x": w.clone()}, tmp_path / "c", encodings=("bitmask",), only=lambda n: n == "w")
    meta = compact.read_meta(tmp_path / "c")["tensors"]
    assert meta["w"]["encoding"] == "bitmask" and meta["x"]["encoding"] == "dense"
    assert _same_bits(compact.unpack_state_dict(tmp_path / "c")["w"], w)
    assert not compact.is_24(_unstructured(8, 16, 0.1, torch.float32))


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _prune(model, two_four: bool):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = m.weight.data
            if two_four:
                drop = w.abs().view(w.shape[0], -1, 4).argsort(2)[..., :2]
                w.copy_(w.view(w.shape[0], -1, 4).scatter(2, drop, 0.0).view_as(w))
            else:
                w[w.abs() < w.abs().float().median().to(w.dtype)] = 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two_four", [False, True])
def test_model_dir_round_trip_loads_in_transformers(tmp_path, dtype, two_four):
    model = _tiny_llama(dtype)
    _prune(model, two_four)
    model.save_pretrained(tmp_path / "dense")
    save_file({"x": torch.zeros(3, dtype=torch.uint8)}, str(tmp_path / "dense" / "masks.safetensors"))
    compact.pack_checkpoint(tmp_path / "dense", tmp_path / "c")
    assert not (tmp_path / "c" / "compact-masks.safetensors").exists()  # only the model's weight files
    meta = compact.read_meta(tmp_path / "c")["tensors"]
    want = "2:4" if two_four else "bitmask"
    assert {e["encoding"] for n, e in meta.items() if "layers" in n and n.endswith("proj.weight")} == {want}
    assert meta["model.embed_tokens.weight"]["encoding"] == "dense"
    assert (tmp_path / "c" / "config.json").is_file()

    compact.unpack(tmp_path / "c", tmp_path / "out")
    a, b = (
        load_file(str(tmp_path / "dense" / "model.safetensors")),
        load_file(str(tmp_path / "out" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)

    loaded = compact.load_compact(tmp_path / "c")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    auto = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}
    reference = type(model).from_pretrained(tmp_path / "dense", **auto)  # same loader: same buffers and dtypes
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_in_memory_model_tied_and_sharded(tmp_path):
    model = _tiny_llama(torch.float16)
    _prune(model, False)
    compact.pack_checkpoint(model, tmp_path / "c")  # a live model: tied lm_head stored once, as an alias
    meta = compact.read_meta(tmp_path / "c")
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    sd = compact.unpack_state_dict(tmp_path / "c")
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    loaded = compact.load_compact(tmp_path / "c")
    for k, v in model.state_dict().items():
        assert _same_bits(loaded.state_dict()[k], v), k

    # sharded input: the same shard files and index come back
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    compact.pack_checkpoint(tmp_path / "sharded", tmp_path / "c2")
    compact.unpack(tmp_path / "c2", tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "out2" / "model.safetensors.index.json").read_text())
    src = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src["weight_map"]
    for s in shards:
        a, b = load_file(str(tmp_path / "sharded" / s)), load_file(str(tmp_path / "out2" / s))
        assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)


def test_real_model_and_cli(tmp_path, stories260k):
    from cli.app import app

    compact.pack_checkpoint(stories260k, tmp_path / "c")  # unpruned: everything stays dense
    assert all(e["encoding"] == "dense" for e in compact.read_meta(tmp_path / "c")["tensors"].values())
    res = CliRunner().invoke(app, ["unpack", str(tmp_path / "c"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    a = load_file(str(stories260k / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    res = CliRunner().invoke(app, ["unpack", str(tmp_path), str(tmp_path / "x")])
    assert res.exit_code == 2 and "not a compact checkpoint" in res.output


def test_rejects_foreign_dirs(tmp_path):
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "compact-model.safetensors"))
    (tmp_path / "compact.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(InvalidModelError):
        compact.unpack(tmp_path, tmp_path / "o")
    with pytest.raises(InvalidModelError):
        compact.pack_checkpoint(tmp_path / "empty_does_not_exist", tmp_path / "o2")


def test_large_dense_tensors_are_stored_as_compressed_planes_unless_asked_not_to(tmp_path):
    emb = (torch.randn(512, 64) * 0.02).to(torch.float16)  # an embedding: dense, 32768 elements
    emb[0, 0] = float("nan")
    sd = {"embed.weight": emb, "norm.weight": torch.ones(64, dtype=torch.float16)}
    compact.pack_checkpoint(sd, tmp_path / "c")
    compact.pack_checkpoint(sd, tmp_path / "raw", compress_dense=False)
    meta = compact.read_meta(tmp_path / "c")["tensors"]
    assert meta["embed.weight"]["encoding"] == "dense" and meta["embed.weight"]["values"] == "planes-zstd"
    assert "values" not in meta["norm.weight"]  # small: as it is
    assert "values" not in compact.read_meta(tmp_path / "raw")["tensors"]["embed.weight"]
    assert meta["embed.weight"]["stored_bytes"] < 0.9 * emb.numel() * 2
    for d in ("c", "raw"):
        back = compact.unpack_state_dict(tmp_path / d)
        assert all(_same_bits(back[k], sd[k]) for k in sd)


def test_prune_with_compact_export_round_trips_the_exported_model(tmp_path, stories260k, text_dir):
    from core.pruning.config import CalibrationConfig, ExportConfig, PruneConfig
    from core.pruning.run import prune

    cfg = PruneConfig(
        model=str(stories260k),
        method="wanda",
        sparsity=0.5,
        device="cpu",
        calibration=CalibrationConfig(source=str(text_dir / "tinystories-valid.txt"), nsamples=8, seqlen=64),
        evaluation=None,
        export=ExportConfig(compact=True),
    )
    res = prune(cfg, tmp_path / "out")
    out = res.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(f["name"].startswith("compact/") and f["kind"] == "compact" for f in manifest["files"])
    dense = load_file(str(out / "model.safetensors"))
    back = compact.unpack_state_dict(out / "compact")
    assert all(_same_bits(back[k], dense[k]) for k in dense)
    packed, whole = out / "compact" / "compact-model.safetensors", out / "model.safetensors"
    assert packed.stat().st_size < 0.6 * whole.stat().st_size
    ids = torch.randint(0, 500, (1, 16))
    ref = transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(compact.load_compact(out / "compact")(ids).logits, ref)
