"""Where a training run writes, checked before it trains, and held while it runs.

- `check_output_paths`: `output_path` and `checkpoint_path` are each an existing folder or a
  path whose nearest existing ancestor is a writable folder; an existing file there, or a parent
  that is a file or not writable, is a `UsageError` before anything loads (SAELens would find
  out at the export, after training, and lose the trained SAE).
- `RunLock`: a run takes `.<name>.lock` beside each of its `output_path` and
  `checkpoint_path` (created with O_CREAT | O_EXCL, holding the owner's pid and host) and
  removes it when the run ends, however it ends. A second run into a locked folder is a
  `UsageError` naming the owner; a lock whose owner is a dead process on this host (a run killed
  with SIGKILL) is stale and taken over. Locks sit beside the folder, not in it, so an export
  still appears in one rename (resume.publish_folder).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from sae_lens_allocation.validation import UsageError, field_error


def check_output_paths(paths: Iterable[tuple[str, str | None]]) -> None:
    """Each (field, path) with a path is a folder, or can be created as one (module docstring)."""
    for field, value in paths:
        if value is None:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise field_error(field, value, "a folder to write into; it is an existing file")
        ancestor = path
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise field_error(field, value, f"a folder to write into; {ancestor} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise field_error(field, value, f"a folder to write into; {ancestor} is not writable")


def lock_path(folder: str | Path) -> Path:
    """The lock file of `folder`: `.<name>.lock` beside it."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _owner_alive(text: str) -> bool:
    """Whether the lock's owner ("pid host") may still run: always, unless it is a process of
    this host that no longer exists."""
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or parts[1] != socket.gethostname():
        return True
    try:
        os.kill(int(parts[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive locks on the folders a run writes (module docstring); a context manager.
    `folders` are (field, path) pairs; None paths are skipped, a path named twice locked once."""

    def __init__(self, folders: Iterable[tuple[str, str | None]]) -> None:
        self.folders: dict[Path, str] = {}
        for field, value in folders:
            if value is not None:
                self.folders.setdefault(lock_path(value), field)
        self.held: list[Path] = []

    def acquire(self) -> None:
        try:
            for lock, field in self.folders.items():
                self._take(lock, field)
        except BaseException:
            self.release()
            raise

    def _take(self, lock: Path, field: str) -> None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        owner = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    text = lock.read_text()
                except FileNotFoundError:
                    continue  # its owner just released it
                if _owner_alive(text):
                    folder = lock.parent / lock.name[1:-len(".lock")]
                    raise UsageError(
                        f"{field}={str(folder)!r} is in use by another run (pid and host: "
                        f"{text.strip() or 'being written'}; lock file {lock}); wait for it to "
                        f"finish or choose another {field}"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner)
            self.held.append(lock)
            return
        raise UsageError(f"{field}: could not take the lock {lock}; another run keeps taking it")

    def release(self) -> None:
        for lock in reversed(self.held):
            lock.unlink(missing_ok=True)
        self.held = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
