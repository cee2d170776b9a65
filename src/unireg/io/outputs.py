"""Output folders as transactions: a run's files appear all at once, or not at all.

A run that writes a folder (``unireg register -o OUTDIR``) goes through
:class:`OutputFolder`:

1. **Before any work** (:meth:`OutputFolder.open`): the path is checked (not a file, its
   parent writable, no files in it that unireg did not write), an exclusive lock is taken on
   ``.OUTDIR.unireg-lock`` beside it (``flock``: the kernel releases it when the process dies,
   even by SIGKILL; a second run into the folder is refused with the holder's pid), staging
   folders of killed runs are removed, and a fresh staging folder is made beside the target.
2. The run writes its files into the staging folder.
3. **Publish** (:meth:`OutputFolder.commit`): ``manifest.json`` (every file's size and SHA-256,
   the unireg version, the command line and the run's inputs) is written last into the staging
   folder, which is then swapped with the target in one ``renameat2(RENAME_EXCHANGE)`` (Linux)
   and the previous result is deleted. Where the exchange is not supported the target is
   renamed aside first and put back by the next run if a kill falls between the two renames.

So after any sequence of runs, failures and kills, ``OUTDIR`` holds one complete result whose
manifest matches its files, or the previous one untouched. Files of an earlier run that this
run does not produce (``inverse_transform.nii.gz`` of another method) go with the old folder.
Every folder and file is created with the permissions the umask allows.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from unireg.errors import UniregError

MANIFEST = "manifest.json"
FORMAT = "unireg-outputs-1"
_LOCK = ".unireg-lock"
_STAGE = ".unireg-stage-"
_OLD = ".unireg-old-"


class OutputPathError(UniregError):
    """The output path cannot take the run's files (a file, unwritable, someone else's)."""


class OutputInUseError(UniregError):
    """Another unireg run is writing the same output folder."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """A file's absolute path, size in bytes and SHA-256: how a run names its inputs."""
    path = Path(path)
    return {
        "path": str(path.resolve()),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where
    the system or file system does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def manifest_problems(folder: str | Path) -> list[str]:
    """What is wrong with a published folder against its ``manifest.json``: files missing,
    files not listed, sizes or checksums that differ. Empty when the folder is consistent."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST}: unreadable ({err})"]
    present = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    problems = [f"{n}: not in the manifest" for n in sorted(present - set(listed))]
    for name, rec in sorted(listed.items()):
        path = folder / name
        if name not in present:
            problems.append(f"{name}: listed but missing")
        elif path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
            problems.append(f"{name}: size or checksum differs from the manifest")
    return problems


class OutputFolder:
    """One run's output folder as a transaction (see the module docstring).

    Use as a context manager around the whole run: ``open`` before the first heavy step,
    write into :attr:`stage`, ``commit`` at the end; leaving the block without a commit (an
    error, Ctrl-C) removes the staging folder and leaves the target as it was.

    Args:
        target: the output folder.
        managed: the file names this kind of run writes (the command-line contract; a name
            with ``*`` is a pattern, as ``case-*.html``); an
            existing target holding anything else is refused, never overwritten.
        command: the verb, for messages (``"unireg register"``).
    """

    def __init__(
        self, target: str | Path, managed: Collection[str], *, command: str = "unireg"
    ) -> None:
        self.target = Path(os.path.abspath(target))
        self.managed = frozenset(managed) | {MANIFEST}
        self.command = command
        self.stage: Path | None = None
        self._lock_fd: int | None = None
        self._made: list[Path] = []  # parent folders this run created (removed on abort)
        self._committed = False

    def manages(self, name: str) -> bool:
        """Whether ``name`` is one of the files this kind of run writes."""
        import fnmatch

        return name in self.managed or any(
            "*" in m and fnmatch.fnmatchcase(name, m) for m in self.managed
        )

    # -- before the work -------------------------------------------------------------------
    def open(self) -> Path:
        """Check the target, take its lock, clean up after killed runs and make the staging
        folder; returns it. Raises :class:`OutputPathError` or :class:`OutputInUseError`."""
        target = self.target
        if target.is_symlink():
            target = self.target = target.resolve()
        if target.exists() and not target.is_dir():
            raise OutputPathError("exists and is not a folder; give a folder path", target)
        parent = target.parent
        self._make_parents(parent)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputPathError("cannot create the output folder here (no permission)", parent)
        self._lock()
        try:
            self._recover()
            if target.exists():
                if not os.access(target, os.W_OK | os.X_OK):
                    raise OutputPathError("output folder is not writable", target)
                foreign = sorted(p.name for p in target.iterdir() if not self.manages(p.name))
                if foreign:
                    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                    raise OutputPathError(
                        f"holds files {self.command} did not write ({shown}); the whole folder is "
                        "replaced by each run, so give a new or empty folder",
                        target,
                    )
            self.stage = parent / f".{target.name}{_STAGE}{os.getpid()}-{secrets.token_hex(4)}"
            os.mkdir(self.stage)  # mode 0o777 less the umask
        except BaseException:
            self._release()
            self._remove_made()
            raise
        return self.stage

    def _make_parents(self, parent: Path) -> None:
        missing: list[Path] = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            except OSError as err:
                self._remove_made()
                raise OutputPathError(f"cannot create folder ({err.strerror})", folder) from err
            self._made.append(folder)
        if not parent.is_dir():
            raise OutputPathError("is not a folder", parent)

    def _lock(self) -> None:
        path = self.target.parent / f".{self.target.name}{_LOCK}"
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputInUseError(
                    f"another unireg run (pid {holder}) is writing this folder; wait for it to "
                    "finish or choose another output folder",
                    self.target,
                ) from None
            try:  # the lock file may have been unlinked by a run that just finished
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd, self._lock_path = fd, path
                return
            os.close(fd)
        raise OutputInUseError("could not take the output folder's lock", self.target)

    def _recover(self) -> None:
        """Under the lock: put back a result a killed run had moved aside, delete the
        staging and old folders of killed runs."""
        parent, name = self.target.parent, self.target.name
        marks = (f".{name}{_STAGE}", f".{name}{_OLD}")
        leftovers = sorted(p for p in parent.iterdir() if p.name.startswith(marks))
        for p in leftovers:
            if p.name.startswith(f".{name}{_OLD}") and not self.target.exists():
                os.rename(p, self.target)
            else:
                shutil.rmtree(p, ignore_errors=True)

    # -- publishing ------------------------------------------------------------------------
    def commit(self, provenance: dict[str, Any] | None = None) -> dict[str, Path]:
        """Write ``manifest.json`` (files with size and SHA-256, plus ``provenance``) into the
        staging folder and swap it in for the target; returns the published files by name."""
        from unireg import __version__

        if self.stage is None:
            raise RuntimeError("commit() before open()")
        files = sorted(p for p in self.stage.iterdir() if p.name != MANIFEST)
        unexpected = [p.name for p in files if not self.manages(p.name)]
        if unexpected:
            raise RuntimeError(f"files outside the output contract: {unexpected}")
        manifest = {
            "format": FORMAT,
            "unireg_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(provenance or {}),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        }
        (self.stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        self._publish(self.stage)
        self._committed = True
        self.stage = None
        return {p.name: self.target / p.name for p in [*files, self.target / MANIFEST]}

    def _publish(self, stage: Path) -> None:
        target = self.target
        if not target.exists():
            os.rename(stage, target)
        elif _exchange(stage, target):
            shutil.rmtree(stage)  # now the previous result
        else:
            old = target.parent / f".{target.name}{_OLD}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
            os.rename(stage, target)  # a kill between the two renames: open() puts old back
            shutil.rmtree(old)

    # -- leaving ---------------------------------------------------------------------------
    def abort(self) -> None:
        """Remove the staging folder; the target stays as it was."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                break
        self._made.clear()

    def _release(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)  # while still holding it: see _lock
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> OutputFolder:
        self.open()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.abort()
        finally:
            self._release()
            if not self._committed:
                self._remove_made()  # parent folders this run made, now empty


def publish_files(jobs: Iterable[tuple[str | Path, Any]]) -> list[Path]:
    """Write several output files together: each ``writer(tmp_path)`` writes a temporary file
    beside its target, and only when all have succeeded are they renamed into place; on any
    failure none is (and no temporary file is left)."""
    from contextlib import ExitStack

    from unireg.io.files import atomic_path

    jobs = list(jobs)
    with ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(path)) for path, _ in jobs]
        for tmp, (_, writer) in zip(tmps, jobs, strict=True):
            writer(tmp)
    return [Path(path) for path, _ in jobs]


