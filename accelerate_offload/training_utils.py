"""What the training scripts must get right and users never edit: outputs with the modes of ordinary files."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path


@cache
def _umask() -> int:
    """The process's umask, read without changing it where Linux allows; else set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_modes(path: str | os.PathLike) -> None:
    """Gives `path` (a file, or a folder and everything in it) the mode the user's umask gives a new one.

    safetensors creates its files readable by their owner only, so a LoRA would be unreadable to a serving
    process under another user or a teammate's sync; every other output already gets the umask's mode.
    """
    path = Path(path)
    file_mode, folder_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod(folder_mode if item.is_dir() else file_mode)
