"""The agent's state directory, held under an exclusive lock so two agents never share it."""

import fcntl
import os
from pathlib import Path

from meshagent.errors import MeshagentError

LOCK_FILE = "agent.lock"


class StateDir:
    def __init__(self, path: Path):
        self.path = path
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Create the directory (0700) and take its lock, or say which agent holds it."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MeshagentError(
                f"state dir {self.path} is in use by another agent (pid {holder});"
                " give each agent its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None
