"""The soft-prompt artifact: a [n_tokens, hidden] float32 tensor plus the metadata needed
to use it safely (which base model, which template and verbalizer, how it was trained).

It is stored as a single safetensors file: the tensor under ``"prompt"`` and the metadata
as JSON in the safetensors header, so there is no pickle anywhere and the size on disk is
``n_tokens * hidden * 4`` bytes plus a small header.  Writes are atomic (temporary file in
the same folder, then ``os.replace``) so a crash never leaves half a prompt behind.

A prompt only means something for the base model it was trained on, so the artifact
records that model's identity (name, hidden size, vocabulary size and a fingerprint of
its input-embedding matrix) and refuses to load onto another one.

Prompts for encoder models (``encoder.py``) also carry the small classification head
trained with them, as extra tensors ``head.weight`` / ``head.bias``; those files are
written as format version 2 so that an older reader refuses them instead of silently
dropping the head.  Files without a head are written exactly as before (version 1).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import atomic
from .method import Method
from .calibration import Calibration
from .prompt_meta import PromptFileError, parse_meta
from ..data.task import TaskKind

FORMAT_VERSION = 1
#: Version written for artifacts with a classification head (encoder models).
HEAD_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, HEAD_FORMAT_VERSION)
INIT_METHODS = ("random", "vocab", "text", "labels")


class PromptMismatchError(ValueError):
    """A prompt trained for one base model was used with another."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a prompt needs to know about its base model to refuse the wrong one."""

    name: str
    hidden_size: int
    vocab_size: int
    embedding_fingerprint: str

    @classmethod
    def of(cls, model) -> "ModelIdentity":
        cached = getattr(model, "_softprompt_identity", None)
        if cached is not None:
            return cached
        emb = model.get_input_embeddings().weight.detach()
        ident = cls(
            name=str(getattr(model, "softprompt_name", None) or model.config._name_or_path or type(model).__name__),
            hidden_size=int(emb.shape[1]),
            vocab_size=int(emb.shape[0]),
            embedding_fingerprint=embedding_fingerprint(emb),
        )
        try:
            object.__setattr__(model, "_softprompt_identity", ident)
        except Exception:  # pragma: no cover - exotic module types
            pass
        return ident

    def check(self, other: "ModelIdentity", what: str = "this prompt") -> None:
        """Raise PromptMismatchError naming both models unless they are the same model."""
        if (self.hidden_size, self.vocab_size, self.embedding_fingerprint) != (
            other.hidden_size, other.vocab_size, other.embedding_fingerprint,
        ):
            raise PromptMismatchError(
                f"{what} was trained for base model {self.name!r} (hidden {self.hidden_size}, vocab "
                f"{self.vocab_size}, embeddings {self.embedding_fingerprint[:12]}) but the loaded model is "
                f"{other.name!r} (hidden {other.hidden_size}, vocab {other.vocab_size}, embeddings "
                f"{other.embedding_fingerprint[:12]}). Load {self.name!r} or retrain the prompt for {other.name!r}."
            )


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """A short hash of the embedding matrix (fp32 bytes), robust to dtype of the copy in memory."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()


@dataclass
class SoftPrompt:
    """A trained (or freshly initialised) soft prompt and everything needed to reuse it."""

    embeddings: torch.Tensor  # [n_tokens, hidden], float32
    identity: ModelIdentity
    template: str = "{soft:0}"
    verbalizer: dict[str, str] | None = None
    task: str = ""
    kind: str = TaskKind.CLASSIFICATION
    method: str = Method.PROMPT_TUNING.value  # core.method.Method, artifact spelling
    init: str = "random"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # prefix tuning: per-layer key/values [n_layers, 2, kv_heads, n_prefix, head_dim]
    kv: torch.Tensor | None = None
    # encoder models: classification head {"weight": [n_labels, hidden], "bias": [n_labels]}
    # applied to the pooled last hidden state ("mean" or "cls" pooling)
    head: dict[str, torch.Tensor] | None = None
    pooling: str | None = None
    # rank-classification calibration (per-label log-prior); saved only when not "none"
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer or {})

    @property
    def n_prefix(self) -> int:
        return 0 if self.kv is None else int(self.kv.shape[3])

    @property
    def n_params(self) -> int:
        head = sum(t.numel() for t in (self.head or {}).values())
        return self.embeddings.numel() + (0 if self.kv is None else self.kv.numel()) + head

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor payload (the file adds a small JSON header)."""
        return self.n_params * 4

    def metadata(self) -> dict[str, Any]:
        meta = {
            "format_version": FORMAT_VERSION if self.head is None else HEAD_FORMAT_VERSION,
            "base_model": asdict(self.identity),
            "n_tokens": self.n_tokens,
            "n_prefix": self.n_prefix,
            "hidden_size": self.hidden_size,
            "template": self.template,
            "verbalizer": self.verbalizer,
            "task": self.task,
            "kind": self.kind,
            "method": self.method,
            "init": self.init,
            "training": self.training,
            "metrics": self.metrics,
        }
        if self.head is not None:  # only then: files without a head stay byte-for-byte as before
            meta["head"] = {"pooling": self.pooling, "tensors": sorted(self.head)}
        if self.calibration is not None and self.calibration.active:  # absent = "none", as in older files
            meta["calibration"] = self.calibration.to_dict()
        return meta

    def save(self, path: str | os.PathLike) -> int:
        """Write atomically; returns the file size in bytes."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"prompt": self.embeddings.detach().to("cpu", torch.float32).contiguous()}
        if self.kv is not None:
            tensors["prefix_kv"] = self.kv.detach().to("cpu", torch.float32).contiguous()
        for name, t in (self.head or {}).items():
            tensors[f"head.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
        # no sort_keys: the verbalizer's key order is the label order
        meta = {"softprompt": json.dumps(self.metadata(), default=_json_default)}
        atomic.write_safetensors(path, tensors, metadata=meta)
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "SoftPrompt":
        """Read an artifact; with ``model`` given, refuse it unless it was trained for that model."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no prompt file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if "prompt" not in f.keys():
                    raise PromptFileError(f"{path} is a safetensors file but holds no 'prompt' tensor")
                tensor = f.get_tensor("prompt")
                kv = f.get_tensor("prefix_kv") if "prefix_kv" in f.keys() else None
                head = {k[len("head."):]: f.get_tensor(k).to(torch.float32)
                        for k in f.keys() if k.startswith("head.")}
                # every tensor in the file, used or not, must be finite (a NaN anywhere is a broken artifact)
                bad = next((k for k in f.keys() if k not in ("prompt", "prefix_kv") and not k.startswith("head.")
                            and _non_finite(f.get_tensor(k))), None)
        except PromptFileError:
            raise
        except Exception as e:
            raise PromptFileError(f"{path} is not a softprompt safetensors file ({e})") from e
        if "softprompt" not in header:
            raise PromptFileError(f"{path} has no softprompt metadata; was it written by softprompt?")
        meta = parse_meta(header["softprompt"], str(path))
        version = meta.format_version
        if version not in READABLE_VERSIONS:
            raise PromptFileError(
                f"{path} has format version {version}; this softprompt reads versions {READABLE_VERSIONS}"
            )
        if (version == HEAD_FORMAT_VERSION) != bool(head):
            raise PromptFileError(
                f"{path}: format version {version} "
                + ("needs a classification head (head.* tensors) but has none" if not head
                   else "must not carry head.* tensors")
            )
        used = (("prompt", tensor), ("prefix_kv", kv), *((f"head.{k}", v) for k, v in head.items()))
        integral = next((name for name, t in used if t is not None and not t.is_floating_point()), None)
        if integral:  # an integer tensor would be cast silently: a broken or hostile artifact
            dtype = dict(used)[integral].dtype
            raise PromptFileError(f"{path}: tensor {integral!r} has dtype {dtype}; a prompt's tensors are floating point")
        bad = next((name for name, t in used if t is not None and _non_finite(t)), bad)
        if bad:
            raise PromptFileError(f"{path}: tensor {bad!r} contains NaN or infinite values")
        bm = meta.base_model
        prompt = cls(
            embeddings=tensor.to(torch.float32),
            identity=ModelIdentity(name=bm.name, hidden_size=bm.hidden_size, vocab_size=bm.vocab_size,
                                   embedding_fingerprint=bm.embedding_fingerprint),
            template=meta.template,
            verbalizer=meta.verbalizer,
            task=meta.task or "",
            kind=meta.kind,
            method=meta.method,
            init=meta.init or "",
            training=meta.training or {},
            metrics=meta.metrics or {},
            kv=kv.to(torch.float32) if kv is not None else None,
            head=head or None,
            pooling=meta.head.pooling if meta.head is not None else None,
        )
        try:
            prompt.calibration = Calibration.from_dict(meta.calibration.model_dump() if meta.calibration else None)
        except ValueError as e:
            raise PromptFileError(f"{path}: bad calibration in the metadata ({e})") from e
        if prompt.calibration.active and len(prompt.calibration.log_prior) != len(prompt.labels):
            raise PromptFileError(f"{path}: calibration has {len(prompt.calibration.log_prior)} log-priors for "
                                  f"{len(prompt.labels)} labels")
        if model is not None:
            prompt.identity.check(ModelIdentity.of(model), what=f"prompt {path}")
        return prompt


