"""End-to-end demo on the embedded defaults: `python -m cli.demo` (or `secateurs service demo`).

Starts the API and a worker as separate processes (SQLite database, SQLite-backed Celery broker, local
artifacts, all under ./var/demo), creates a tenant and key, prints where the dashboard is, and then does what a
user does, through the Python client (client/): uploads a calibration text and an evaluation text (disjoint
parts of TinyStories, the model's own domain), submits a real pruning job, follows its progress over the event
stream, downloads every artifact (each sha256 verified), loads the pruned model with transformers, checks its
sparsity, and prints the metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from client import Client, Event, SecateursError

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


def main(
    model: str | None = None,
    port: int = 8765,
    data_dir: str | None = None,
    sparsity: float = 0.5,
    serve: bool = False,
) -> int:
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
        with Client(base, key, timeout=60) as c:
            deadline = time.time() + 60
            while True:
                try:
                    c.ready()
                    break
                except SecateursError:  # not listening yet (ConnectionFailed), or a dependency not ready (503)
                    pass
                if time.time() > deadline:
                    _say("[demo] API did not become ready; see the logs")
                    return 1
                time.sleep(0.3)
            _say(f"[demo] dashboard: {base}/dashboard/ (API key {key}; up while the demo runs)")
            _say(f"[demo] or from another shell: SECATEURS_SERVER={base} SECATEURS_API_KEY={key} secateurs jobs list")
            wlog = logs / "worker.log"
            t_w = time.perf_counter()
            while " ready." not in wlog.read_text(errors="replace"):
                if procs[0].poll() is not None or time.perf_counter() - t_w > 180:
                    _say("[demo] the worker did not start; see the logs")
                    return 1
                time.sleep(0.3)
            _say("[demo] worker ready")
            cal_file, eval_file, what = _demo_texts(data / "texts")
            cal_set, new = c.ensure_calibration_set(cal_file)
            _say(f"[demo] calibration text: {what[0]} -> {cal_set.id} ({'uploaded' if new else 'already uploaded'})")
            eval_set, new = c.ensure_calibration_set(eval_file)
            _say(f"[demo] evaluation text: {what[1]} -> {eval_set.id} ({'uploaded' if new else 'already uploaded'})")
            body = {
                "model": str(model_dir.resolve()) if local else model,
                "method": "wanda",
                "sparsity": sparsity,
                "calibration": {"calibration_set_id": cal_set.id, "nsamples": 64, "seqlen": SEQLEN, "seed": 0},
                "evaluation": {"calibration_set_id": eval_set.id, "seqlen": SEQLEN, "max_windows": 64},
                "metadata": {"purpose": "demo"},
            }
            t0 = time.perf_counter()
            created = c.create_job(body)
            _say(f"[demo] created {created.id} ({created.status}, {created.enqueue}): {created.urls.get('self', '')}")
            job = c.wait(created.id, on_event=_show_event)
            elapsed = time.perf_counter() - t0
            if job.status != "succeeded":
                _say(f"[demo] job ended {job.status}: {job.error}")
                return 1
            _say(f"[demo] created -> succeeded in {elapsed:.1f} s")
            out = data / "downloads" / job.id
            got = c.download(job.id, out, overwrite=True)
            _say(
                f"[demo] downloaded {len(got.files)} artifacts ({got.transferred:,} bytes) to {out}; "
                "every sha256 verified (against the artifact list and manifest.json)"
            )
            sp = _check_model(out)
            _say(f"[demo] transformers loads the pruned model; linear-layer sparsity {sp:.4f} (asked {sparsity})")
            m = job.metrics or {}
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
            if ppl.get("dense") is not None:
                _say(
                    f"[demo] perplexity on {what[1]}: {ppl['dense']:.2f} dense -> {ppl.get('pruned') or float('nan'):.2f} "
                    f"with {sparsity:.0%} of the weights removed"
                )
            ok = abs(sp - sparsity) < 0.02
            if serve and ok:
                _say(f"[demo] serving until Ctrl-C: open {base}/dashboard/ and enter the API key {key}")
                _serve_until_interrupted(procs)
            elif ok:
                _say("[demo] the API stops now; `make demo SERVE=1` (or `--serve`) keeps it and the dashboard up")
            return 0 if ok else 1
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


def _serve_until_interrupted(procs: list[subprocess.Popen]) -> None:
    """Keep the API and the worker up (to look at the job in the dashboard) until Ctrl-C or one of them ends."""
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        _say("[demo] a service process ended; see the logs")
    except KeyboardInterrupt:
        _say("[demo] stopping")


SEQLEN = 256  # calibration windows and evaluation windows (stories260k's positions: 512)
EVAL_STORIES = 200  # the last stories of the file are the evaluation text; the others calibrate


def _demo_texts(dest: Path) -> tuple[Path, Path, tuple[str, str]]:
    """The calibration and evaluation texts, as .jsonl files (one document a line) under ``dest``.

    With the shared assets: TinyStories, the text stories260k was trained on, split story by story (on the
    file's ``<|endoftext|>`` markers): the first 800 stories calibrate, the last 200 are the evaluation text,
    so no story is in both. Without them: the small built-in text, for the random-init model."""
    dest.mkdir(parents=True, exist_ok=True)
    source = SHARED / "assets" / "text" / "tinystories-valid.txt"
    if source.is_file():
        stories = [t.strip() for t in source.read_text("utf-8").split("<|endoftext|>") if t.strip()]
        cal, ev = stories[:-EVAL_STORIES], stories[-EVAL_STORIES:]
        names = (
            f"TinyStories validation, stories 1-{len(cal)}",
            f"TinyStories validation, stories {len(cal) + 1}-{len(stories)}",
        )
    else:
        half = len(FALLBACK_TEXT) // 2
        cal, ev = [FALLBACK_TEXT[:half]], [FALLBACK_TEXT[half:]]
        names = ("the built-in demo text, first half", "the built-in demo text, second half")
    files = dest / "calibration.jsonl", dest / "evaluation.jsonl"
    for path, docs in zip(files, (cal, ev), strict=True):
        text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        if not path.is_file() or path.read_text("utf-8") != text:
            path.write_text(text, "utf-8")
    return files[0], files[1], names


def _show_event(e: Event) -> None:
    d = e.data
    if e.type == "progress":
        frac = f" {d['fraction']:.0%}" if d.get("fraction") is not None else ""
        blk = f" block {d['block'] + 1}/{d['total_blocks']}" if d.get("block") is not None else ""
        _say(f"[demo]   {d.get('stage')}{blk}{frac} {'' if blk else d.get('message') or ''}".rstrip())
    elif e.type == "status":
        _say(f"[demo]   status -> {d['status']}")


def _check_model(path: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
    ap.add_argument("--serve", action="store_true", help="keep the API and the dashboard up afterwards")
    a = ap.parse_args()
    sys.exit(main(a.model, a.port, a.data_dir, a.sparsity, a.serve))
