"""Reading a Hugging Face PEFT ``PROMPT_TUNING`` folder back into a :class:`SoftPrompt` (the
format and the BOS question are explained in ``peft.py``, which writes such folders)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from ...core.bank import model_shape
from ...core.method import Method
from ...core.prompts import ModelIdentity, SoftPrompt
from ...core.templates import Template
from ...data.task import TaskKind
from .peft import (
    _BAKED_ATOL, CONFIG_FILE, EXTRA_FILE, EXTRA_FORMAT, EXTRA_VERSION, WEIGHTS_FILE, WEIGHTS_KEY, PeftImportError, PeftImportWarning,
    _check_decoder_only,
)

__all__ = ["adapter_base_model", "import_peft"]


# ----------------------------------------------------------------------------- import
def import_peft(
    adapter_dir: str | os.PathLike,
    model,
    tokenizer,
    template: str | None = None,
    verbalizer: dict[str, str] | None = None,
) -> SoftPrompt:
    """Read a PEFT prompt-tuning adapter folder into a :class:`SoftPrompt` for ``model``.

    A folder written by :func:`export_peft` comes back as the original prompt (unless its
    baked hard tokens were changed, e.g. by further training in PEFT, or ``template`` is
    given).  Any other adapter becomes ``template`` (default ``"{soft:N}{text}"``): it must
    start with all N soft tokens, as PEFT's virtual tokens come first.  ``verbalizer`` makes
    it a classification prompt; without one (and none recorded) it is a generation prompt.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"no PEFT adapter folder at {adapter_dir}")
    cfg_path = adapter_dir / CONFIG_FILE
    if not cfg_path.exists():
        raise PeftImportError(f"{adapter_dir} is not a PEFT adapter folder: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftImportError(f"{cfg_path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise PeftImportError(f"{cfg_path} holds {type(cfg).__name__}, not a PEFT config object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != Method.PROMPT_TUNING.name:
        why = {
            "PREFIX_TUNING": "its key/values are per-layer, not input vectors (softprompt exports prefix prompts "
                             "to PEFT but does not read them back)",
            "": "the config names no peft_type",
        }.get(peft_type, "it changes the model's weights or needs its own modules, not input vectors")
        raise PeftImportError(
            f"{adapter_dir}: only PEFT PROMPT_TUNING adapters can become soft prompts; this one is "
            f"{peft_type or 'unknown'}: {why}"
        )
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise PeftImportError(
            f"{adapter_dir}: task_type {task_type!r}; only CAUSAL_LM prompt-tuning adapters are read (other task "
            "types score with their own heads or run an encoder-decoder)"
        )
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise PeftImportError(f"{adapter_dir}: num_transformer_submodules {cfg['num_transformer_submodules']}; "
                              "only single-stack (decoder-only) adapters are read")
    if cfg.get("modules_to_save"):
        raise PeftImportError(f"{adapter_dir}: it also trains modules {cfg['modules_to_save']}, which a soft "
                              "prompt cannot carry")
    _check_decoder_only(model, f"cannot import {adapter_dir}", PeftImportError)
    shape = model_shape(model)
    token_dim = cfg.get("token_dim")
    if token_dim is not None and int(token_dim) != shape["hidden"]:
        raise PeftImportError(
            f"{adapter_dir}: virtual tokens of size {token_dim}{_made_for(cfg)} do not fit this model's hidden size "
            f"{shape['hidden']}; load the adapter's own base model"
        )
    if cfg.get("num_layers") is not None and int(cfg["num_layers"]) != shape["layers"]:
        raise PeftImportError(
            f"{adapter_dir}: made for a {cfg['num_layers']}-layer base model{_made_for(cfg)} but this model has "
            f"{shape['layers']} layers; load the adapter's own base model"
        )
    rows = _read_weights(adapter_dir, cfg, shape["hidden"])
    extra = _read_extra(adapter_dir)
    ident = ModelIdentity.of(model)
    if extra is not None:
        ModelIdentity(**extra["prompt"]["base_model"]).check(ident, what=f"PEFT adapter {adapter_dir}")
        if template is None:
            restored = _restore_export(rows, extra, model, tokenizer, verbalizer)
            if restored is not None:
                return restored
            warnings.warn(
                f"{adapter_dir}: the baked hard tokens of this softprompt export no longer match this model's "
                "embeddings and tokenizer (trained further in PEFT?); importing the virtual tokens as soft tokens",
                PeftImportWarning, stacklevel=2,
            )
    return _import_generic(adapter_dir, rows, cfg, extra, model, tokenizer, template, verbalizer)


def _made_for(cfg: dict) -> str:
    name = cfg.get("base_model_name_or_path")
    return f" (made for {name!r})" if name else ""


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter folder names: the original prompt's model for our exports,
    else PEFT's ``base_model_name_or_path`` (None when neither is recorded or readable)."""
    adapter_dir = Path(adapter_dir)
    try:
        extra = _read_extra(adapter_dir)
        if extra is not None:
            return extra["prompt"]["base_model"]["name"] or None
        cfg = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        return (cfg.get("base_model_name_or_path") or None) if isinstance(cfg, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_weights(adapter_dir: Path, cfg: dict, hidden: int) -> torch.Tensor:
    path = adapter_dir / WEIGHTS_FILE
    if not path.exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise PeftImportError(
                f"{adapter_dir} holds adapter_model.bin (pickle), which is not read for safety; re-save the adapter "
                "with save_pretrained(..., safe_serialization=True)"
            )
        raise PeftImportError(f"{adapter_dir} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if WEIGHTS_KEY not in keys:
                raise PeftImportError(f"{path} holds {keys}, not the {WEIGHTS_KEY!r} tensor of a prompt-tuning adapter")
            rows = f.get_tensor(WEIGHTS_KEY)
    except PeftImportError:
        raise
    except Exception as e:
        raise PeftImportError(f"{path} is not a readable safetensors file ({e})") from e
    n = cfg.get("num_virtual_tokens")
    if rows.ndim != 2 or rows.shape[1] != hidden or (n is not None and rows.shape[0] != int(n)):
        raise PeftImportError(
            f"{path}: {WEIGHTS_KEY} has shape {tuple(rows.shape)}; expected (num_virtual_tokens={n}, "
            f"hidden={hidden}) for this model"
        )
    if not torch.isfinite(rows).all():
        raise PeftImportError(f"{path}: {WEIGHTS_KEY} contains NaN or infinite values")
    return rows.to(torch.float32)


def _read_extra(adapter_dir: Path) -> dict | None:
    path = adapter_dir / EXTRA_FILE
    if not path.exists():
        return None
    try:
        extra = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftImportError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(extra, dict) or extra.get("format") != EXTRA_FORMAT:
        return None  # some other tool's file of the same name: treat the folder as a plain PEFT adapter
    if extra.get("version") != EXTRA_VERSION:
        raise PeftImportError(f"{path} has version {extra.get('version')}; this softprompt reads {EXTRA_VERSION}")
    return extra


def _restore_export(rows, extra: dict, model, tokenizer, verbalizer) -> SoftPrompt | None:
    """The original prompt of one of our exports, or None when its baked hard rows changed."""
    meta = extra["prompt"]
    template = Template(meta["template"])
    head_ids = [int(i) for i in extra["baked_ids"]]
    if meta.get("n_prefix") or len(head_ids) != rows.shape[0] or template.prefix_ids(tokenizer) != head_ids:
        return None
    emb = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    soft = torch.zeros(template.n_soft, rows.shape[1])
    for row, i in zip(rows, head_ids):
        if i < 0:
            soft[-i - 1] = row
        elif not torch.allclose(row, emb[i], atol=_BAKED_ATOL, rtol=0):
            return None
    return SoftPrompt(
        embeddings=soft, identity=ModelIdentity.of(model), template=meta["template"],
        verbalizer=dict(verbalizer) if verbalizer else meta.get("verbalizer"),
        task=meta.get("task", ""), kind=TaskKind.CLASSIFICATION if verbalizer else meta.get("kind", TaskKind.CLASSIFICATION),
        method=Method.normalize(meta.get("method", Method.PROMPT_TUNING.value)), init=meta.get("init", ""),
        training=meta.get("training", {}), metrics=meta.get("metrics", {}),
    )


def _import_generic(adapter_dir: Path, rows, cfg: dict, extra: dict | None, model, tokenizer,
                    template: str | None, verbalizer: dict[str, str] | None) -> SoftPrompt:
    emb = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    bos = tokenizer.bos_token_id
    note = "exact: PEFT and softprompt feed the model the same vectors"
    if bos is not None and rows.shape[0] > 0 and torch.allclose(rows[0], emb[bos], atol=_BAKED_ATOL, rtol=0):
        rows = rows[1:]  # the adapter's first virtual token is the BOS our templates start with
        note = "exact: the adapter's first virtual token is the BOS embedding, which our template adds itself"
    elif bos is not None:
        note = ("not exact: softprompt puts the tokenizer's BOS before the virtual tokens; PEFT puts the virtual "
                "tokens first")
    n = int(rows.shape[0])
    if n == 0:
        raise PeftImportError(f"{adapter_dir}: the adapter has no virtual tokens besides BOS")
    if template is None:
        rest = extra["input_template"] if extra is not None else "{text}"
        template = f"{{soft:{n}}}" + rest
    t = Template(template)
    leading = 0
    for seg in t.segments:
        if seg.kind != "soft":
            break
        leading += int(seg.value)  # type: ignore[arg-type]
    if leading != t.n_soft or t.n_soft != n:
        raise PeftImportError(
            f"template {template!r} does not fit this adapter: PEFT puts its {n} virtual tokens before the whole "
            f"input, so the template must start with exactly {n} soft tokens (e.g. '{{soft:{n}}}{{text}}') and have "
            f"none elsewhere; it has {leading} at the start and {t.n_soft} in all"
        )
    if note.startswith("not exact"):
        warnings.warn(
            f"{adapter_dir}: our templates start with the tokenizer's BOS ({tokenizer.bos_token!r}) and then the "
            f"{n} virtual tokens, while PEFT puts the virtual tokens first; scores will differ somewhat from PEFT's",
            PeftImportWarning, stacklevel=3,
        )
    if verbalizer is None and extra is not None:
        verbalizer = extra.get("verbalizer")
    meta = (extra or {}).get("prompt", {})
    return SoftPrompt(
        embeddings=rows.clone(), identity=ModelIdentity.of(model), template=template,
        verbalizer=dict(verbalizer) if verbalizer else None, task=meta.get("task", "") or adapter_dir.name,
        kind=TaskKind.CLASSIFICATION if verbalizer else TaskKind.GENERATION, method=Method.PROMPT_TUNING.value, init="peft",
        training={"imported_from": str(adapter_dir), "peft_config": {
            k: cfg.get(k) for k in ("base_model_name_or_path", "num_virtual_tokens", "peft_version",
                                    "prompt_tuning_init", "task_type")}, "import_note": note},
    )
