"""The prompt store on disk: the ``--prompts`` folder a server loads and keeps in sync.

Layout (names are task names; files and folders starting with ``.`` are ignored)::

    prompts/
      complaints.safetensors        a task served by one prompt
      sentiment/                    an ensemble: every *.safetensors inside is a member,
        seed0.safetensors           the members vote by mean probability ...
        seed1.safetensors
        manifest.json               ... unless a manifest says otherwise (optional)
      topic.json                    an ensemble described by a manifest alone

A manifest is ``{"members": ["a.safetensors", "b.safetensors"], "vote": "mean" | "majority"}``;
member paths are relative to the manifest's folder and must stay inside the prompts folder.

Uploads (:meth:`Registry.put`) are checked completely before anything changes: the name,
the size, the safetensors framing, the artifact's metadata and its base-model identity,
and finally the engine's own checks.  Only then is the file moved into place with an
atomic ``os.replace``, so a rejected upload leaves both the folder and the serving task
table as they were.  Deletions rename the files aside first and only remove them once the
engine has dropped the task.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..prompts import PromptFileError, SoftPrompt
from .engine import VOTES, Engine, PromptRejectedError, ServeError, TaskSpec, UnknownTaskError

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 8 << 20
MAX_MEMBERS = 32
TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
#: a task is stored as <name>.safetensors, <name>/ or <name>.json, so a name with one of these
#: suffixes would address another task's files (``demo.safetensors`` is task ``demo``'s file)
RESERVED_SUFFIXES = (".safetensors", ".json")
TASK_NAME_RULE = ("1-64 characters: letters, digits, '_', '-' and '.', starting with a letter or digit, no '..', "
                  "not ending in '.safetensors' or '.json'")


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


@dataclass(frozen=True)
class TaskSource:
    """Where a task lives on disk."""

    name: str
    files: tuple[Path, ...]  # member prompt files
    member_names: tuple[str, ...]
    vote: str
    origin: Path  # the file, folder or manifest that defines the task
    fingerprint: tuple  # changes when any file behind the task changes


def _stat(p: Path) -> tuple:
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


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

    def _manifest(self, path: Path, name: str) -> TaskSource:
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise PromptRejectedError(f"{path}: unreadable manifest ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("members"), list) or not data["members"]:
            raise PromptRejectedError(f"{path}: a manifest is {{\"members\": [\"a.safetensors\", ...], \"vote\": \"mean\"}}")
        vote = data.get("vote", "mean")
        if vote not in VOTES:
            raise PromptRejectedError(f"{path}: vote must be one of {VOTES}, got {vote!r}")
        if len(data["members"]) > MAX_MEMBERS:
            raise PromptRejectedError(f"{path}: at most {MAX_MEMBERS} members")
        files, names = [], []
        for m in data["members"]:
            rel = m.get("path") if isinstance(m, dict) else m
            if not isinstance(rel, str) or not rel.endswith(".safetensors") or os.path.isabs(rel):
                raise PromptRejectedError(f"{path}: member {m!r} must be a relative path to a .safetensors file")
            f = path.parent / rel
            if not self._inside(f):
                raise PromptRejectedError(f"{path}: member {rel!r} points outside the prompts folder")
            if not f.is_file():
                raise PromptRejectedError(f"{path}: member {rel!r} does not exist")
            files.append(f)
            names.append(m.get("name", f.stem) if isinstance(m, dict) else f.stem)
        fp = tuple(_stat(f) for f in [path, *files]) + (vote,)
        return TaskSource(name, tuple(files), tuple(map(str, names)), vote, path, fp)

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
                    src = TaskSource(name, (entry,), (name,), "mean", entry, (_stat(entry), "mean"))
                elif entry.suffix == ".json" and entry.is_file():
                    src = self._manifest(entry, name)
                else:
                    manifest = entry / "manifest.json"
                    if manifest.is_file():
                        src = self._manifest(manifest, name)
                    else:
                        files = [f for f in sorted(entry.glob("*.safetensors")) if not f.name.startswith(".")]
                        if not files:
                            raise PromptRejectedError(f"folder {entry} holds no .safetensors prompts")
                        if len(files) > MAX_MEMBERS:
                            raise PromptRejectedError(f"folder {entry}: at most {MAX_MEMBERS} members")
                        if not all(self._inside(f) for f in files):
                            raise PromptRejectedError(f"folder {entry}: a member points outside the prompts folder")
                        src = TaskSource(name, tuple(files), tuple(f.stem for f in files), "mean", entry,
                                         tuple(_stat(f) for f in files) + ("mean",))
                found[name] = src
            except ServeError as e:
                errors[name] = e.message
            except OSError as e:
                errors[name] = f"{entry}: {e}"
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
                self._loaded[name] = src
                report["replaced" if old is not None else "added"].append(name)
            for name in list(self._loaded):
                if name not in found and name not in errors:
                    del self._loaded[name]
                    if name in self.engine.tasks():
                        self.engine.unregister(name)
                    report["removed"].append(name)
            return report

    # ------------------------------------------------------------------ admin
    def _definitions(self, name: str) -> list[Path]:
        return [p for p in (self.root / f"{name}.safetensors", self.root / name, self.root / f"{name}.json")
                if p.exists() or p.is_symlink()]

    def _trash(self, paths: list[Path]) -> list[tuple[Path, Path]]:
        moved = []
        for p in paths:
            t = self.root / f".trash-{uuid.uuid4().hex}-{p.name}"
            os.replace(p, t)
            moved.append((p, t))
        return moved

    @staticmethod
    def _empty_trash(moved: list[tuple[Path, Path]]) -> None:
        for _, t in moved:
            if t.is_dir() and not t.is_symlink():
                shutil.rmtree(t, ignore_errors=True)
            else:
                t.unlink(missing_ok=True)

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
            fd, tmp_name = tempfile.mkstemp(prefix=f".upload-{name}.", suffix=".tmp", dir=self.root)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    prompt = SoftPrompt.load(tmp)
                except (PromptFileError, ValueError, KeyError, TypeError) as e:
                    raise PromptRejectedError(f"not a usable prompt artifact: {str(e).replace(str(tmp), 'the upload')}") from None
                old_spec = self.engine.tasks().get(name)
                spec = self.engine.register(name, [prompt], source=str(final))  # raises if rejected
                others = [p for p in self._definitions(name) if p != final]
                try:
                    moved = self._trash(others)
                    os.replace(tmp, final)
                    _fsync_dir(self.root)
                except OSError:
                    if old_spec is not None:
                        self.engine.register(name, list(old_spec.prompts), member_names=old_spec.member_names,
                                             vote=old_spec.vote, source=old_spec.source)
                    else:
                        self.engine.unregister(name)
                    raise
                self._empty_trash(moved)
                self._loaded[name] = TaskSource(name, (final,), (name,), "mean", final, (_stat(final), "mean"))
                return spec, old_spec is not None
            finally:
                tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> TaskSpec:
        """Stop serving task ``name`` and remove its files from the folder."""
        validate_task_name(name)
        with self._lock:
            if name not in self.engine.tasks():
                raise UnknownTaskError(f"unknown task {name!r}", task=name)
            moved = self._trash(self._definitions(name))
            try:
                spec = self.engine.unregister(name)
            except BaseException:
                for p, t in moved:
                    os.replace(t, p)
                raise
            self._empty_trash(moved)
            _fsync_dir(self.root)
            self._loaded.pop(name, None)
            return spec

    def listing(self) -> list[str]:
        """Names of the files in the folder (for tests and diagnostics)."""
        return sorted(p.name for p in self.root.iterdir())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
