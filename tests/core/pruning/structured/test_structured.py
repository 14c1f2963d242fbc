"""Structured pruning: every tiny architecture comes out smaller with exactly the requested shapes, stock
transformers reloads it, and the reloaded model gives the logits of the in-memory pruned one."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from core.pruning import models
from core.pruning.config import StructureConfig
from core.pruning.errors import InvalidModelError
from core.pruning.structured import apply_structure
from core.pruning.structured.measure import dir_bytes, generation_speed

transformers.logging.set_verbosity_error()
V = 96


def _llama(heads=8, kv=4):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=8,
            max_position_embeddings=64,
        )
    )


ARCHS = {  # name: (builder, MLP module in a block, intermediate config key)
    "llama": (_llama, "mlp.down_proj", "intermediate_size"),
    "opt": (
        lambda: OPTForCausalLM(
            OPTConfig(
                vocab_size=V,
                hidden_size=32,
                ffn_dim=48,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            )
        ),
        "fc2",
        "ffn_dim",
    ),
    "gpt2": (
        lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_inner=48, n_layer=4, n_head=4, n_positions=64)),
        "mlp.c_proj",
        "n_inner",
    ),
    "gpt_neox": (
        lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        ),
        "mlp.dense_4h_to_h",
        "intermediate_size",
    ),
    "bert": (
        lambda: BertForMaskedLM(
            BertConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        ),
        "output.dense",
        "intermediate_size",
    ),
}


def _build(name):
    torch.manual_seed(0)
    return ARCHS[name][0]().eval()


def _calib(n=4, seqlen=16, seed=1):
    return torch.randint(0, V, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _reload_same(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    ids = _calib(2, 12, seed=7)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, again(input_ids=ids).logits
    assert torch.equal(a, b)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    return again


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("score", ["activation", "weight"])
def test_width_and_depth_reload(arch, score, tmp_path):
    model = _build(arch)
    _, mlp_out, key = ARCHS[arch]
    before = models.count_params(model)
    m = apply_structure(
        model,
        _calib(),
        StructureConfig(mlp_channels=0.25, blocks=0.25, score=score, bias_compensation=score == "activation"),
    )
    _, blocks = models.find_blocks(model)
    assert len(blocks) == 3 and model.config.num_hidden_layers == 3
    assert getattr(model.config, key) == 36
    for b in blocks:
        assert models.in_features(b.get_submodule(mlp_out)) == 36
    assert m["blocks"]["after"] == 3 and len(m["blocks"]["removed"]) == 1
    assert m["mlp"] == {
        "before": 48,
        "after": 36,
        "removed_per_block": 12,
        "config_key": key,
        "bias_compensation": score == "activation",
    }
    assert m["params_before"] == before and m["params_after"] == models.count_params(model) < before
    assert m["weight_bytes_after"] < m["weight_bytes_before"] and m["uniform_per_block"]
    assert len(m["block_influence"]) == 4
    again = _reload_same(model, tmp_path)
    assert len(models.find_blocks(again)[1]) == 3


def test_llama_gqa_heads(tmp_path):
    model = _build("llama")
    m = apply_structure(model, _calib(), StructureConfig(heads=0.5))  # 2 of 4 KV groups, 4 of 8 query heads
    assert m["heads"]["heads_after"] == 4 and m["heads"]["kv_heads_after"] == 2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 8)
    for b in models.find_blocks(model)[1]:
        a = b.self_attn
        assert (a.q_proj.weight.shape, a.k_proj.weight.shape, a.v_proj.weight.shape, a.o_proj.weight.shape) == (
            (32, 64),
            (16, 64),
            (16, 64),
            (64, 32),
        )
    assert any("key/value groups" in n for n in m["notes"])
    _reload_same(model, tmp_path)
    assert generation_speed(model, prompt_len=8, new_tokens=4, repeats=1)["decode_tokens_per_s"] > 0


def test_heads_rounded_to_what_transformers_accepts():
    model = _build("llama")  # hidden 64: 6 heads are refused by transformers 5 (64 % 6), 4 are fine
    m = apply_structure(model, _calib(), StructureConfig(heads=0.25))
    h = m["heads"]["heads_after"]
    assert 64 % h == 0 or int(transformers.__version__.split(".")[0]) < 5
    assert m["heads"]["kv_groups_requested"] == 1 and m["heads"]["kv_groups_removed"] == (4 - h // 2)
    if h != 6:
        assert any("requested" in n for n in m["notes"])


def test_heads_refused_where_config_cannot_express_them():
    for arch in ("opt", "gpt2", "gpt_neox", "bert"):
        model = _build(arch)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InvalidModelError):
            apply_structure(model, _calib(), StructureConfig(heads=0.25))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched


def test_scores_pick_the_dead_parts():
    model = _build("llama")
    _, blocks = models.find_blocks(model)
    with torch.no_grad():
        for b in blocks:
            b.mlp.gate_proj.weight[:12] = 0  # channels 0..11 output silu(0)·up = 0: no activation
            b.self_attn.v_proj.weight[8:16] = 0  # key/value group 1 contributes nothing
        blocks[2].self_attn.o_proj.weight.zero_()  # block 2 is the identity
        blocks[2].mlp.down_proj.weight.zero_()
    m = apply_structure(model, _calib(), StructureConfig(mlp_channels=0.25, heads=0.25, blocks=0.25))
    assert m["blocks"]["removed"] == [2]
    assert (
        m["block_influence"][2] == pytest.approx(0.0, abs=1e-6) and min(m["block_influence"]) == m["block_influence"][2]
    )
    if m["heads"]["kv_heads_after"] == 3:
        assert all(g == [1] for g in m["heads"]["removed_groups"])
    else:
        assert all(1 in g for g in m["heads"]["removed_groups"])
    # only live channels are left: no zero row in any gate
    assert all(bool((b.mlp.gate_proj.weight.abs().sum(1) > 0).all()) for b in models.find_blocks(model)[1])


def test_weight_score_drops_small_columns():
    model = _build("gpt2")
    _, blocks = models.find_blocks(model)
    with torch.no_grad():
        for b in blocks:
            b.mlp.c_proj.weight[:12] *= 1e-4  # Conv1D: rows of the stored weight are input channels
    apply_structure(model, _calib(), StructureConfig(mlp_channels=0.25, score="weight"))
    for b in models.find_blocks(model)[1]:
        assert float(b.mlp.c_proj.weight.detach().abs().min(1).values.max()) > 0
        assert float(b.mlp.c_proj.weight.detach().abs().mean(1).min()) > 1e-3


def test_bias_compensation_helps_when_channels_are_constant(tmp_path):
    """Channels with a large mean and no variance: compensation keeps the output, removal without it does not."""
    outs = {}
    for comp in (False, True):
        model = _build("opt")
        _, blocks = models.find_blocks(model)
        with torch.no_grad():
            for b in blocks:
                b.fc1.weight[:12] = 0
                b.fc1.bias[:12] = 3.0  # ReLU(3) = 3 for every token
        ids = _calib(2, 12, seed=3)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        apply_structure(model, _calib(), StructureConfig(mlp_channels=0.25, bias_compensation=comp))
        with torch.no_grad():
            outs[comp] = float((model(input_ids=ids).logits - ref).abs().max())
        if comp:
            _reload_same(model, tmp_path)
    assert outs[True] < 1e-4 < outs[False]


def test_llama_bias_compensation_sets_mlp_bias(tmp_path):
    model = _build("llama")
    m = apply_structure(model, _calib(), StructureConfig(mlp_channels=0.25, bias_compensation=True))
    assert m["mlp"]["bias_compensation"] and model.config.mlp_bias is True
    b = models.find_blocks(model)[1][0]
    assert b.mlp.down_proj.bias is not None and torch.count_nonzero(b.mlp.down_proj.bias) > 0
    assert torch.count_nonzero(b.mlp.up_proj.bias) == 0  # the config gives them biases too: zeros
    _reload_same(model, tmp_path)


@pytest.mark.slow
def test_stories260k_real_model(stories260k, text_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.pruning.evaluate import perplexity

    tok = AutoTokenizer.from_pretrained(stories260k)
    ids = tok(text_dir.joinpath("tinystories-valid.txt").read_text()[:60_000], return_tensors="pt").input_ids[0]
    calib, evalw = ids[: 8 * 128].view(8, 128), ids[8 * 128 :]
    model = AutoModelForCausalLM.from_pretrained(stories260k).eval()

    def ppl(m):
        return perplexity(m, evalw, 128, max_windows=16)["perplexity"]

    m = apply_structure(
        model,
        calib,
        StructureConfig(mlp_channels=0.25, heads=0.5, blocks=0.2),
        evaluate=ppl,
        measure_speed=True,
        speed={"prompt_len": 32, "new_tokens": 8, "repeats": 1},
    )
    assert model.config.intermediate_size == 129 and model.config.num_hidden_layers == 4
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert m["perplexity_before"] < m["perplexity_after"] < 1e4  # damaged, not destroyed
    assert m["speed_before"]["decode_tokens_per_s"] > 0 and m["speed_after"]["prefill_tokens_per_s"] > 0
    assert m["params_after"] < 0.75 * m["params_before"]
    again = _reload_same(model, tmp_path)
    assert dir_bytes(tmp_path) < dir_bytes(stories260k)
    assert ppl(again) == pytest.approx(m["perplexity_after"])


def test_qwen2_layer_types_and_bias_notes(tmp_path):
    """Per-layer config lists follow the removed blocks; q/k/v biases are cut with their heads; an o_proj the
    config cannot give a bias means no attention compensation, said in the notes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=V,
            hidden_size=64,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=64,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        )
    ).eval()
    types = list(getattr(model.config, "layer_types", None) or [])  # transformers < 4.53 has none
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    m = apply_structure(model, _calib(), StructureConfig(heads=0.5, blocks=0.25, bias_compensation=True))
    assert m["blocks"]["removed"] == [1]
    assert list(getattr(model.config, "layer_types", None) or []) == [types[i] for i in (0, 2, 3) if types]
    assert any("attention bias compensation skipped" in n for n in m["notes"]) and not m["heads"]["bias_compensation"]
    a = model.model.layers[0].self_attn
    assert a.q_proj.bias.shape == (32,) and a.k_proj.bias.shape == (16,)
    again = _reload_same(model, tmp_path)
    assert list(getattr(again.config, "layer_types", None) or []) == [types[i] for i in (0, 2, 3) if types]
