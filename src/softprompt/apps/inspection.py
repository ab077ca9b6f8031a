"""Looking inside a soft prompt: nearest vocabulary tokens, norms, drift from the init.

For each soft token this reports

* its ``k`` nearest vocabulary tokens by cosine similarity against the model's
  input-embedding matrix (every row, nothing excluded, special tokens included), with
  the similarity and the token's text (shown with ``repr`` so spaces and newlines are
  visible);
* its L2 norm, and that norm divided by the mean norm of the real token embeddings
  (soft prompts often drift far outside the region real tokens occupy);
* its drift from its initial value: cosine similarity and L2 distance to the init, and
  the L2 distance relative to the init's norm.

The artifact does not store the initial tensor.  It records how it was made (init
method, seed, init text, label words), and ``prompts.init_embeddings`` is a pure function
of those and the base model, so the init is *recomputed*; the output says so.  If the
metadata is not enough (e.g. a ``text`` init whose text was the task's instruction and
was not recorded), drift is reported as unavailable unless an init is given explicitly.

What nearest-token readings can and cannot tell is discussed in
``docs/inspecting-prompts.md``: in short, a soft token is usually not close to any real
token (cosine well below 1), so the "nearest word" is a weak, sometimes misleading hint
(Lester et al. 2021; Khashabi et al. 2022, "Prompt Waywardness").
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core.prompts import ModelIdentity, SoftPrompt, init_embeddings

__all__ = ["format_inspection", "inspect_prompt", "nearest_tokens", "recompute_init"]


def nearest_tokens(vectors: torch.Tensor, embeddings: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities [n, k] and token ids [n, k] of each vector's k nearest rows."""
    v = F.normalize(vectors.float(), dim=-1)
    e = F.normalize(embeddings.float(), dim=-1)
    sims = v @ e.T
    k = min(k, e.shape[0])
    top = sims.topk(k, dim=-1)
    return top.values, top.indices


def recompute_init(prompt: SoftPrompt, model, tokenizer) -> tuple[torch.Tensor | None, str]:
    """The prompt's initial value recomputed from its metadata, and a note saying how."""
    tr = prompt.training or {}
    method = prompt.init or tr.get("init")
    if not method:
        return None, "no init method recorded in the artifact"
    seed = tr.get("seed")
    if seed is None:
        return None, f"init {method!r} recorded without a seed; cannot recompute it"
    text = tr.get("init_text")
    words = list((prompt.verbalizer or {}).values()) or None
    if method == "text" and not text:
        text = _builtin_instruction(prompt.task)
        if not text:
            return None, ("init 'text' used the task's instruction, which the artifact does not record "
                          "(train with --init-text to record it); drift unavailable")
        source = f"the built-in {prompt.task!r} instruction"
    else:
        source = None
    try:
        init = init_embeddings(model, tokenizer, prompt.n_tokens, method, text=text, label_words=words, seed=int(seed))
    except ValueError as e:
        return None, f"cannot recompute init {method!r}: {e}"
    note = f"init recomputed from the artifact's metadata (method={method}, seed={seed}"
    if method == "text":
        note += f", text from {source}" if source else f", text={text!r}"
    if method == "labels":
        note += f", label words={words}"
    return init, note + "); not stored in the file"


def _builtin_instruction(task_name: str) -> str | None:
    """The instruction of a built-in task, if its data can be found (read without examples)."""
    from ..data import BUILTIN_TASKS, load_task

    if task_name not in BUILTIN_TASKS:
        return None
    try:
        return load_task(task_name, limit_per_split=0).task.instruction or None
    except (OSError, ValueError):  # data not present (DataNotFoundError) or unreadable (DataError)
        return None


def _token_text(tokenizer, tid: int) -> tuple[str, str | None]:
    """(decoded text, raw vocabulary piece); the piece is None for rows the tokenizer does
    not know (models often pad their embedding matrix beyond the vocabulary)."""
    try:
        piece = tokenizer.convert_ids_to_tokens(tid)
    except (KeyError, IndexError, ValueError, TypeError, OverflowError):  # pragma: no cover - exotic tokenizers
        piece = None
    try:
        text = tokenizer.decode([tid])
    except (KeyError, IndexError, ValueError, TypeError, OverflowError):  # pragma: no cover
        text = piece or ""
    return text, (str(piece) if piece is not None else None)


def _shown(n: dict) -> str:
    if n["token"]:
        return repr(n["token"])
    return n["piece"] if n.get("piece") else f"<id {n['id']}>"


