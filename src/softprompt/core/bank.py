"""PromptBank: many prompts for one frozen model, selected per example by an index.

Every batch carries, per example, the index of the bank entry (task prompt) it uses.
Training one prompt, ensembles, evaluation and serving many tasks at once are then the
same code path with different indices.

An entry is a template plus its soft-token embeddings (and, for classification, its
verbalizer).  The template's example-independent head (BOS, leading soft tokens,
instruction text: see ``templates.py``) is turned into per-layer key/values once per
entry and gathered per example, so a 20-token prompt costs nothing per query at
inference.  While an entry's embeddings require grad (training) its key/values are
recomputed on every call, once per entry rather than once per example.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache_api import cache_arg, cache_layers, make_cache, output_cache
from .method import Method
from .prompts import ModelIdentity, SoftPrompt
from .templates import Template, encode_text
from ..data.task import TaskKind


def pad_right(seqs: list[list[int]], *, pad: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into [B, T] ids and a [B, T] long mask."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@dataclass
class BankEntry:
    name: str
    template: Template
    soft: torch.Tensor  # [n_soft, hidden]; may require grad
    verbalizer: dict[str, str] | None = None
    kind: str = TaskKind.CLASSIFICATION
    prefix_ids: list[int] = field(default_factory=list)  # rendered head, soft tokens as negative ids
    label_ids: list[list[int]] = field(default_factory=list)  # verbalizer words as token ids
    method: str = Method.PROMPT_TUNING.value
    # prefix tuning: learned key/values at every layer, [n_layers, 2, kv_heads, n_prefix, head_dim],
    # placed before the template's head (positions 0..n_prefix-1)
    kv: torch.Tensor | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer or {})

    @property
    def n_prefix(self) -> int:
        return 0 if self.kv is None else int(self.kv.shape[3])

    def trainable(self) -> bool:
        return self.soft.requires_grad or (self.kv is not None and self.kv.requires_grad)

    def tensors(self) -> tuple:
        """What the cached key/values were computed from (identity check for the cache)."""
        return (id(self.soft), id(self.kv))


@dataclass
class PrefixKV:
    """Per-layer key/values of the gathered prefixes, right-padded to a common length."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # each [B, kv_heads, P, head_dim]
    mask: torch.Tensor  # [B, P] long, 1 = real prefix token
    lengths: torch.Tensor  # [B] number of real prefix tokens


#: model -> its family (``softprompt.families.family_for``), installed when that package is
#: imported (``softprompt/__init__.py`` does): banks carry their family so that core code asks
#: ``bank.family`` for the family-specific steps without importing the layer above it.
_family_resolver = None


def install_family_resolver(resolver) -> None:
    global _family_resolver
    _family_resolver = resolver


def family_of(model):
    """The family of ``model``, through the resolver ``softprompt.families`` installs."""
    if _family_resolver is None:  # pragma: no cover (softprompt/__init__.py imports the families)
        raise RuntimeError("no model-family resolver: import softprompt.families first")
    return _family_resolver(model)


class NamedEntries:
    """Prompts of one frozen model in registration order, found by name: what the decoder
    :class:`PromptBank` and the encoder ``EncoderBank`` share (each sets ``model``,
    ``entries`` and ``_index``)."""

    def __len__(self) -> int:
        return len(self.entries)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no prompt named {name!r}; the bank has {sorted(self._index)}") from None

    @property
    def device(self) -> torch.device:
        """Where the frozen model's input embeddings live (inputs and prompts are moved there)."""
        return self.model.get_input_embeddings().weight.device

    def embed(self, ids: torch.Tensor, entry_of_row: torch.Tensor) -> torch.Tensor:
        """Word embeddings of right-padded ``ids`` [B, T] where a negative id ``-k-1`` of a row is
        row ``k`` of that row's entry's soft tokens: how soft tokens enter any model (decoder,
        encoder-decoder, encoder).  Inputs may sit on another device than the model."""
        emb_layer = self.model.get_input_embeddings()
        ids, entry_of_row = ids.to(emb_layer.weight.device), entry_of_row.to(emb_layer.weight.device)
        out = emb_layer(ids.clamp(min=0))
        soft_pos = ids < 0
        if not bool(soft_pos.any()):
            return out
        for e in entry_of_row.unique().tolist():
            sel = soft_pos & (entry_of_row == e)[:, None]
            if not bool(sel.any()):
                continue
            soft = self.entries[e].soft.to(out.dtype)
            vals = soft[(-ids - 1).clamp(min=0, max=soft.shape[0] - 1)]  # [B, T, d]
            out = torch.where(sel[..., None], vals, out)
        return out


