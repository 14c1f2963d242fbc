import math

import pytest
import torch
import transformers

from core.pruning.config import EvalConfig
from core.pruning.errors import EvaluationError
from core.pruning.evaluate import eval_tokens, perplexity


def test_perplexity_is_token_mean_nll_over_non_overlapping_windows(tiny_model):
    d = tiny_model("llama")
    model = transformers.LlamaForCausalLM.from_pretrained(d).eval()
    ids = torch.randint(4, 300, (1000,))
    res = perplexity(model, ids, seqlen=64, batch_size=4)
    assert res["windows"] == 1000 // 64 and res["tokens_scored"] == 15 * 63
    with torch.no_grad():  # transformers' own loss per window, averaged (all windows have 63 targets)
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids[: 15 * 64].view(15, 64)]
    assert res["perplexity"] == pytest.approx(math.exp(sum(losses) / 15), rel=1e-5)
    assert perplexity(model, ids, 64, max_windows=3)["windows"] == 3


def test_too_little_text_is_a_clear_error(tiny_model):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model("llama"))
    with pytest.raises(EvaluationError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seqlen=64)


@pytest.mark.slow
def test_reference_number_on_stories260k(stories260k, text_dir):
    """The assets' README reports 7.6956 for stories260K on the whole tinystories-valid file, raw, 256."""
    tok = transformers.AutoTokenizer.from_pretrained(stories260k)
    model = transformers.AutoModelForCausalLM.from_pretrained(stories260k).eval()
    ids, proto = eval_tokens(EvalConfig(source=str(text_dir / "tinystories-valid.txt")), tok)
    res = perplexity(model, ids, 256, batch_size=32)
    assert res["windows"] == 1578
    assert res["perplexity"] == pytest.approx(7.6956, abs=5e-4)
