"""Pieces of a production-shaped stack that a test owns and can break: a Postgres cluster and a Redis server
on ports of their own (stopped and started again by the test), and process-group helpers for the API and
the workers. Used by tests/e2e/test_svc_faults.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process started with ``start_new_session=True`` and everything it forked; reap it."""
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return f"--- {path.name} ---\n" + path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return f"--- {path.name}: missing ---"


def pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        if os.access(Path(d) / name, os.X_OK):
            return str(Path(d) / name)
    return shutil.which(name)


def pg_available() -> bool:
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return all(pg_bin(b) for b in ("initdb", "pg_ctl", "postgres")) and shutil.which("runuser") is not None


class PostgresServer:
    """A throw-away cluster run by the ``postgres`` OS user (initdb refuses root) on its own port and socket
    directory, trust auth, fsync off. ``stop()`` / ``start()`` keep the data directory and the port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="secateurs-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(
            [pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
        )

    def _as_postgres(self, cmd: list, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, cmd)], capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stdout}\n{r.stderr}\n{tail(self.log)}")
        return r

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_postgres([pg_bin("pg_ctl"), "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres([pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"])

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except Exception:  # noqa: BLE001  (already gone)
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """redis-server on its own port, no persistence: ``restart_empty()`` loses every message it held."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.log_dir / f"redis-{self.starts}.log", "w")
        self.starts += 1
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not self.ping():
            assert self.proc.poll() is None and time.monotonic() < deadline, tail(Path(log.name))
            time.sleep(0.05)

    def client(self):  # noqa: ANN201
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001
            return False

    def shutdown_nosave(self) -> None:
        import redis

        try:
            self.client().shutdown(nosave=True)
        except redis.ConnectionError:  # the server closes the connection as it exits
            pass
        assert self.proc is not None
        self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, signal.SIGTERM)


def slow_model(dest: Path, tokenizer_src: Path) -> Path:
    """A random Llama with many blocks (as in test_svc_e2e.py): long enough to hit a point of its run."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