def add_files(
    target: str | Path,
    managed: Collection[str],
    writers: dict[str, Any],
    *,
    command: str = "unireg",
    provenance: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Add (or replace) files in a published output folder as one transaction: the folder's
    other files are hard-linked into a fresh staging folder (published files are never
    changed in place), ``writers[name](path)`` writes each new file there, and the staging
    folder is committed with a new manifest (the old one's provenance, updated by
    ``provenance``). Returns the published files by name."""
    folder = Path(os.path.abspath(target))
    old_manifest = folder / MANIFEST
    previous: dict[str, Any] = {}
    if old_manifest.is_file():
        try:
            previous = json.loads(old_manifest.read_text())
        except ValueError as err:
            raise OutputPathError(f"unreadable manifest ({err})", old_manifest) from err
    for key in ("format", "unireg_version", "created", "files"):
        previous.pop(key, None)
    with OutputFolder(folder, managed, command=command) as out:
        stage = out.stage
        assert stage is not None
        for path in folder.iterdir():
            if path.name == MANIFEST or path.name in writers or not path.is_file():
                continue
            try:
                os.link(path, stage / path.name)
            except OSError:
                shutil.copy2(path, stage / path.name)
        for name, write in writers.items():
            write(stage / name)
        return out.commit({**previous, **(provenance or {})})
