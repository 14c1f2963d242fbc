"""The mode a plain open() gives a new file. Temporary-file writers (tempfile.mkstemp, safetensors ≥ 0.8 through
its temp-file-and-rename) create 0600 files whatever the umask, so a pruned model would be unreadable to the
other users or containers that serve it."""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore is not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~_umask()


def as_if_opened(*paths: Path) -> None:
    """Give each (new, non-executable) file the mode open() would have given it."""
    mode = default_file_mode()
    for p in paths:
        p.chmod(mode)