class PromptBank(NamedEntries):
    """An ordered set of entries for one frozen model and tokenizer."""

    def __init__(self, model, tokenizer, *, family=None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family or family_of(model)  # scoring and training dispatch through it
        self.identity = ModelIdentity.of(model)
        self.entries: list[BankEntry] = []
        self._index: dict[str, int] = {}
        self._kv_cache: dict[int, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    # ------------------------------------------------------------------ entries
    def add(
        self,
        name: str,
        template: str | Template,
        soft: torch.Tensor | None = None,
        *,
        verbalizer: dict[str, str] | None = None,
        kind: str = TaskKind.CLASSIFICATION,
        method: str = Method.PROMPT_TUNING.value,
        kv: torch.Tensor | None = None,
    ) -> int:
        """Add (or replace, by name) an entry; returns its index.

        ``soft`` fills the template's ``{soft:N}`` slots (prompt tuning, P-tuning); ``kv``
        holds per-layer key/values [n_layers, 2, kv_heads, n_prefix, head_dim] placed before
        everything else (prefix tuning).  Both may be given."""
        template = template if isinstance(template, Template) else Template(template)
        hidden = self.identity.hidden_size
        if soft is None:
            soft = torch.zeros(template.n_soft, hidden)
        check_soft_fit(f"prompt {name!r}", template, soft, hidden)
        if kind == TaskKind.CLASSIFICATION:
            if not verbalizer:
                raise ValueError(f"prompt {name!r}: a classification prompt needs a verbalizer (label -> words)")
            label_ids = [encode_text(self.tokenizer, w) for w in verbalizer.values()]
            for lab, ids in zip(verbalizer, label_ids):
                if not ids:
                    raise ValueError(f"prompt {name!r}: verbalizer word for label {lab!r} has no tokens")
        else:
            label_ids = []
        if kv is not None:
            want = self.kv_shape(None)
            if kv.ndim != 5 or tuple(kv.shape[:3]) != want[:3] or kv.shape[4] != want[4]:
                raise ValueError(
                    f"prompt {name!r}: prefix key/values of shape {tuple(kv.shape)} do not fit this model "
                    f"(expected [{want[0]}, 2, {want[2]}, n_prefix, {want[4]}])"
                )
            method = Method.PREFIX_TUNING.value if method == Method.PROMPT_TUNING else method
            kv = kv.to(self.device)
        soft = soft.to(self.device)  # a no-op when already there; differentiable when not
        entry = BankEntry(
            name=name, template=template, soft=soft, verbalizer=dict(verbalizer) if verbalizer else None,
            kind=kind, prefix_ids=template.prefix_ids(self.tokenizer), label_ids=label_ids, method=method, kv=kv,
        )
        if name in self._index:
            i = self._index[name]
            self.entries[i] = entry
        else:
            i = len(self.entries)
            self.entries.append(entry)
            self._index[name] = i
        self._kv_cache.pop(i, None)
        return i

    def add_prompt(self, prompt: SoftPrompt, name: str | None = None) -> int:
        """Add a saved artifact after checking it was trained for this bank's model."""
        prompt.identity.check(self.identity, what=f"prompt {name or prompt.task!r}")
        if prompt.head is not None:
            raise ValueError(f"prompt {name or prompt.task!r} carries a classification head for an encoder model; "
                             "load it into softprompt.families.encoder.EncoderBank")
        kv = prompt.kv.to(self.device, self._dtype()) if prompt.kv is not None else None
        return self.add(
            name or prompt.task, prompt.template, prompt.embeddings.to(self.device, self._dtype()),
            verbalizer=prompt.verbalizer, kind=prompt.kind, method=prompt.method, kv=kv,
        )

    def kv_shape(self, n_prefix: int | None) -> tuple:
        """Shape of a prefix-tuning tensor for this model: [n_layers, 2, kv_heads, n_prefix, head_dim]."""
        s = model_shape(self.model)
        return (s["layers"], 2, s["kv_heads"], n_prefix, s["head_dim"])

    def suffix_ids(self, i: int, fields: dict[str, str]) -> list[int]:
        return self.entries[i].template.suffix_ids(self.tokenizer, fields)


    def _dtype(self):
        return self.model.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------ prefix KV
    def prefix_kv(self, entry_idx: torch.Tensor) -> PrefixKV:
        """Key/values of each example's prefix, computed once per entry and gathered per row."""
        uniq = entry_idx.unique().tolist()
        per_entry: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        todo = []
        for e in uniq:
            cached = self._kv_cache.get(e)
            if cached is not None and cached[0] == self.entries[e].tensors() and not self.entries[e].trainable():
                per_entry[e] = cached[1]
            else:
                todo.append(e)
        if todo:
            for e, kv in zip(todo, self._compute_prefix_kv(todo)):
                per_entry[e] = kv
                if not self.entries[e].trainable():
                    self._kv_cache[e] = (self.entries[e].tensors(), kv)
        lengths_u = {e: int(per_entry[e][0][0].shape[-2]) for e in uniq}
        p_max = max(lengths_u.values())
        n_layers = len(next(iter(per_entry.values())))
        pos = {e: j for j, e in enumerate(uniq)}
        gather = torch.tensor([pos[e] for e in entry_idx.tolist()], device=entry_idx.device)
        layers = []
        for layer in range(n_layers):
            ks, vs = [], []
            for e in uniq:
                k, v = per_entry[e][layer]
                pad = p_max - k.shape[-2]
                if pad:
                    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
                    v = torch.nn.functional.pad(v, (0, 0, 0, pad))
                ks.append(k)
                vs.append(v)
            k_all = torch.stack(ks).index_select(0, gather.to(ks[0].device))
            v_all = torch.stack(vs).index_select(0, gather.to(vs[0].device))
            layers.append((k_all, v_all))
        lengths = torch.tensor([lengths_u[e] for e in entry_idx.tolist()], device=entry_idx.device)
        mask = (torch.arange(p_max, device=entry_idx.device)[None, :] < lengths[:, None]).long()
        return PrefixKV(layers=layers, mask=mask, lengths=lengths)

    def compute_prefix_kv(self, entries: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The entries' prefix key/values, computed now and not cached.  With
        :meth:`set_prefix_kv` this lets a caller run the (possibly long) computation on a
        thread of its own and install the result in a quick step: the serving engine does,
        so that registering a long template does not stall the requests of other tasks."""
        return self._compute_prefix_kv(entries)

    def set_prefix_kv(self, i: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Install ``layers`` (from :meth:`compute_prefix_kv` of a bank holding the same prompt)
        as entry ``i``'s cached prefix key/values."""
        want = len(self.entries[i].prefix_ids) + self.entries[i].n_prefix
        if len(layers) != self.kv_shape(0)[0] or any(k.shape[-2] != want or v.shape[-2] != want for k, v in layers):
            raise ValueError(f"prefix key/values for entry {self.entries[i].name!r} do not fit its prompt")
        self._kv_cache[i] = (self.entries[i].tensors(), layers)

    def _compute_prefix_kv(self, entries: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run the heads of ``entries`` through the frozen model in one right-padded batch
        (prefix-tuned entries one by one, on top of their learned key/values)."""
        deep = [e for e in entries if self.entries[e].kv is not None]
        if deep:
            flat = [e for e in entries if self.entries[e].kv is None]
            done = dict(zip(flat, self._compute_prefix_kv(flat))) if flat else {}
            done.update({e: self._deep_prefix_kv(e) for e in deep})
            return [done[e] for e in entries]
        device = self.device
        ids, mask = pad_right([self.entries[e].prefix_ids for e in entries], device=device)
        if ids.shape[1] == 0:  # no BOS and the template starts with a field: nothing to precompute
            kvh, hd = self.kv_shape(0)[2], self.kv_shape(0)[4]
            empty = torch.zeros(kvh, 0, hd, device=device, dtype=self._dtype())
            return [[(empty, empty)] * self.kv_shape(0)[0] for _ in entries]
        rows = torch.tensor(entries, device=device)
        embeds = self.embed(ids, rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        grad = any(self.entries[e].trainable() for e in entries)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = self.model.base_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True
            )
        keep = mask.bool()[:, None, :, None]
        result: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in entries]
        for k, v in cache_layers(output_cache(out)):
            # zero the padded slots: their values are never attended to, but a NaN there
            # (a fully masked row) would still poison the weighted sum.
            k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
            v = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
            for j, e in enumerate(entries):
                n = len(self.entries[e].prefix_ids)
                result[j].append((k[j, :, :n], v[j, :, :n]))
        return result

    def _deep_prefix_kv(self, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Learned key/values, then the template head run on top of them."""
        entry = self.entries[e]
        kv = entry.kv.to(self._dtype())
        learned = [(kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])]
        if not entry.prefix_ids:
            return learned
        device = self.device
        ids = torch.tensor([entry.prefix_ids], device=device)
        embeds = self.embed(ids, torch.tensor([e], device=device))
        n_p = entry.n_prefix
        mask = torch.ones(1, n_p + ids.shape[1], dtype=torch.long, device=device)
        positions = n_p + torch.arange(ids.shape[1], device=device)[None, :]
        with torch.set_grad_enabled(entry.trainable() and torch.is_grad_enabled()):
            out = self.model.base_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                **cache_arg(self.model.base_model, make_cache([(k[None], v[None]) for k, v in learned])), use_cache=True,
            )
        return [(k[0], v[0]) for k, v in cache_layers(output_cache(out))]

    # ------------------------------------------------------------------ removal
    def remove(self, name: str) -> None:
        """Remove the entry ``name``; later entries move down one index (their cached
        key/values move with them).  Callers must not hold indices across a removal."""
        i = self.index(name)
        del self.entries[i]
        self._index = {e.name: j for j, e in enumerate(self.entries)}
        self._kv_cache = {(k - 1 if k > i else k): v for k, v in self._kv_cache.items() if k != i}


def model_shape(model) -> dict[str, int]:
    """The one reading of a model's shape: ``layers``, ``heads``, ``kv_heads``, ``head_dim`` (from
    the text config, whatever its field names) and ``hidden`` (the input-embedding width, the size
    of a soft token).  Used for prefix key/values here and by the PEFT export/import."""
    cfg = model.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = model.get_input_embeddings().weight.shape[1]
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", None) or hidden) // heads
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return {"layers": int(layers), "heads": int(heads), "kv_heads": int(kv_heads), "head_dim": int(head_dim),
            "hidden": int(hidden)}


def check_soft_fit(what: str, template: Template, soft: torch.Tensor, hidden: int, error: type[Exception] = ValueError) -> None:
    """The one check that a prompt's soft tokens fit its template and model: a [n_soft, hidden]
    matrix with one row per ``{soft:N}`` slot.  Used by :meth:`PromptBank.add` and by the server
    before it accepts a prompt (which raises its own ``error`` type)."""
    if soft.ndim != 2 or soft.shape[1] != hidden:
        raise error(f"{what}: embeddings of shape {tuple(soft.shape)} do not fit hidden size {hidden}")
    if soft.shape[0] != template.n_soft:
        raise error(f"{what}: template {template.text!r} has {template.n_soft} soft tokens but the prompt has {soft.shape[0]}")
