"""What on disk defines a task of the prompts folder (a file, an ensemble folder, a manifest),
and which directory entries a member's path goes through.

Split from ``registry.py`` so the folder's writer (put, delete, recovery) stays readable.  A
manifest is untrusted input like an upload: it is read under the bounds of artifact metadata
(:func:`softprompt.core.prompt_meta.load_bounded_json`), so a hostile one is an error for its
task, never a crash of reload or start-up.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.prompt_meta import MAX_META_CHARS, PromptFileError, load_bounded_json
from .spec import VOTES, PromptRejectedError

MAX_MEMBERS = 32
#: symlinks followed while walking one path (as the kernel's ELOOP limit)
_MAX_LINKS = 40


@dataclass(frozen=True)
class TaskSource:
    """Where a task lives on disk."""

    name: str
    files: tuple[Path, ...]  # member prompt files
    member_names: tuple[str, ...]
    vote: str
    origin: Path  # the file, folder or manifest that defines the task
    fingerprint: tuple  # changes when any file behind the task changes


def stat_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p), st.st_mtime_ns, st.st_size)


def single_source(name: str, path: Path) -> TaskSource:
    """A task served by one ``<name>.safetensors`` file."""
    return TaskSource(name, (path,), (name,), "mean", path, (stat_key(path), "mean"))


def folder_source(name: str, folder: Path, inside: Callable[[Path], bool]) -> TaskSource:
    """An ensemble folder without a manifest: every ``*.safetensors`` in it, by file name."""
    files = [f for f in sorted(folder.glob("*.safetensors")) if not f.name.startswith(".")]
    if not files:
        raise PromptRejectedError(f"folder {folder} holds no .safetensors prompts")
    if len(files) > MAX_MEMBERS:
        raise PromptRejectedError(f"folder {folder}: at most {MAX_MEMBERS} members")
    if not all(inside(f) for f in files):
        raise PromptRejectedError(f"folder {folder}: a member points outside the prompts folder")
    return TaskSource(name, tuple(files), tuple(f.stem for f in files), "mean", folder,
                      tuple(stat_key(f) for f in files) + ("mean",))


def read_manifest_json(path: Path) -> object:
    """The manifest's JSON, read under the metadata bounds (size before reading, then depth)."""
    with open(path, "rb") as fh:
        raw = fh.read(MAX_META_CHARS + 1)  # a larger file is refused without reading it all
    try:
        return load_bounded_json(raw.decode("utf-8"), str(path), what="the manifest")
    except UnicodeDecodeError as e:
        raise PromptRejectedError(f"{path}: unreadable manifest (not UTF-8: {e})") from None
    except PromptFileError as e:
        raise PromptRejectedError(f"unreadable manifest: {e}") from None


def manifest_source(path: Path, name: str, inside: Callable[[Path], bool]) -> TaskSource:
    """A task described by a manifest (``<name>.json``, or ``<name>/manifest.json``)."""
    data = read_manifest_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("members"), list) or not data["members"]:
        raise PromptRejectedError(f"{path}: a manifest is {{\"members\": [\"a.safetensors\", ...], \"vote\": \"mean\"}}")
    vote = data.get("vote", "mean")
    if not isinstance(vote, str) or vote not in VOTES:
        raise PromptRejectedError(f"{path}: vote must be one of {VOTES}, got {vote!r}"[:500])
    if len(data["members"]) > MAX_MEMBERS:
        raise PromptRejectedError(f"{path}: at most {MAX_MEMBERS} members")
    files, names = [], []
    for m in data["members"]:
        rel = m.get("path") if isinstance(m, dict) else m
        if not isinstance(rel, str) or not rel.endswith(".safetensors") or os.path.isabs(rel):
            raise PromptRejectedError(f"{path}: member {m!r} must be a relative path to a .safetensors file"[:500])
        f = path.parent / rel
        if not inside(f):
            raise PromptRejectedError(f"{path}: member {rel!r} points outside the prompts folder")
        if not f.is_file():
            raise PromptRejectedError(f"{path}: member {rel!r} does not exist")
        files.append(f)
        names.append(m.get("name", f.stem) if isinstance(m, dict) else f.stem)
    fp = tuple(stat_key(f) for f in [path, *files]) + (vote,)
    return TaskSource(name, tuple(files), tuple(map(str, names)), vote, path, fp)


def entries_on(path: Path) -> set[Path]:
    """Every directory entry the kernel passes through to open ``path``, symlinks included
    (each as ``<real parent>/<name>``).  Removing or replacing an entry breaks exactly the paths
    that go through it: a link's removal does not touch paths that reach its target directly,
    while a real file's or folder's does, whichever links lead there."""
    seen: set[Path] = set()
    links = 0

    def walk(p: Path) -> Path:
        nonlocal links
        cur = Path(p.anchor or "/")
        for part in p.parts[1:]:
            if part in ("", "."):
                continue
            if part == "..":
                cur = cur.parent  # cur is already resolved, so ".." is physical as in the kernel
                continue
            entry = cur / part
            seen.add(entry)
            if entry.is_symlink():
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(f"too many levels of symbolic links in {path}")
                target = Path(os.readlink(entry))
                cur = walk(target if target.is_absolute() else cur / target)
            else:
                cur = entry
        return cur

    walk(path if path.is_absolute() else Path.cwd() / path)  # not abspath: it folds '..' before links
    return seen


def goes_through(path: Path, entries: list[Path]) -> Path | None:
    """The first of ``entries`` (each ``<real parent>/<name>``) that ``path`` passes through or into."""
    on = entries_on(path)
    for e in entries:
        if any(s == e or s.is_relative_to(e) for s in on):
            return e
    return None
