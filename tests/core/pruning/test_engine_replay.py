"""The engine's block-by-block replay reproduces the model's own forward pass exactly: what each block
receives (masks, positions, rotary embeddings) is captured per block, not assumed."""

import sys

import pytest
import torch
import transformers

from core.pruning import engine, models, walk
from tests.conftest import require

SLIDING = {
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        architectures=["Qwen2ForCausalLM"],
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        architectures=["Gemma3ForCausalLM"],
    ),
}


def build_sliding(name):
    spec = dict(SLIDING[name])
    arch = spec.pop("architectures")[0]
    cfg = transformers.AutoConfig.for_model(spec.pop("model_type"), vocab_size=300, max_position_embeddings=128, **spec)
    torch.manual_seed(0)
    return getattr(transformers, arch)(cfg).eval()


def replay_matches_forward(model, seqlen=48):
    tokens = torch.randint(4, 290, (4, seqlen))
    _, blocks = models.find_blocks(model)
    inputs = walk.capture(model, blocks, tokens, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        ref = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
        for i, block in enumerate(blocks[:-1]):  # the last hidden state has the final norm applied
            inputs.hidden = inputs.run(block)
            got = torch.cat(inputs.hidden)
            assert torch.allclose(got, ref[i + 1], atol=1e-5), (i, (got - ref[i + 1]).abs().max())


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gpt_neox", "bert"])
def test_replay_equals_forward(tiny_model, arch):
    d = tiny_model(arch)
    cfg = transformers.AutoConfig.from_pretrained(d)
    replay_matches_forward(getattr(transformers, cfg.architectures[0]).from_pretrained(d).eval())


@pytest.mark.parametrize("name", list(SLIDING))
def test_replay_equals_forward_with_per_block_attention_types(name):
    try:
        model = build_sliding(name)
    except (ValueError, TypeError, AttributeError) as e:  # older transformers without this architecture
        require(False, f"{name} not buildable here: {e}")
    replay_matches_forward(model)


def test_layers_reading_one_input_share_one_statistic(tiny_model):
    from core.pruning.config import PruneConfig
    from core.pruning.methods import get

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model("llama")).eval()
    _, blocks = models.find_blocks(model)
    inputs = walk.capture(model, blocks, torch.randint(4, 290, (4, 32)), torch.device("cpu"), batch_size=2)
    layers = models.prunable_layers(blocks[0])
    shared = engine.SharedStats(get("sparsegpt")(PruneConfig(model="m", sparsity=0.5)), layers, torch.device("cpu"))
    with torch.no_grad(), walk.hooked(layers, shared.add):
        inputs.run(blocks[0], keep=False)
    st = shared.per_layer()
    assert st["self_attn.q_proj"] is st["self_attn.k_proj"] is st["self_attn.v_proj"]
    assert st["mlp.gate_proj"] is st["mlp.up_proj"]
    distinct = {id(st[n]) for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    assert len(distinct) == 4
    assert all(s.n == 4 for s in st.values())  # every sequence counted once per statistic


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_statistics_pass_stops_early_but_sees_every_input(tiny_model, arch):
    d = tiny_model(arch)
    cfg = transformers.AutoConfig.from_pretrained(d)
    model = getattr(transformers, cfg.architectures[0]).from_pretrained(d).eval()
    _, blocks = models.find_blocks(model)
    inputs = walk.capture(model, blocks, torch.randint(4, 290, (6, 32)), torch.device("cpu"), batch_size=2)
    layers = models.prunable_layers(blocks[0])
    first = next(iter(layers))  # the first linear in call order: later batches need nothing after it
    full, early = {}, {}
    with torch.no_grad(), walk.hooked(layers, lambda n, x: full.setdefault(n, []).append(x.clone())):
        inputs.run(blocks[0], keep=False)
    ran = []
    last = list(layers.values())[-1]
    handle = last.register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad():
        inputs.collect(blocks[0], layers, lambda n, x: early.setdefault(n, []).append(x.clone()))
        inputs.collect(blocks[0], {first: layers[first]}, lambda n, x: None)
    handle.remove()
    assert full.keys() == early.keys()
    for n in full:
        assert len(full[n]) == len(early[n]) == 3 and all(
            torch.equal(a, b) for a, b in zip(full[n], early[n], strict=True)
        )
    assert len(ran) == 2  # the last linear's own product ran only in the first batch of each pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps; Linux only")
def test_masks_spilled_block_by_block_equal_those_kept_in_memory(tiny_model, tmp_path):
    from core.pruning.config import PruneConfig
    from core.pruning.memory import file_mapped
    from core.pruning.methods import get

    tokens = torch.randint(4, 290, (4, 32))

    def run(spill_dir):
        model = transformers.LlamaForCausalLM.from_pretrained(tiny_model("llama")).eval()
        method = get("sparsegpt")(PruneConfig(model="m", sparsity=0.5))
        return engine.prune_blocks(
            model,
            tokens,
            method,
            device=torch.device("cpu"),
            block_sparsity=[0.5, 0.5],
            nm=None,
            exclude=[],
            overrides={},
            batch_size=2,
            spill_dir=spill_dir,
        )

    kept, spilled = run(None), run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks-00000.safetensors", "masks-00001.safetensors"]
    assert kept.masks.keys() == spilled.masks.keys() and len(kept.masks) == 14
    assert all(torch.equal(kept.masks[k], spilled.masks[k]) for k in kept.masks)
    assert all(file_mapped(list(spilled.masks.values())))
