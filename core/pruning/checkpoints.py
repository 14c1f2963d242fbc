"""Resume records: what a later attempt needs to continue a run at its first unfinished block.

Per finished block ``i`` the checkpoint holds
- ``block-<i>.safetensors``: the block's pruned weights and packed masks (written by streaming.BlockStream);
- ``block-<i>.json``: the record, written last: block index, number of blocks, the shard's sha256, the run
  digest (config + model revision + calibration tokens), the block's layer reports;
- ``inputs-<i>.safetensors`` (only for the last finished block, and only when no larger than a block): the
  block's outputs, i.e. the next block's calibration inputs, so a resumed run needs no forward pass over the
  restored blocks. Without it they are rebuilt by running the restored blocks forward.

The checkpoint lives in a local directory and, when given a storage and a prefix, is mirrored there (local
directory or S3), so that an attempt on another machine can continue. ``resume`` verifies every shard's sha256:
a changed digest starts the run over, a corrupt block is redone (with every block after it)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.hashing import sha256_file
from core.pruning import streaming

log = logging.getLogger(__name__)
FORMAT = "secateurs.resume/1"


def _log_note(message: str) -> None:
    log.info("%s", message)


def model_fingerprint(source: str, revision: str | None, commit: str | None = None) -> str:
    """What identifies the model's weights without reading them: for a local directory the names and sizes
    of its files and the bytes of its config and index; for a hub id the id and the resolved commit."""
    path = Path(source)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                h.update(f"{p.name}:{p.stat().st_size}\n".encode())
                if p.name == "config.json" or p.name.endswith(".index.json"):
                    h.update(p.read_bytes())
    else:
        h.update(f"{source}@{commit or revision or 'main'}".encode())
    return h.hexdigest()


def run_digest(identity: dict[str, Any], tokens: torch.Tensor, fingerprint: str) -> str:
    """Digest of what makes a run's blocks what they are: the config (without its output-only parts), the
    model's fingerprint and the calibration tokens."""
    h = hashlib.sha256()
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    h.update(fingerprint.encode())
    t = tokens.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{list(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Finished:
    """Blocks 0..k-1 done by an earlier attempt."""

    records: list[dict[str, Any]]
    shards: list[Path]
    inputs: list[torch.Tensor] | None  # outputs of block k-1 (the inputs of block k), when checkpointed

    def __len__(self) -> int:
        return len(self.records)


class Checkpoints:
    def __init__(
        self,
        directory: Path | str,
        digest: str,
        *,
        storage: Any = None,
        prefix: str | None = None,
        note: Callable[[str], None] = _log_note,
        save_inputs: bool | None = None,
    ) -> None:
        """``save_inputs``: checkpoint the last finished block's outputs; None (auto) does when they are no
        larger than the block's shard (so the checkpoint's size at most doubles)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.digest = digest
        if (storage is None) != (prefix is None):
            raise ValueError("storage and prefix go together")
        self.storage, self.prefix = storage, prefix or ""
        self.note = note
        self.save_inputs = save_inputs
        self.uploaded_bytes = 0

    # layout
    @staticmethod
    def record_name(i: int) -> str:
        return f"block-{i:05d}.json"

    @staticmethod
    def shard_name(i: int) -> str:
        return f"block-{i:05d}.safetensors"

    @staticmethod
    def inputs_name(i: int) -> str:
        return f"inputs-{i:05d}.safetensors"

    # storage helpers
    def _remote(self) -> bool:
        return self.storage is not None

    def _put(self, name: str, sha: str) -> None:
        if not self._remote():
            return
        info = self.storage.put_file(self.prefix + name, self.dir / name)
        if info.sha256 != sha:
            raise OSError(f"sha256 of {name} changed during its upload")
        self.uploaded_bytes += info.size

    def _delete(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)
        if self._remote():
            self.storage.delete_prefix(self.prefix + name)

    def _names(self) -> list[str]:
        if self._remote():
            return [k[len(self.prefix) :] for k in self.storage.list(self.prefix)]
        return sorted(p.name for p in self.dir.iterdir() if p.is_file())

    def _fetch(self, name: str) -> Path:
        """A local path holding the object: the storage's own file when it is local, else a download."""
        if not self._remote():
            return self.dir / name
        own = self.storage.local_path(self.prefix + name)
        if own is not None:
            return Path(own)
        return Path(self.storage.get_file(self.prefix + name, self.dir / name))

    # resuming
    def resume(self, blocks: int) -> Finished | None:
        """Verify what an earlier attempt left and return the blocks that can be restored (None: start at 0)."""
        names = set(self._names())
        records: dict[int, dict[str, Any]] = {}
        for name in sorted(n for n in names if n.startswith("block-") and n.endswith(".json")):
            try:
                rec = json.loads(self._fetch(name).read_text())
                records[int(rec["block"])] = rec
            except (OSError, ValueError, KeyError, TypeError):
                continue  # an unreadable record: that block is redone
        if not records:
            if names:
                self.clear()
            return None
        stale = [r for r in records.values() if r.get("format") != FORMAT or r.get("digest") != self.digest]
        if stale or any(r.get("blocks") != blocks for r in records.values()):
            self.note(
                "checkpoints of an earlier attempt were made with another configuration, model revision or "
                "calibration set: starting over at block 1"
            )
            self.clear()
            return None
        good: list[dict[str, Any]] = []
        shards: list[Path] = []
        for i in range(blocks):
            rec = records.get(i)
            if rec is None or self.shard_name(i) not in names:
                break
            path = self._fetch(self.shard_name(i))
            if sha256_file(path) != rec["sha256"]:
                self.note(f"the checkpoint of block {i + 1} is corrupt (sha256 mismatch): redoing it")
                break
            good.append(rec)
            shards.append(path)
        k = len(good)
        for j in sorted(records):
            if j >= k:
                self._delete(self.record_name(j))
                self._delete(self.shard_name(j))
        if k == 0:
            self.clear()
            return None
        inputs = None
        last = good[-1]
        if last.get("inputs") and self.inputs_name(k - 1) in names:
            path = self._fetch(self.inputs_name(k - 1))
            if sha256_file(path) == last["inputs"]["sha256"]:
                from safetensors.torch import load_file

                loaded = load_file(str(path))
                inputs = [loaded[f"h.{j}"] for j in range(len(loaded))]
            else:
                self.note(f"the checkpointed outputs of block {k} are corrupt: rebuilding them")
        how = "" if inputs is not None or k == blocks else ", rebuilding the next block's inputs"
        self.note(f"resumed at block {min(k + 1, blocks)} of {blocks} ({k} finished blocks restored{how})")
        return Finished(good, shards, inputs)

    # saving
    def save(
        self,
        i: int,
        blocks: int,
        shard: Path,
        sha256: str,
        layers: list[dict[str, Any]],
        skipped: list[str],
        shapes: dict[str, list[int]],
        next_inputs: list[torch.Tensor] | None,
    ) -> None:
        """Block i is finished and its shard written (in this directory): checkpoint it."""
        if shard.parent.resolve() != self.dir.resolve():
            raise ValueError(f"{shard} is not in {self.dir}")
        self._put(shard.name, sha256)
        inputs = None
        if next_inputs is not None and i < blocks - 1:
            size = sum(h.numel() * h.element_size() for h in next_inputs)
            keep = self.save_inputs if self.save_inputs is not None else size <= shard.stat().st_size
            if keep:
                name = self.inputs_name(i)
                sha = streaming.write_safetensors(self.dir / name, {f"h.{j}": h for j, h in enumerate(next_inputs)})
                self._put(name, sha)
                inputs = {"name": name, "sha256": sha, "bytes": size}
        rec = {
            "format": FORMAT,
            "block": i,
            "blocks": blocks,
            "digest": self.digest,
            "sha256": sha256,
            "size": shard.stat().st_size,
            "layers": layers,
            "skipped": skipped,
            "mask_shapes": shapes,
            "inputs": inputs,
        }
        name = self.record_name(i)
        data = (json.dumps(rec, indent=1) + "\n").encode()
        tmp = self.dir / (name + ".partial")
        tmp.write_bytes(data)
        tmp.replace(self.dir / name)
        self._put(name, hashlib.sha256(data).hexdigest())
        if i > 0:
            self._delete(self.inputs_name(i - 1))

    def clear(self) -> None:
        """Remove the checkpoint, locally and in storage."""
        if self._remote():
            self.storage.delete_prefix(self.prefix)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)


@dataclass
class ResumeSpec:
    """Where a run keeps its resume checkpoint (given by the caller: the worker, the CLI, a benchmark).

    identity: what of the job's config defines its blocks (default: the run's config less its export and
    evaluation parts); the worker passes the job's stored config, whose paths do not change between attempts."""

    directory: Path
    storage: Any = None
    prefix: str | None = None
    identity: dict[str, Any] | None = None
    note: Callable[[str], None] = _log_note
    save_inputs: bool | None = None


def config_identity(config: Any) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in ("export", "evaluation")}


def open_run(
    spec: ResumeSpec | None,
    config: Any,
    tokens: torch.Tensor,
    source: str,
    commit: str | None,
    device: torch.device,
    blocks: int,
    scratch: Path,
) -> tuple[streaming.BlockStream, Checkpoints | None, Finished | None]:
    """The stream a run's pruned blocks go to and, with a spec, its checkpoint and what it can restore."""
    if spec is None:
        return streaming.BlockStream(scratch / "blocks"), None, None
    identity = dict(spec.identity if spec.identity is not None else config_identity(config))
    identity.pop("device", None)
    identity["__device__"] = str(device)
    digest = run_digest(identity, tokens, model_fingerprint(source, getattr(config, "revision", None), commit))
    ck = Checkpoints(
        spec.directory,
        digest,
        storage=spec.storage,
        prefix=spec.prefix,
        note=spec.note,
        save_inputs=spec.save_inputs,
    )
    finished = ck.resume(blocks)
    return streaming.BlockStream(ck.dir), ck, finished