def _non_finite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def _json_default(obj):
    if isinstance(obj, (torch.Tensor,)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- init
TRANSFER_PREFIX = "prompt:"  # init "prompt:PATH": start from a saved prompt's soft tokens


def transferred_embeddings(model, path: str | os.PathLike, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` rows from the prompt saved at ``path`` (its first ones, or cycled when it has fewer)."""
    source = SoftPrompt.load(path, model)
    if source.n_tokens == 0:
        raise ValueError(f"{path}: prompt has no soft tokens to start from (a hard prompt or a key/value prefix only)")
    reps = (n_tokens + source.n_tokens - 1) // source.n_tokens
    return source.embeddings.repeat(reps, 1)[:n_tokens].clone().float()


def init_embeddings(
    model,
    tokenizer,
    n_tokens: int,
    method: str = "random",
    *,
    text: str | None = None,
    label_words: list[str] | None = None,
    seed: int = 0,
    vocab_top: int = 5000,
) -> torch.Tensor:
    """Initial values for ``n_tokens`` soft tokens (Lester et al. 2021, section 3).

    * ``random``: uniform in [-0.5, 0.5], as in the paper.
    * ``vocab``: embeddings of tokens sampled from the ``vocab_top`` lowest ids (BPE ids are
      roughly ordered by frequency, the paper samples the 5,000 most common tokens).
    * ``text``: embeddings of the tokens of ``text``, cycled to fill the length.
    * ``labels``: embeddings of the label words (mean over each word's pieces), then sampled
      vocabulary for the remaining tokens.
    * ``prompt:PATH``: a saved prompt's soft tokens (transfer, as Vu et al.'s SPoT: a prompt
      trained on a related task is a better start than text), refused unless trained for this
      model; a longer prompt gives its first ``n_tokens``, a shorter one is cycled to fill.
    """
    if method.startswith(TRANSFER_PREFIX):
        return transferred_embeddings(model, method[len(TRANSFER_PREFIX):], n_tokens)
    emb = model.get_input_embeddings().weight.detach().to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    if method == "random":
        return torch.rand(n_tokens, emb.shape[1], generator=gen) - 0.5
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = torch.tensor([i for i in range(min(vocab_top, emb.shape[0])) if i not in specials])

    def sampled(n: int) -> torch.Tensor:
        idx = pool[torch.randint(len(pool), (n,), generator=gen)]
        return emb[idx].clone()

    if method == "vocab":
        return sampled(n_tokens)
    if method == "text":
        if not text:
            raise ValueError("init 'text' needs init_text, e.g. 'Classify whether the tweet is a complaint'")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"init text {text!r} has no tokens")
        reps = (n_tokens + len(ids) - 1) // len(ids)
        return emb[torch.tensor((ids * reps)[:n_tokens])].clone()
    if method == "labels":
        if not label_words:
            raise ValueError("init 'labels' needs the verbalizer's label words")
        rows = []
        for w in label_words:
            ids = tokenizer(w, add_special_tokens=False).input_ids
            rows.append(emb[torch.tensor(ids)].mean(0))
        rows = rows[:n_tokens]
        out = torch.stack(rows)
        if len(rows) < n_tokens:
            out = torch.cat([out, sampled(n_tokens - len(rows))])
        return out.clone()
    raise ValueError(f"unknown init method {method!r}; choose one of {', '.join(INIT_METHODS)} or {TRANSFER_PREFIX}PATH")
