"""The prompt store on disk: the ``--prompts`` folder a server loads and keeps in sync.

Layout (names are task names; files and folders starting with ``.`` are ignored)::

    prompts/
      complaints.safetensors        a task served by one prompt
      sentiment/                    an ensemble: every *.safetensors inside is a member,
        seed0.safetensors           the members vote by mean probability ...
        seed1.safetensors
        manifest.json               ... unless a manifest says otherwise (optional)
      topic.json                    an ensemble described by a manifest alone

A manifest is ``{"members": ["a.safetensors", "b.safetensors"], "vote": "mean" | "vote"}`` (the
names of :mod:`softprompt.apps.ensemble`; ``"majority"``, the old name of ``"vote"``, still loads);
member paths are relative to the manifest's folder and must stay inside the prompts folder.
Reading the folder (``sources.py``) never fails as a whole: a bad entry (a manifest too large
or too deep, any unexpected error) is reported for its task and the others load.

A file another task uses as a member cannot be removed (409 ``task_in_use``), and an upload
over it is refused when that task would no longer load with the new prompt.  "Uses" follows
the member's path entry by entry: a symlink is its own entry, so deleting an alias spares the
tasks that reach its target directly (:func:`~softprompt.serve.sources.entries_on`).

Uploads (:meth:`Registry.put`) are checked completely before anything changes: the name,
the size, the safetensors framing, the artifact's metadata and its base-model identity,
and finally the engine's own checks.  Only then is the file moved into place with an
atomic ``os.replace``, so a rejected upload leaves both the folder and the serving task
table as they were.

Crash safety (``kill -9`` at any point leaves a folder that :meth:`Registry.recover`, run at
start-up, makes consistent again):

* an upload is written to ``.upload-<name>.*.tmp`` and fsynced; its commit point is the
  ``os.replace`` onto ``<name>.safetensors``.  Other definitions of the same name (an
  ensemble folder, a manifest) are first renamed to ``.replaced-<id>-<file>``; recovery
  deletes those when the new file is in place and renames them back when it is not, and
  always deletes ``.upload-*.tmp``.
* a delete first waits for the engine to drop the task, then renames its files to
  ``.trash-<id>-<file>`` and fsyncs the folder (the commit point), then removes them.
  Killed before the commit, the task is still there after a restart (the client had no
  answer); killed after it, recovery finishes the delete.
* one server per folder: :class:`FolderLock` takes an exclusive ``fcntl`` lock on
  ``.softprompt-serve.lock``, so a second server on the same folder refuses to start
  instead of silently disagreeing with the first about what is served.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from ..core import atomic
from ..core.prompts import PromptFileError, SoftPrompt
from .engine import Engine, PromptRejectedError, ServeError, TaskSpec, UnknownTaskError
from .sources import TaskSource, folder_source, goes_through, manifest_source, single_source
from .validation import check_prompts

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 8 << 20
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
#: a task is stored as <name>.safetensors, <name>/ or <name>.json, so a name with one of these
#: suffixes would address another task's files (``demo.safetensors`` is task ``demo``'s file)
RESERVED_SUFFIXES = (".safetensors", ".json")
TASK_NAME_RULE = ("1-64 characters: letters, digits, '_', '-' and '.', starting with a letter or digit, no '..', "
                  "not ending in '.safetensors' or '.json'")


LOCK_NAME = ".softprompt-serve.lock"
_ASIDE_RE = re.compile(r"\.(trash|replaced)-[0-9a-f]{32}-(.+)")


class FolderLockedError(ServeError):
    status, code = 409, "folder_locked"


class TaskInUseError(ServeError):
    status, code = 409, "task_in_use"


class InvalidTaskNameError(ServeError):
    status, code = 400, "invalid_task_name"


class UploadTooLargeError(ServeError):
    status, code = 413, "upload_too_large"


class NotSafetensorsError(ServeError):
    status, code = 415, "not_safetensors"


def validate_task_name(name: Any) -> str:
    """Return ``name`` if it is a safe task name (usable as a file name), else raise."""
    if (not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name) or ".." in name
            or name.lower().endswith(RESERVED_SUFFIXES)):
        shown = name if isinstance(name, str) and len(name) <= 80 else f"{str(name)[:80]}..."
        raise InvalidTaskNameError(f"invalid task name {shown!r}: use {TASK_NAME_RULE}")
    return name


def check_safetensors_bytes(data: bytes) -> None:
    """Cheap framing check: an 8-byte little-endian header length, then a JSON object."""
    if len(data) < 10:
        raise NotSafetensorsError(f"the upload ({len(data)} bytes) is not a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or 8 + n > len(data) or data[8:9] != b"{":
        raise NotSafetensorsError(
            "the upload is not a safetensors file (bad header); only .safetensors prompt artifacts are accepted")


class FolderLock:
    """An exclusive ``fcntl`` lock on ``<folder>/.softprompt-serve.lock`` (released by
    :meth:`release` or when the process dies, even by ``kill -9``): one server per folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        """Raise :class:`FolderLockedError` (naming the holder's pid) if another process holds it."""
        if self._fd is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise FolderLockedError(
                f"the prompts folder {self.root} is already served by another softprompt server (pid {holder}); "
                "one server per folder: stop it, or give this one its own --prompts folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Registry:
    """Keeps an :class:`Engine`'s task table in step with a folder of prompt artifacts."""

    def __init__(self, root: str | os.PathLike, engine: Engine, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root_resolved = self.root.resolve()
        self.engine = engine
        self.max_upload_bytes = int(max_upload_bytes)
        self._lock = threading.RLock()
        self._loaded: dict[str, TaskSource] = {}

    # ------------------------------------------------------------------ scanning
    def _inside(self, p: Path) -> bool:
        try:
            return p.resolve().is_relative_to(self.root_resolved)
        except OSError:
            return False

    def scan(self) -> tuple[dict[str, TaskSource], dict[str, str]]:
        """What the folder defines now: ``(tasks, errors by name)``; nothing is loaded."""
        found: dict[str, TaskSource] = {}
        errors: dict[str, str] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix == ".safetensors":
                name = entry.stem
            elif entry.is_file() and entry.suffix == ".json":
                name = entry.stem
            elif entry.is_dir():
                name = entry.name
            else:
                continue
            try:
                validate_task_name(name)
                if not self._inside(entry):
                    raise PromptRejectedError(f"{entry} points outside the prompts folder")
                if name in found:
                    raise PromptRejectedError(
                        f"task {name!r} is defined twice ({found[name].origin.name} and {entry.name}); keep one")
                if entry.suffix == ".safetensors" and entry.is_file():
                    src = single_source(name, entry)
                elif entry.suffix == ".json" and entry.is_file():
                    src = manifest_source(entry, name, self._inside)
                elif (entry / "manifest.json").is_file():
                    src = manifest_source(entry / "manifest.json", name, self._inside)
                else:
                    src = folder_source(name, entry, self._inside)
                found[name] = src
            except ServeError as e:
                errors[name] = e.message
            except OSError as e:
                errors[name] = f"{entry}: {e}"
            except Exception as e:  # noqa: BLE001 - one bad entry must not stop the others loading
                logger.exception("unexpected error reading %s", entry)
                errors[name] = f"{entry}: unexpected error ({type(e).__name__}: {str(e)[:300]})"
        for name in errors:
            found.pop(name, None)
        return found, errors

    def _register(self, src: TaskSource) -> TaskSpec:
        prompts = []
        for f in src.files:
            try:
                prompts.append(SoftPrompt.load(f))
            except (PromptFileError, FileNotFoundError, ValueError) as e:
                raise PromptRejectedError(f"{f}: {e}") from None
        return self.engine.register(src.name, prompts, member_names=src.member_names, vote=src.vote,
                                    source=str(src.origin))

    def sync(self) -> dict[str, Any]:
        """Load what is new or changed on disk and drop tasks whose files are gone.

        Tasks that fail to load are reported (and a previous version keeps serving);
        tasks registered directly on the engine (not from this folder) are left alone."""
        with self._lock:
            found, errors = self.scan()
            report: dict[str, Any] = {"added": [], "replaced": [], "removed": [], "unchanged": [], "errors": errors}
            for name in list(self._loaded):  # removals first: they free room (max_tasks) for additions
                if name not in found and name not in errors:
                    del self._loaded[name]
                    if name in self.engine.tasks():
                        self.engine.unregister(name)
                    report["removed"].append(name)
            for name, src in found.items():
                old = self._loaded.get(name)
                if old is not None and old.fingerprint == src.fingerprint and name in self.engine.tasks():
                    report["unchanged"].append(name)
                    continue
                try:
                    self._register(src)
                except ServeError as e:
                    errors[name] = e.message
                    logger.warning("not serving task %r: %s", name, e.message)
                    continue
                except Exception as e:  # noqa: BLE001 - reported for this task; the others still load
                    logger.exception("unexpected error loading task %r", name)
                    errors[name] = f"unexpected error loading {src.origin} ({type(e).__name__}: {str(e)[:300]})"
                    continue
                self._loaded[name] = src
                report["replaced" if old is not None else "added"].append(name)
            return report

    # ------------------------------------------------------------------ one writer, crash recovery
    def recover(self) -> dict[str, list[str]]:
        """Finish or undo what a crash interrupted (see the module docstring); returns the
        names removed and restored.  Only safe while no other server writes to the folder
        (hold its :class:`FolderLock`)."""
        report: dict[str, list[str]] = {"removed": [], "restored": []}
        with self._lock:
            for entry in sorted(self.root.iterdir()):
                name = entry.name
                m = _ASIDE_RE.fullmatch(name)
                if name.startswith(".upload-") and name.endswith(".tmp") or (m and m.group(1) == "trash"):
                    _remove(entry)
                    report["removed"].append(name)
                elif m:  # set aside by an upload: back if the upload never landed, else gone
                    orig = m.group(2)
                    task = orig[: -len(".json")] if orig.endswith(".json") else orig
                    target = self.root / orig
                    if not (self.root / f"{task}.safetensors").exists() and not (target.exists() or target.is_symlink()):
                        os.replace(entry, target)
                        report["restored"].append(orig)
                    else:
                        _remove(entry)
                        report["removed"].append(name)
            if report["removed"] or report["restored"]:
                atomic.fsync_dir(self.root)
                logger.warning("recovered the prompts folder after a crash: %s", report)
        return report

    # ------------------------------------------------------------------ admin
    def _definitions(self, name: str) -> list[Path]:
        return [p for p in (self.root / f"{name}.safetensors", self.root / name, self.root / f"{name}.json")
                if p.exists() or p.is_symlink()]

    def _entry(self, p: Path) -> Path:
        """``p`` (a name directly in the folder) as the directory entry :func:`entries_on` reports."""
        return self.root_resolved / p.name

    def _users(self, name: str, paths: list[Path]) -> list[tuple[str, int, Path]]:
        """``(task, member index, entry)`` of every member of another loaded task whose path goes
        through one of ``paths`` (entries of the folder): removing or replacing the entry breaks it.
        A symlink is its own entry, so removing an alias leaves the tasks that use its target."""
        entries = [self._entry(p) for p in paths]
        found = []
        for other, src in self._loaded.items():
            if other == name or not entries:
                continue
            for k, f in enumerate(src.files):
                try:
                    hit = goes_through(f, entries)
                except OSError:
                    continue  # a member already unreachable is not broken by this change
                if hit is not None:
                    found.append((other, k, hit))
        return found

    def _in_use(self, name: str, entry: Path, other: str, doing: str, why: str = "") -> TaskInUseError:
        origin = self._loaded[other].origin
        where = origin.relative_to(self.root) if origin.is_relative_to(self.root) else origin
        return TaskInUseError(
            f"cannot {doing} task {name!r}: {entry.name} is a member of task {other!r} ({where}){why}; "
            f"delete {other!r} first", task=name, used_by=other)

    def _check_unused(self, name: str, paths: list[Path], doing: str) -> None:
        """Refuse to remove files that another served task (a manifest) uses."""
        for other, _, entry in self._users(name, paths):
            raise self._in_use(name, entry, other, doing)

    def _check_members_accept(self, name: str, final: Path, prompt: SoftPrompt) -> None:
        """A new ``<name>.safetensors`` becomes a member of every task that uses that file; refuse
        it (409) when one of those tasks would no longer load with it (the engine's own checks,
        e.g. different labels), so an upload cannot break an ensemble at its next reload."""
        swaps: dict[str, list[int]] = {}
        entry = self._entry(final)
        for other, k, _ in self._users(name, [final]):
            swaps.setdefault(other, []).append(k)
        if swaps:  # the upload's own faults first: they are the answer whatever uses the file
            check_prompts(self.engine, name, [prompt], [name], "mean")
        for other, members in swaps.items():
            spec = self.engine.tasks().get(other)
            if spec is None:
                continue
            prompts = [prompt if k in members else p for k, p in enumerate(spec.prompts)]
            try:
                check_prompts(self.engine, other, prompts, list(spec.member_names), spec.vote)
            except ServeError as e:
                raise self._in_use(name, entry, other, "replace",
                                   f", and that task would not load with the new file ({e.message})") from None

    def _aside(self, paths: list[Path], kind: str, moved: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
        for p in paths:
            t = self.root / f".{kind}-{uuid.uuid4().hex}-{p.name}"
            os.replace(p, t)
            moved.append((p, t))
        return moved

    @staticmethod
    def _empty_trash(moved: list[tuple[Path, Path]]) -> None:
        for _, t in moved:
            _remove(t)

    def put(self, name: str, data: bytes) -> tuple[TaskSpec, bool]:
        """Validate an uploaded single-prompt artifact, serve it as task ``name`` and store
        it as ``<name>.safetensors``; returns ``(spec, replaced)``.  Any failure leaves the
        folder and the task table unchanged."""
        validate_task_name(name)
        if len(data) > self.max_upload_bytes:
            raise UploadTooLargeError(f"the upload is {len(data)} bytes; the limit is {self.max_upload_bytes}")
        check_safetensors_bytes(data)
        final = self.root / f"{name}.safetensors"
        with self._lock:
            others = [p for p in self._definitions(name) if p != final]
            self._check_unused(name, others, "replace")
            tmp = atomic.write_temp(self.root, data, prefix=f".upload-{name}.")
            try:
                try:
                    prompt = SoftPrompt.load(tmp)
                except (PromptFileError, ValueError, KeyError, TypeError) as e:
                    raise PromptRejectedError(f"not a usable prompt artifact: {str(e).replace(str(tmp), 'the upload')}") from None
                self._check_members_accept(name, final, prompt)
                old_spec = self.engine.tasks().get(name)
                spec = self.engine.register(name, [prompt], source=str(final))  # raises if rejected
                moved: list[tuple[Path, Path]] = []
                try:
                    self._aside(others, "replaced", moved)
                    atomic.commit(tmp, final)  # the commit point
                except OSError:
                    for p, t in moved:
                        os.replace(t, p)
                    if old_spec is not None:
                        self.engine.register(name, list(old_spec.prompts), member_names=old_spec.member_names,
                                             vote=old_spec.vote, source=old_spec.source)
                    else:
                        self.engine.unregister(name)
                    raise
                self._empty_trash(moved)
                self._loaded[name] = single_source(name, final)
                return spec, old_spec is not None
            finally:
                tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> dict[str, Any]:
        """Stop serving task ``name``, then remove its files; returns what was done
        (``{"deleted", "version", "files"}``).  Refused (409) while a manifest uses them."""
        validate_task_name(name)
        with self._lock:
            if name not in self.engine.tasks():
                raise UnknownTaskError(f"unknown task {name!r}", task=name)
            paths = self._definitions(name)
            self._check_unused(name, paths, "delete")
            spec = self.engine.unregister(name)  # waits for the batch in flight; files untouched so far
            moved: list[tuple[Path, Path]] = []
            try:
                self._aside(paths, "trash", moved)
                atomic.fsync_dir(self.root)  # the commit point: recovery finishes the delete from here
            except OSError:
                for p, t in moved:
                    os.replace(t, p)
                self.engine.register(name, list(spec.prompts), member_names=spec.member_names, vote=spec.vote,
                                     source=spec.source)
                raise
            self._empty_trash(moved)
            atomic.fsync_dir(self.root)
            self._loaded.pop(name, None)
            return {"deleted": name, "version": spec.version, "files": sorted(p.name for p in paths)}

    def listing(self) -> list[str]:
        """Names of the files in the folder (for tests and diagnostics)."""
        return sorted(p.name for p in self.root.iterdir())


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)

