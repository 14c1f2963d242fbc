"""The block walk every pass shares: which outputs feed the next block, and that every pass can be stopped."""

import pytest
import torch
import transformers

from core.pruning import engine, models
from core.pruning.config import CalibrationConfig, PruneConfig, ScheduleConfig, StructureConfig
from core.pruning.errors import Cancelled
from core.pruning.methods import get
from core.pruning.schedules import owl_scores
from core.pruning.shared_inputs import SharedInputs
from core.pruning.structured import apply_structure
from core.pruning.walk import walk_blocks

CPU = torch.device("cpu")


def llama(tiny_model):
    return transformers.LlamaForCausalLM.from_pretrained(tiny_model("llama")).eval()


def hidden_states(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states


@pytest.mark.parametrize("passes_on", ["pruned", "dense"])
def test_next_block_reads_the_pruned_outputs_unless_the_visit_returns_dense_ones(tiny_model, passes_on):
    model = llama(tiny_model)
    tokens = torch.randint(4, 290, (4, 32))
    dense = hidden_states(model, tokens)
    seen = {}

    def visit(i, block, inputs):
        seen[i] = torch.cat(inputs.hidden)
        outs = inputs.run(block) if passes_on == "dense" else None
        if i == 0:
            block.mlp.down_proj.weight.zero_()  # "prune" the block after measuring it
        return outs

    walk_blocks(model, tokens, visit, device=CPU, batch_size=2)
    pruned = hidden_states(model, tokens)  # the model's own forward, with block 0 as the visit left it
    assert not torch.allclose(pruned[1], dense[1], atol=1e-3)
    expected = pruned[1] if passes_on == "pruned" else dense[1]
    assert torch.allclose(seen[1], expected, atol=1e-5)
    assert torch.allclose(seen[0], dense[0], atol=1e-6)


def _owl(model, tokens, should_stop):
    owl_scores(model, tokens, batch_size=2, should_stop=should_stop)


def _structure(model, tokens, should_stop):
    apply_structure(model, tokens, StructureConfig(mlp_channels=0.25), batch_size=2, should_stop=should_stop)


def _prune(model, tokens, should_stop):
    method = get("wanda")(PruneConfig(model="m", sparsity=0.5))
    engine.prune_blocks(
        model,
        tokens,
        method,
        device=CPU,
        block_sparsity=[0.5, 0.5],
        nm=None,
        exclude=[],
        overrides={},
        batch_size=2,
        should_stop=should_stop,
    )


@pytest.mark.parametrize("walk", [_owl, _structure, _prune], ids=["owl", "structured", "prune"])
def test_every_pass_stops_between_blocks_when_asked(tiny_model, walk):
    model = llama(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    asked = []

    def stop_after_block_0():
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(Cancelled, match="before block 1"):
        walk(model, torch.randint(4, 290, (4, 32)), stop_after_block_0)
    if walk is not _prune:  # the scoring passes leave the model as it was
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_run_stopped_during_the_owl_pre_pass_never_starts_pruning(tiny_model, tmp_path, monkeypatch):
    from core.pruning.run import prune

    def pruning_started(*a, **kw):
        raise AssertionError("pruning started although the run was stopped during the OWL pre-pass")

    monkeypatch.setattr(engine, "prune_blocks", pruning_started)
    src = tiny_model("llama")
    cfg = PruneConfig(
        model=str(src),
        method="wanda",
        sparsity=0.5,
        schedule=ScheduleConfig(kind="owl"),
        calibration=CalibrationConfig(source=str(src / "calibration.txt"), nsamples=8, seqlen=32),
    )
    with pytest.raises(Cancelled, match="before block 0"):
        prune(cfg, tmp_path / "out", should_stop=lambda: True)
    assert not (tmp_path / "out").exists()


def test_layers_reading_one_tensor_are_grouped_and_views_of_it_are_not():
    shared = SharedInputs()
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    assert [shared.see(n, t) for n, t in [("q", x), ("k", x), ("o", y), ("v", x), ("up", x.view(8, 8))]] == [
        "q",
        "q",
        "o",
        "q",
        "up",
    ]
    assert shared.see("o", x) == "o"  # a layer's first input placed it
    assert shared.groups() == [["q", "k", "v"], ["o"], ["up"]]


def test_a_new_tensor_at_a_freed_address_is_not_taken_for_the_old_one():
    shared = SharedInputs()
    for name in "abcdefgh":  # each input is dropped by the caller at once: its address is free to reuse
        shared.see(name, torch.randn(64, 64))
    assert shared.groups() == [[n] for n in "abcdefgh"]


def test_true_sequential_groups_follow_the_inputs_llama_layers_share(tiny_model):
    from core.pruning.walk import capture

    model = llama(tiny_model)
    _, blocks = models.find_blocks(model)
    inputs = capture(model, blocks, torch.randint(4, 290, (4, 32)), CPU, batch_size=2)
    layers = models.prunable_layers(blocks[0])
    groups = engine.sequential_groups(blocks[0], layers, inputs)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