@torch.no_grad()
def inspect_prompt(
    prompt: SoftPrompt, model, tokenizer, *, k: int = 5, init: torch.Tensor | None = None,
    init_note: str | None = None,
) -> dict[str, Any]:
    """A JSON-ready report on every soft token of ``prompt`` (see the module docstring).

    ``init`` overrides the recomputed initial value (e.g. another prompt file)."""
    prompt.identity.check(ModelIdentity.of(model), what="this prompt")
    emb = model.get_input_embeddings().weight.detach().float().cpu()
    soft = prompt.embeddings.detach().float().cpu()
    norms_v = emb.norm(dim=-1)
    mean_norm = float(norms_v.mean())
    sims, ids = nearest_tokens(soft, emb, k)
    if init is None:
        init, note = recompute_init(prompt, model, tokenizer)
    else:
        note = init_note or "init given explicitly"
    if init is not None and tuple(init.shape) != tuple(soft.shape):
        note = f"init of shape {tuple(init.shape)} does not match the prompt {tuple(soft.shape)}; drift unavailable"
        init = None
    init = init.float().cpu() if init is not None else None
    tokens = []
    for i in range(soft.shape[0]):
        row: dict[str, Any] = {
            "index": i,
            "norm": float(soft[i].norm()),
            "norm_ratio": float(soft[i].norm()) / mean_norm,
            "nearest": [
                {"id": int(t), "token": txt, "piece": piece, "cosine": float(s)}
                for s, t in zip(sims[i].tolist(), ids[i].tolist())
                for txt, piece in [_token_text(tokenizer, int(t))]
            ],
        }
        if init is not None:
            d = float((soft[i] - init[i]).norm())
            row["drift"] = {
                "cosine_to_init": float(F.cosine_similarity(soft[i], init[i], dim=0)),
                "l2_from_init": d,
                "relative_l2": d / max(float(init[i].norm()), 1e-12),
            }
        tokens.append(row)
    if soft.shape[0] > 1:
        sn = F.normalize(soft, dim=-1)
        pair = sn @ sn.T
        off = pair[~torch.eye(soft.shape[0], dtype=torch.bool)]
        pairwise = {"mean": float(off.mean()), "max": float(off.max()), "min": float(off.min())}
    else:
        pairwise = None
    best = [t["nearest"][0]["cosine"] for t in tokens]
    summary = {
        "mean_nearest_cosine": sum(best) / len(best),
        "max_nearest_cosine": max(best),
        "mean_norm_ratio": sum(t["norm_ratio"] for t in tokens) / len(tokens),
    }
    if init is not None:
        summary["mean_cosine_to_init"] = sum(t["drift"]["cosine_to_init"] for t in tokens) / len(tokens)
        summary["mean_relative_drift"] = sum(t["drift"]["relative_l2"] for t in tokens) / len(tokens)
    return {
        "prompt": {
            "task": prompt.task, "template": prompt.template, "method": prompt.method, "init": prompt.init,
            "n_tokens": prompt.n_tokens, "hidden_size": prompt.hidden_size, "base_model": prompt.identity.name,
            "verbalizer": prompt.verbalizer,
        },
        "vocabulary": {
            "size": int(emb.shape[0]), "mean_norm": mean_norm, "median_norm": float(norms_v.median()),
            "min_norm": float(norms_v.min()), "max_norm": float(norms_v.max()),
        },
        "init_source": note,
        "drift_available": init is not None,
        "k": int(sims.shape[1]),
        "tokens": tokens,
        "pairwise_cosine": pairwise,
        "summary": summary,
        "caveat": ("Nearest tokens are a weak hint: soft tokens usually lie far from every real token "
                   "(see the cosines), and prompts whose nearest words read as unrelated text can still "
                   "solve the task (Khashabi et al. 2022). See docs/inspecting-prompts.md."),
    }


def format_inspection(report: dict[str, Any]) -> str:
    """A plain-text rendering of :func:`inspect_prompt`'s report."""
    p, v, s = report["prompt"], report["vocabulary"], report["summary"]
    lines = [
        (f"prompt: {p['n_tokens']} soft tokens x {p['hidden_size']} (task {p['task']!r}, init {p['init']!r}, "
         f"base model {p['base_model']!r})"),
        f"template: {p['template']!r}",
        (f"vocabulary: {v['size']} tokens, mean embedding norm {v['mean_norm']:.3f} "
         f"(median {v['median_norm']:.3f}, range {v['min_norm']:.3f}..{v['max_norm']:.3f})"),
        f"drift: {report['init_source']}",
        "",
    ]
    has_drift = report["drift_available"]
    head = f"{'tok':>4} {'norm':>8} {'xmean':>6} " + (f"{'cos0':>6} {'dL2':>8} " if has_drift else "")
    lines.append(head + f" nearest vocabulary tokens (cosine), top {report['k']}")
    for t in report["tokens"]:
        near = "  ".join(f"{_shown(n)} {n['cosine']:.2f}" for n in t["nearest"])
        drift = ""
        if has_drift:
            d = t["drift"]
            drift = f"{d['cosine_to_init']:>6.2f} {d['l2_from_init']:>8.3f} "
        lines.append(f"{t['index']:>4} {t['norm']:>8.3f} {t['norm_ratio']:>6.2f} {drift} {near}")
    lines.append("")
    lines.append(
        f"mean nearest-token cosine {s['mean_nearest_cosine']:.3f} (max {s['max_nearest_cosine']:.3f}); "
        f"mean norm / mean vocabulary norm {s['mean_norm_ratio']:.2f}"
        + (f"; mean cosine to init {s['mean_cosine_to_init']:.3f}, mean relative drift {s['mean_relative_drift']:.3f}"
           if has_drift else "")
    )
    if report["pairwise_cosine"]:
        pc = report["pairwise_cosine"]
        lines.append(f"cosine between soft tokens: mean {pc['mean']:.3f} (min {pc['min']:.3f}, max {pc['max']:.3f})")
    lines.append("columns: norm = L2 norm; xmean = norm / mean vocabulary norm"
                 + ("; cos0 = cosine to the init; dL2 = L2 distance from the init" if has_drift else ""))
    lines.append("caveat: " + report["caveat"])
    return "\n".join(lines)

