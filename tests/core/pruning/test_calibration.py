import json
import time

import numpy as np
import pytest
import torch

from core.pruning import calibration
from core.pruning.config import CalibrationConfig
from core.pruning.errors import CalibrationError
from tests.fixtures.tiny_models import CORPUS, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def build(tok, max_pos=None, **kw):
    return calibration.build(CalibrationConfig(**kw), tok, max_pos)


def test_text_file_gives_fixed_windows_from_the_tokenised_text(tok, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(CORPUS)
    cal = build(tok, source=str(f), nsamples=5, seqlen=16)
    ids = tok(CORPUS, return_tensors="pt").input_ids[0]
    assert cal.tokens.shape == (5, 16) and cal.tokens.dtype == torch.int64
    joined = ",".join(map(str, ids.tolist()))
    for row in cal.tokens:  # every window is a contiguous slice of the tokenised text
        assert ",".join(map(str, row.tolist())) in joined
    assert cal.protocol["padding"] is False and cal.protocol["seed"] == 0


def test_seed_makes_sampling_reproducible(tok, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(CORPUS)
    a = build(tok, source=str(f), nsamples=6, seqlen=8, seed=3).tokens
    b = build(tok, source=str(f), nsamples=6, seqlen=8, seed=3).tokens
    c = build(tok, source=str(f), nsamples=6, seqlen=8, seed=4).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seqlen_is_capped_at_the_model_limit_and_recorded(tok):
    cal = build(tok, max_pos=32, texts=[CORPUS], nsamples=2, seqlen=2048)
    assert cal.tokens.shape == (2, 32)
    assert cal.protocol["seqlen"] == 32 and cal.protocol["seqlen_requested"] == 2048


def test_jsonl_documents_and_inline_texts(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": CORPUS[i * 100 : (i + 1) * 100]}) for i in range(8)))
    assert build(tok, source=str(f), nsamples=3, seqlen=16).tokens.shape == (3, 16)
    assert build(tok, texts=[CORPUS], nsamples=3, seqlen=16).tokens.shape == (3, 16)


def test_pretokenised_windows_are_used_exactly(tok, tmp_path):
    ids = torch.randint(0, 300, (4, 20))
    torch.save(ids, tmp_path / "ids.pt")
    cal = build(tok, source=str(tmp_path / "ids.pt"), nsamples=3, seqlen=16)
    assert torch.equal(cal.tokens, ids[:3, :16])
    np.save(tmp_path / "flat.npy", np.arange(1000) % 300)
    cal = build(tok, source=str(tmp_path / "flat.npy"), nsamples=4, seqlen=10)
    assert cal.tokens.shape == (4, 10)
    assert ((cal.tokens[:, 1:] - cal.tokens[:, :-1]) % 300 == 1).all()  # contiguous slices


@pytest.mark.parametrize(
    "content,msg",
    [
        ("", "empty"),
        ("short text", "not more than seqlen"),
    ],
)
def test_bad_text_files_fail_clearly(tok, tmp_path, content, msg):
    f = tmp_path / "c.txt"
    f.write_text(content)
    with pytest.raises(CalibrationError, match=msg):
        build(tok, source=str(f), nsamples=2, seqlen=64)


def test_bad_jsonl_and_token_files_fail_clearly(tok, tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(CalibrationError, match="line 2"):
        build(tok, source=str(tmp_path / "b.jsonl"))
    torch.save(torch.rand(3, 4), tmp_path / "f.pt")
    with pytest.raises(CalibrationError, match="integer"):
        build(tok, source=str(tmp_path / "f.pt"))
    with pytest.raises(CalibrationError, match="neither a named set"):
        build(tok, source=str(tmp_path / "missing.txt"))


def test_unreachable_named_set_fails_fast_and_says_how_to_use_a_file(tok, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # cached-only, with an empty cache: the hub is out of reach
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    t = time.perf_counter()
    with pytest.raises(CalibrationError, match="local file"):
        build(tok, source="wikitext2", nsamples=2, seqlen=16)
    assert time.perf_counter() - t < 60


def test_config_rejects_empty_inline_texts():
    with pytest.raises(ValueError, match="non-empty"):
        CalibrationConfig(texts=["  ", ""])
