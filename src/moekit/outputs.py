"""Output folders written safely: checked before any work, written atomically, cleaned on signals.

Every moekit writer (checkpoints, pre-gates) writes into a hidden temporary sibling
`.OUT.partial-PID-XXXX` and renames it to OUT only when complete, so OUT is either the old
folder or the whole new one. SIGTERM and SIGHUP raise `Terminated` (see `signals_raise`) so the
writer's cleanup runs as it does for Ctrl-C; a partial folder left by a process that was killed
outright (SIGKILL, power loss) is removed by the next write to the same OUT once its PID is dead.

`--overwrite` deletes only a folder moekit wrote (`is_moekit_output`), never an input of the
command, a folder holding one, or a folder inside one (`check_output`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MoekitError

INDEX_FILE = "model.safetensors.index.json"  # as moekit.checkpoint names it
PREGATE_FILE = "pregate.safetensors"  # as moekit.offload.pregate names it


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM / SIGHUP so that `finally` blocks (and the writers'
    cleanup) run; a BaseException, like KeyboardInterrupt, so `except Exception` does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Terminated (once: a second signal during the
    cleanup is ignored, so the cleanup finishes); the previous handlers come back after it.
    Outside the main thread, where Python cannot install handlers, it changes nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, _frame) -> None:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def is_moekit_output(path: str | Path) -> bool:
    """Returns whether `path` is a folder a moekit writer made: a checkpoint from
    save.write_checkpoint (compress, prune, finetune, save_model: its index's metadata carries
    `moekit_sha256`) or pre-gates from `moekit pregate` (pregate.safetensors with `moekit` metadata)."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        if isinstance((index.get("metadata") or {}).get("moekit_sha256"), dict):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return "moekit" in _safetensors_metadata(path / PREGATE_FILE)


def _safetensors_metadata(file: Path) -> dict:
    """Returns a safetensors file's string metadata ({} when absent or unreadable), header only."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                return {}
            header = json.loads(f.read(size))
        return header.get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}


def check_replaceable(out: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """Raises MoekitError unless `out` may be written: absent, an empty folder, or (with
    overwrite) a folder moekit wrote."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise MoekitError(f"{flag} {out}: exists and is not a folder; choose another {flag}")
    if not any(out.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise MoekitError(f"{out}: already exists; choose another {flag}, or pass --overwrite to replace it")
    if not is_moekit_output(out):
        raise MoekitError(f"{flag} {out}: not a folder moekit wrote (no moekit checkpoint index or pre-gates "
                          "in it); --overwrite deletes only moekit outputs: choose another " + flag)


def check_output(out: str | Path, inputs: Iterable[str | Path | None], overwrite: bool = False,
                 flag: str = "--out") -> Path:
    """Returns `out` after checking, before any work, that writing it destroys nothing: it is not an
    input, does not hold one and is not inside one (inputs: the model folder, data files or
    folders; None entries are skipped), and check_replaceable allows it."""
    out = Path(out)
    where = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if where == source:
            raise MoekitError(f"{flag} {out} is the input {given}; write to another folder")
        if where in source.parents:
            raise MoekitError(f"{flag} {out} holds the input {given}; write to a folder outside it")
        if source in where.parents:
            raise MoekitError(f"{flag} {out} is inside the input {given}; write to a folder outside it")
    check_replaceable(out, overwrite, flag)
    return out


def _temp_name(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{os.getpid()}-"


def remove_stale_partials(out: str | Path) -> list[Path]:
    """Returns the folders removed: temporary siblings of `out` (`.OUT.partial-PID-*`,
    `.OUT.old-PID-*`) whose writing process PID no longer runs."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:partial|old)-(\d+)-[^/]+$")
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yields a temporary folder beside `out` to write into; when the block ends normally the
    folder replaces `out` (see check_replaceable), else it is deleted.

    Stale partial folders of `out` from dead processes are removed first. The swap of the old
    and the new folder runs with SIGINT/SIGTERM/SIGHUP held back, so a signal never leaves `out` missing."""
    out = Path(out)
    check_replaceable(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(out, "partial"), dir=out.parent))
    try:
        yield tmp
        _make_readable(tmp)  # mkdtemp makes the folder private (0700); an output should not be
        check_replaceable(out, overwrite, flag)  # it may have appeared while we worked
        old = _swap_in(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Returns the old folder moved aside (to delete), after renaming tmp to out."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        old = None
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_name(out, "old"), dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        return old
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _make_readable(folder: Path) -> None:
    """Gives a folder and its files the permissions a plain mkdir/open would (0777/0666 - umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)
