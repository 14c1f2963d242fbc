"""End-to-end demo on the embedded defaults: `python -m cli.demo` (or `secateurs service demo`).

Starts the API and a worker as separate processes (SQLite database, SQLite-backed Celery broker, local
artifacts, all under ./var/demo), creates a tenant and key, uploads an evaluation text, submits a real
pruning job over HTTP, streams its progress, downloads every artifact, verifies sha256s, loads the pruned
model with transformers, checks its sparsity, and prints the metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SECATEURS_SHARED_DIR", ROOT.parent / "shared"))


def _free(port: int) -> int:
    if port:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(msg, flush=True)


FALLBACK_TEXT = (
    "Once upon a time there was a little robot who liked to prune trees. It cut the branches "
    "that did not grow fruit, and the garden became lighter and faster to walk through. "
) * 40


def _build_fallback_model(dest: Path) -> None:
    """A small Llama with random weights and a byte-level BPE tokenizer trained on the spot, so the demo
    runs on a machine with neither the shared assets nor internet access."""
    if (dest / "config.json").is_file():
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [FALLBACK_TEXT],
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=5,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=len(fast),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    dest.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    fast.save_pretrained(dest)


def main(model: str | None = None, port: int = 8765, data_dir: str | None = None, sparsity: float = 0.5) -> int:
    model_dir = Path(model) if model else SHARED / "assets" / "stories260k-hf"
    data = Path(data_dir or os.environ.get("SECATEURS_DEMO_DIR") or ROOT / "var" / "demo").resolve()
    data.mkdir(parents=True, exist_ok=True)
    if not model and not model_dir.is_dir():
        model_dir = data / "models" / "tiny-llama-random"
        _say(
            f"[demo] {SHARED / 'assets'} not found: building a small random-init Llama at {model_dir} "
            "(pass --model DIR_OR_HUB_ID for a real one)"
        )
        _build_fallback_model(model_dir)
    local = model_dir.is_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECATEURS_")}
    env.update(
        SECATEURS_DATA_DIR=str(data),
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1" if local else "0"),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )
    if local:
        env["SECATEURS_ALLOWED_MODEL_ROOTS"] = str(model_dir.resolve().parent)
    os.environ.update({k: v for k, v in env.items() if k.startswith("SECATEURS_")})

    from core.auth import create_key, create_tenant
    from core.db.engine import session_scope
    from core.db.migrate import upgrade
    from core.db.repositories import TenantRepository
    from core.settings import Settings

    settings = Settings()
    settings.ensure_dirs()
    _say(f"[demo] data dir {data}")
    upgrade(settings.db_url)
    with session_scope(settings.db_url) as s:
        if TenantRepository(s).by_name("demo") is None:
            create_tenant(s, "demo")
        _, key = create_key(s, "demo", settings.pepper, "demo")
    _say("[demo] tenant 'demo' and an API key created")

    port = _free(port)
    base = f"http://127.0.0.1:{port}"
    logs = data / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def _term(signum: int, _frame: object) -> None:  # clean up the children on SIGTERM/SIGINT too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.main",
                    "worker",
                    "--loglevel=INFO",
                    "--pool=prefork",
                    "--concurrency=1",
                    "-Q",
                    settings.queue,
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--hostname=demo@%h",
                ],
                cwd=ROOT,
                env=env,
                stdout=open(logs / "worker.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api.app:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stdout=open(logs / "api.log", "w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _say(f"[demo] api on {base} and a worker started (logs in {logs})")
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=h, timeout=60) as c:
            deadline = time.time() + 60
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    _say("[demo] API did not become ready; see the logs")
                    return 1
                time.sleep(0.3)
            wlog = logs / "worker.log"
            t_w = time.perf_counter()
            while " ready." not in wlog.read_text(errors="replace"):
                if procs[0].poll() is not None or time.perf_counter() - t_w > 180:
                    _say("[demo] the worker did not start; see the logs")
                    return 1
                time.sleep(0.3)
            _say("[demo] worker ready")
            eval_cal = None
            text = SHARED / "assets" / "text" / "wikitext-2-test.txt"
            sample, fname = (
                (text.read_text("utf-8")[:60_000], "wikitext2-test-head.txt")
                if text.is_file()
                else (FALLBACK_TEXT, "demo-text.txt")
            )
            r = c.post("/v1/calibration-sets", files={"file": (fname, sample.encode())})
            r.raise_for_status()
            eval_cal = r.json()["id"]
            _say(f"[demo] uploaded evaluation text as {eval_cal}")
            cal_text = SHARED / "assets" / "text" / "tinystories-valid.txt"
            texts = [cal_text.read_text("utf-8")[:200_000]] if cal_text.is_file() else [FALLBACK_TEXT]
            body = {
                "model": str(model_dir.resolve()) if local else model,
                "method": "wanda",
                "sparsity": sparsity,
                "calibration": {"texts": texts, "nsamples": 32, "seqlen": 128, "seed": 0},
                "metadata": {"purpose": "demo"},
            }
            if eval_cal:
                body["evaluation"] = {"calibration_set_id": eval_cal, "seqlen": 128, "max_windows": 32}
            t0 = time.perf_counter()
            r = c.post("/v1/pruning-jobs", json=body, headers={"Idempotency-Key": f"demo-{time.time_ns()}"})
            if r.status_code != 201:
                _say(f"[demo] job rejected: {r.status_code} {r.text}")
                return 1
            job = r.json()
            _say(f"[demo] POST /v1/pruning-jobs -> 201 {job['id']} (Location: {r.headers['location']})")
            with c.stream("GET", f"/v1/pruning-jobs/{job['id']}/events/stream", timeout=None) as stream:
                kind = None
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        ev = json.loads(line[6:])
                        d = ev["data"]
                        if kind == "progress":
                            frac = f" {d['fraction']:.0%}" if d.get("fraction") is not None else ""
                            blk = f" block {d['block'] + 1}/{d['total_blocks']}" if d.get("block") is not None else ""
                            _say(
                                f"[demo]   {d.get('stage')}{blk}{frac} {'' if blk else d.get('message') or ''}".rstrip()
                            )
                        elif kind == "status":
                            _say(f"[demo]   status -> {d['status']}")
            job = c.get(f"/v1/pruning-jobs/{job['id']}").json()
            elapsed = time.perf_counter() - t0
            if job["status"] != "succeeded":
                _say(f"[demo] job ended {job['status']}: {job.get('error')}")
                return 1
            _say(f"[demo] POST -> succeeded in {elapsed:.1f} s")
            out = data / "downloads" / job["id"]
            arts = c.get(f"/v1/pruning-jobs/{job['id']}/artifacts").json()["data"]
            for a in arts:
                dest = out / a["name"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with c.stream("GET", a["url"], follow_redirects=True) as resp:
                    resp.raise_for_status()
                    hsh = hashlib.sha256()
                    with open(dest, "wb") as f:
                        for chunk in resp.iter_bytes():
                            hsh.update(chunk)
                            f.write(chunk)
                if hsh.hexdigest() != a["sha256"]:
                    _say(f"[demo] sha256 mismatch for {a['name']}")
                    return 1
            _say(f"[demo] downloaded {len(arts)} artifacts to {out}; every sha256 verified")
            sp = _check_model(out)
            _say(f"[demo] transformers loads the pruned model; linear-layer sparsity {sp:.4f} (asked {sparsity})")
            m = job["metrics"]
            ppl = m.get("perplexity") or {}
            _say(
                "[demo] metrics: "
                + json.dumps(
                    {
                        "achieved_sparsity": round(m.get("achieved_sparsity", 0), 4),
                        "perplexity_dense": ppl.get("dense"),
                        "perplexity_pruned": ppl.get("pruned"),
                        "timings_s": m.get("timings"),
                    },
                    indent=None,
                )
            )
            return 0 if abs(sp - sparsity) < 0.02 else 1
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _check_model(path: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    zeros = total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            zeros += int((mod.weight == 0).sum())
            total += mod.weight.numel()
    return zeros / total if total else 0.0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--data-dir")
    ap.add_argument("--sparsity", type=float, default=0.5)
    a = ap.parse_args()
    sys.exit(main(a.model, a.port, a.data_dir, a.sparsity))
