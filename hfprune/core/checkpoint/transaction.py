# Copyright hfprune contributors. Apache-2.0.
"""Saving into a folder that holds other things: stage, mark committed, move into place, file by file.

A save writes every new file complete into a hidden staging folder inside the target
(``TARGET/.hfprune-staging-<id>/``) and flushes it to disk. It then writes a commit marker into the staging folder
(atomically: written beside, renamed, the folder flushed) that lists the files to move and the stale files to
remove. Only then does each file move into place with one ``os.replace``, so every file the target shows is
complete; ``config.json`` moves last. A save that dies before the marker leaves the target as it was; one that dies
after it is finished by the next save or by :func:`recover`. Nothing else in the folder is touched: no file is
deleted but our staging folders, the leftovers of older hfprune versions, and the weight files the new save
supersedes (:func:`stale_weight_files`).

The staging folder lives inside the target, so the renames never cross a file system, and it is hidden, so
``hfprune push`` and transformers' loaders never take it for a checkpoint. Pure file logic: no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves and recoveries there must not run concurrently
    fcntl = None

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".hfprune-staging-"
MARKER = ".hfprune-commit.json"
# Moved after everything else (and after the stale removals): a reader that checks for a complete checkpoint by its
# config never sees the new config beside missing weights or code.
LAST = ("config.json",)
# transformers' test for a shard name (``PreTrainedModel.save_pretrained``), applied to the name without extension.
_SHARD = re.compile(r"(.*?)-\d{5}-of-\d{5}")
# Sibling folders older hfprune versions wrote beside the target: ``.NAME.hfprune-tmp-<hex8>`` (a save being
# written), ``.NAME.hfprune-old-<hex8>`` (the replaced folder), ``.NAME.run-<hex8>`` (an ``hfprune run`` output).
_OLD_KINDS = ("hfprune-tmp", "hfprune-old", "run")

_held = threading.local()  # folders this thread holds the lock of, so recover() inside a save does not wait on it
_active: set = set()  # staging folders of this process's open transactions, which recovery must leave alone


def check_target(directory) -> Path:
    """``directory`` as a Path, or ``FileExistsError`` when that path exists and is not a folder."""
    path = Path(directory)
    if os.path.lexists(path) and not path.is_dir():
        what = "a symlink to a file" if path.is_symlink() and path.exists() else \
            "a broken symlink" if path.is_symlink() else "a file"
        raise FileExistsError(f"cannot save into {path}: it is {what}, and a checkpoint is a folder; choose another "
                              "path or remove it yourself")
    return path


class Transaction:
    """Write a set of files into ``directory`` so that a failure or a kill leaves either the old files or the new
    ones, and nothing else in the folder changes.

    Use it as a context manager: it yields the staging folder to write into; a clean exit commits, an exception
    rolls back. ``weights`` (the single-file and index names of a ``save_pretrained``) turns on the removal of the
    earlier save's weight files the new ones supersede; names added to ``superseded`` before the exit are removed
    too (when they are files and the save does not write them). After a commit, ``files`` lists what it wrote and
    ``removed`` what it removed.

    Example:

    ```python
    >>> import tempfile
    >>> from hfprune.core.checkpoint.transaction import Transaction
    >>> out = tempfile.mkdtemp()
    >>> with Transaction(out) as staging:
    ...     (staging / "notes.txt").write_text("pruned with hfprune")
    19
    >>> sorted(p.name for p in Path(out).iterdir())
    ['notes.txt']
    ```

    A pruned model's files go in with ``hfprune.core.checkpoint.save.stage_checkpoint(model, txn)``, which also declares
    what they supersede.
    """

    def __init__(self, directory, weights: tuple[str, str] | None = None):
        self.target = check_target(directory)
        self.weights = weights
        self.superseded: list = []
        self.files: list = []  # after a commit: the relative paths it wrote (config.json last)
        self.removed: list = []  # after a commit: the stale files it removed
        self.staging: Path | None = None
        self._stack = contextlib.ExitStack()
        self._created = False
        self._committed = False

    def __enter__(self) -> Path:
        clean_old_format(self.target)
        self._created = not self.target.exists()
        self.target.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if not stack.enter_context(_folder_lock(self.target, timeout=None)):
                raise RuntimeError(f"could not lock {self.target}")  # unreachable without a timeout
            _recover_locked(self.target)
            self.staging = self.target / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
            self.staging.mkdir()
            _active.add(os.path.realpath(self.staging))
            stack.callback(_active.discard, os.path.realpath(self.staging))
            self._stack = stack.pop_all()
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        with self._stack:
            if exc_type is not None:
                self._abort()
                return False
            try:
                self._commit()
            except BaseException:
                if not self._committed:
                    self._abort()
                raise
        return False

    def _commit(self) -> None:
        files = _staged_files(self.staging)
        _check_conflicts(self.target, files)
        top = {f for f in files if "/" not in f}
        stale = stale_weight_files(self.target, self.weights, top) if self.weights else []
        stale += [n for n in dict.fromkeys(self.superseded) if n not in top and n not in stale
                  and _plain_name(n) and (self.target / n).is_file()]
        order = [f for f in files if f not in LAST] + [f for f in files if f in LAST]
        for path in [self.staging / f for f in files]:
            _fsync(path)
        for folder in {(self.staging / f).parent for f in files} | {self.staging}:
            _fsync(folder)
        marker = {"version": 1, "files": order, "stale": stale}
        tmp = self.staging / (MARKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(marker, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.staging / MARKER)
        _fsync(self.staging)
        self._committed = True
        self.files, self.removed = order, stale
        try:
            _roll_forward(self.target, self.staging, marker)
        except BaseException:
            logger.error("the save into %s was committed but not finished; the next save there, or "
                         "hfprune.core.checkpoint.transaction.recover(folder), finishes it", self.target)
            raise

    def _abort(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self._created:
            with contextlib.suppress(OSError):
                self.target.rmdir()  # only when empty: something else may have been written there meanwhile


def recover(directory, timeout: float = 60.0) -> None:
    """Finish or undo an interrupted hfprune save into ``directory``; loaders call this before reading a folder.

    A staging folder without a commit marker is deleted (the folder keeps its old files); one with a marker is
    rolled forward (its remaining files move into place, the stale files go), then deleted. Leftovers of older
    hfprune versions beside the folder (``.NAME.hfprune-tmp-*``, ``.NAME.hfprune-old-*``, ``.NAME.run-*``) are
    removed, but a ``.NAME.hfprune-old-*`` folder is moved back to ``directory`` when that is missing (a save killed
    between its two renames). A save in progress in another process is waited for up to ``timeout`` seconds, then
    left alone. Does nothing (and writes nothing) where there is nothing to recover, or when ``directory`` is not a
    local folder (a Hub id, say).

    Example:

    ```python
    >>> from hfprune.core.checkpoint.transaction import recover
    >>> recover("outputs/pruned")  # then load it as usual
    ```
    """
    path = Path(directory)
    clean_old_format(path)
    if not path.is_dir() or not _staging_folders(path):
        return
    with _folder_lock(path, timeout) as locked:
        if not locked:
            logger.warning("%s: a save is still in progress after %.0f s; not recovering", path, timeout)
            return
        _recover_locked(path)


def stale_weight_files(directory, weights: tuple[str, str], new_files) -> list:
    """Names in ``directory`` that a ``save_pretrained`` writing ``new_files`` (top-level names) supersedes.

    ``weights`` is ``(single-file name, index name)``, e.g. ``("model.safetensors", "model.safetensors.index.json")``.
    transformers' own rule: files whose name starts with the weights name's stem, matches the shard pattern
    ``*-00001-of-00003`` and is not written again. Added to it, the other layout of the same weights: the single
    file when the new save is sharded, the index when it is not. transformers leaves those, and a stale single file
    shadows new shards (its loader looks for the single file first).
    """
    directory = Path(directory)
    return stale_weight_names([n for n in sorted(os.listdir(directory)) if (directory / n).is_file()], weights,
                              new_files)


def stale_weight_names(names, weights: tuple[str, str], new_files) -> list:
    """:func:`stale_weight_files` on a list of file ``names`` (a folder's, or a Hub repo's top-level files)."""
    single, index = weights
    stem = single.replace(".bin", "").replace(".safetensors", "")
    names, new_files = set(names), set(new_files)
    stale = []
    for name in sorted(names):
        bare = name.replace(".bin", "").replace(".safetensors", "")
        if name.startswith(stem) and name not in new_files and _SHARD.fullmatch(bare):
            stale.append(name)
    if index in new_files and single not in new_files and single in names:
        stale.append(single)
    if single in new_files and index not in new_files and index in names:
        stale.append(index)
    return stale


def clean_old_format(target) -> None:
    """Remove what older hfprune versions left beside ``target`` when a save was interrupted (see ``recover``)."""
    target = Path(target)
    if not target.name or target.name in (".", ".."):
        return
    try:
        names = os.listdir(target.parent)
    except OSError:
        return  # no such folder, or not ours to read
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({'|'.join(_OLD_KINDS)})-[0-9a-f]{{8}}")
    found = [target.parent / n for n in names if pattern.fullmatch(n)]
    found = [p for p in found if p.is_dir() and not p.is_symlink()]
    if not found:
        return
    olds = sorted((p for p in found if ".hfprune-old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(target):
        # The old swap renamed the user's folder away and died before renaming the new one in: put it back.
        os.replace(olds[-1], target)
        logger.warning("restored %s from %s, left by an interrupted save of an older hfprune", target, olds[-1].name)
        found.remove(olds[-1])
    for p in found:
        logger.info("removing %s, left by an interrupted save of an older hfprune", p)
        shutil.rmtree(p, ignore_errors=True)


# ---- internals -------------------------------------------------------------------------------------------------


def _staging_folders(directory: Path) -> list:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [directory / n for n in names if n.startswith(STAGING_PREFIX)
            and (directory / n).is_dir() and not (directory / n).is_symlink()]


def _recover_locked(directory: Path) -> None:
    for staging in _staging_folders(directory):
        if os.path.realpath(staging) in _active:
            continue
        marker = staging / MARKER
        if not marker.is_file():
            logger.info("%s: removing %s, an interrupted save (the folder keeps its files)", directory, staging.name)
            shutil.rmtree(staging)
            continue
        try:
            plan = json.loads(marker.read_text())
            files, stale = list(plan["files"]), list(plan["stale"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{marker} is unreadable ({e}); the save it marks was committed, so {directory} may "
                             "hold files of two saves: remove that staging folder once you have checked it") from e
        logger.warning("%s: finishing an interrupted save (%s)", directory, staging.name)
        _roll_forward(directory, staging, {"files": files, "stale": stale})


def _roll_forward(target: Path, staging: Path, plan: dict) -> None:
    """Move the marker's files into place (skipping those already moved), remove its stale files, drop the
    staging folder. Idempotent, so a recovery that is itself killed is finished by the next one."""
    files = [_safe_relative(f) for f in plan["files"]]
    stale = [n for n in plan["stale"] if _plain_name(n)]
    touched = {target}
    for rel in [f for f in files if f not in LAST]:
        touched.add(_move(staging, target, rel))
    for name in stale:
        path = target / name
        if path.is_file():  # transformers' test too: a symlink to a file is unlinked, a folder is never touched
            os.remove(path)
    for rel in [f for f in files if f in LAST]:
        touched.add(_move(staging, target, rel))
    for folder in touched:
        _fsync(folder)
    shutil.rmtree(staging)
    _fsync(target)


def _move(staging: Path, target: Path, rel: str) -> Path:
    src, dst = staging / rel, target / rel
    if os.path.lexists(src):  # else it moved before an interruption
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    return dst.parent


def _staged_files(staging: Path) -> list:
    """Relative POSIX paths of what was written into ``staging``, sorted; empty folders carry nothing."""
    out = []
    for root, dirs, names in os.walk(staging):
        dirs.sort()
        for name in names:
            path = Path(root) / name
            out.append(path.relative_to(staging).as_posix())
    return sorted(f for f in out if f not in (MARKER, MARKER + ".tmp"))


def _check_conflicts(target: Path, files: list) -> None:
    """Refuse, before committing, a move that cannot succeed: onto a folder, or below a file."""
    for rel in files:
        dst = target / rel
        if dst.is_dir() and not dst.is_symlink():
            raise IsADirectoryError(f"cannot save {rel} into {target}: {dst} is a folder")
        for parent in list(PurePosixPath(rel).parents)[:-1]:
            p = target / parent
            if os.path.lexists(p) and not p.is_dir():
                raise NotADirectoryError(f"cannot save {rel} into {target}: {p} is not a folder")


def _safe_relative(rel: str) -> str:
    """A marker path, checked to stay inside the target (a marker is data found in a folder, not trusted)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or ".." in p.parts or p.parts[0].startswith(STAGING_PREFIX) or "\\" in rel:
        raise ValueError(f"commit marker lists {rel!r}, which is not a path inside the folder")
    return p.as_posix()


def _plain_name(name: str) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name \
        and name not in (".", "..") and not name.startswith(".")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk: a crash must not persist a rename before the data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on Windows; there a rename is as durable as the file system makes it
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data itself was flushed
    finally:
        os.close(fd)


@contextlib.contextmanager
def _folder_lock(directory: Path, timeout: float | None):
    """Exclusive advisory lock on ``directory`` while a save or a recovery works in it; yields False when another
    process still holds it after ``timeout`` seconds (``None``: wait). The kernel drops a killed holder's lock."""
    key = os.path.realpath(directory)
    held = getattr(_held, "folders", None)
    if held is None:
        held = _held.folders = set()
    if fcntl is None or key in held:
        yield True
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield True  # cannot open the folder to lock it: go on unlocked, as transformers always does
        return
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
            except OSError:
                break  # file systems without flock (some NFS mounts): go on unlocked
        held.add(key)
        try:
            yield True
        finally:
            held.discard(key)
    finally:
        os.close(fd)  # releases the lock
