"""Hugging Face PEFT interoperability: a soft prompt as a PEFT adapter folder, and back.

PEFT's prompt tuning stores ``num_virtual_tokens`` vectors and, at every forward pass,
puts them *in front of the whole input*.  Our templates are more general: hard text may
sit before and after the soft slots (``BOS + {soft:20} + "Tweet: {text}\\nAnswer:"``)
and soft slots may even follow an input field.  The two meet where a template's soft
tokens all come before its first input field: everything before that field (BOS, any
text, the soft tokens) does not depend on the example, so it can be *baked* into the
virtual tokens, and the rest of the template is what a PEFT user feeds as input.  The
text between the soft slot and the field is baked too, not only what precedes the slot:
its token ids are then exactly ours (no re-tokenization at the soft/text boundary) and
the user's input starts at the first field.

* Prompt tuning (``{soft:N}`` slots): hard tokens of that head are baked as their own
  input embeddings, so the adapter's virtual tokens are exactly the embeddings our
  scorer feeds the model, at the same positions.  The adapter is PEFT
  ``PROMPT_TUNING`` with ``num_virtual_tokens = len(head)``.
* Prefix tuning (learned key/values at every layer): the learned key/values and the
  head run on top of them are baked into PEFT ``PREFIX_TUNING`` key/values (the key/
  value cache of the whole head), which PEFT also places before the whole input.

Either way PEFT then computes the same numbers as our scorer for the same input ids (the
tests check log-probs to 1e-4).  What the PEFT user must feed, and the verbalizer, are
recorded in ``softprompt.json`` and the folder's README: the rest of the template with
the fields filled in, tokenized *without* special tokens (BOS is already baked in).
Templates with a soft token after an input field cannot be expressed and are refused.

Import reads a PEFT ``PROMPT_TUNING`` folder into a :class:`SoftPrompt`.  One mismatch
cannot be expressed in our templates: they always start with the tokenizer's BOS (when it
has one), PEFT puts its virtual tokens before everything.  A first virtual token that *is* the BOS
embedding (as in our own exports) is taken as that BOS and the import is exact;
otherwise our scorer puts a BOS in front of the virtual tokens, which PEFT did not see,
and :class:`PeftImportWarning` says so.  A folder we exported ourselves comes back as the
original prompt (template, verbalizer, metadata).

Files are written and read here directly (JSON + safetensors), so neither direction needs
``peft`` installed; the tests check the folders with the real library.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.bank import model_shape
from ...core import atomic
from ...core.method import Method
from ...core.prompts import ModelIdentity, SoftPrompt, _json_default
from ...core.templates import Template

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "softprompt.json"
README_FILE = "README.md"
#: The tensor name PEFT stores prompt-learning adapters under.
WEIGHTS_KEY = "prompt_embeddings"
EXTRA_FORMAT = "softprompt-peft-export"
EXTRA_VERSION = 1
#: Baked hard-token rows count as untouched when within this of the model's embedding row.
_BAKED_ATOL = 1e-6


class PeftExportError(ValueError):
    """A prompt that cannot be written as a PEFT adapter (the message says why)."""


class PeftImportError(ValueError):
    """A folder that cannot be read as a PEFT prompt-tuning adapter for this model."""


class PeftImportWarning(UserWarning):
    """An imported adapter that our scorer will not run exactly as PEFT does."""


@dataclass
class PeftExport:
    """What :func:`export_peft` wrote."""

    out_dir: Path
    peft_type: str  # "PROMPT_TUNING" | "PREFIX_TUNING"
    num_virtual_tokens: int
    baked: str  # human-readable rendering of the baked head, N soft tokens as <soft xN>
    input_template: str  # what a PEFT user feeds, with {field} placeholders
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- shared
def _check_decoder_only(model, what: str, err: type[ValueError]) -> None:
    from ...families import UnsupportedError, family_for

    try:
        family_for(model).require("peft")
    except UnsupportedError as e:
        raise err(f"{what}: {e}") from None


def _split_template(template: Template) -> tuple[int, str]:
    """(soft tokens before the first field, the template text from the first field on).

    The trailing spaces of the text just before the first field travel with the field when
    rendering (``templates.py``), so they start the returned input template.
    """
    segs = template.segments
    first = template.first_field
    head_soft = sum(s.value for s in segs[:first] if s.kind == "soft")  # type: ignore[misc]
    lead = ""
    if 0 < first < len(segs) and segs[first - 1].kind == "text":
        text = str(segs[first - 1].value)
        lead = text[len(text.rstrip(" ")):]
    rest = []
    for seg in segs[first:]:
        if seg.kind == "field":
            rest.append("{" + str(seg.value) + "}")
        elif seg.kind == "text":
            rest.append(str(seg.value).replace("{", "{{").replace("}", "}}"))
        else:
            rest.append("{soft:" + str(seg.value) + "}")
    return head_soft, lead + "".join(rest)


def render_peft_input(input_template: str, fields: dict[str, Any]) -> str:
    """The text a PEFT user tokenizes (without special tokens) for one example: the input
    template with each field's value, stripped as our renderer strips it, filled in.

    Our renderer tokenizes each literal and each field on its own; for BPE tokenizers that
    split on spaces and newlines this is the same as tokenizing the rendered string, which
    is what this helper is for (the exact ids are ``Template.suffix_ids``)."""
    t = Template(input_template)
    missing = [f for f in t.fields if f not in fields]
    if missing:
        raise ValueError(f"input template {input_template!r} needs fields {missing}; got {sorted(fields)}")
    return t.render_text({k: str(v).strip() for k, v in fields.items()})


# ----------------------------------------------------------------------------- export
def export_peft(prompt: SoftPrompt, model, tokenizer, out_dir: str | os.PathLike) -> PeftExport:
    """Write ``prompt`` as a PEFT adapter folder that ``PeftModel.from_pretrained(model, out_dir)``
    loads and runs exactly as our scorer does.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format),
    ``softprompt.json`` (the input template, verbalizer and the original prompt's metadata)
    and ``README.md`` (how to feed the adapter).  Raises :class:`PeftExportError` for
    prompts PEFT cannot express, and ``PromptMismatchError`` when ``model`` is not the
    prompt's base model.
    """
    out_dir = Path(out_dir)
    ident = ModelIdentity.of(model)
    prompt.identity.check(ident, what="this prompt")
    _check_decoder_only(model, "cannot export", PeftExportError)
    if getattr(prompt, "head", None):
        raise PeftExportError(
            "cannot export: this prompt carries a trained classification head (encoder model); a PEFT "
            "prompt-tuning adapter holds input vectors only"
        )
    template = Template(prompt.template)
    if template.n_soft != prompt.n_tokens:
        raise PeftExportError(
            f"cannot export: template {prompt.template!r} has {template.n_soft} soft tokens but the prompt "
            f"holds {prompt.n_tokens} vectors"
        )
    head_soft, input_template = _split_template(template)
    if head_soft != template.n_soft:
        field_name = template.segments[template.first_field].value
        raise PeftExportError(
            f"cannot export: template {prompt.template!r} has soft tokens after the input field "
            f"{{{field_name}}}. PEFT prompt tuning puts all its virtual tokens before the whole input, "
            "so soft tokens between or after input text have no PEFT equivalent. Only prompts whose "
            "{soft:N} slots all come before the first field can be exported (e.g. "
            "'{soft:20} Tweet: {text}\\nAnswer:')."
        )
    head_ids = template.prefix_ids(tokenizer)
    if not head_ids:
        raise PeftExportError(
            f"cannot export: template {prompt.template!r} has nothing before its first field (no BOS, no soft "
            "tokens, no text), so there are no virtual tokens to write"
        )
    shape = model_shape(model)
    if prompt.kv is None:
        peft_type = Method.PROMPT_TUNING.name
        weights = _baked_embeddings(prompt, model, head_ids)
        config = {
            "num_attention_heads": shape["heads"],
            "prompt_tuning_init": "RANDOM",  # irrelevant on load: the saved vectors replace the init
            "prompt_tuning_init_text": None,
            "tokenizer_kwargs": None,
            "tokenizer_name_or_path": None,
            "token_dim": shape["hidden"],
        }
    else:
        peft_type = Method.PREFIX_TUNING.name
        weights = _baked_key_values(prompt, model, tokenizer, shape)
        kv_dim = shape["kv_heads"] * shape["head_dim"]
        # PEFT sizes prefixes of grouped-query models by their key/value heads (token_dim = kv_heads * head_dim)
        config = {
            "encoder_hidden_size": kv_dim,
            "init_weights": None,
            "num_attention_heads": shape["kv_heads"],
            "prefix_projection": False,
            "token_dim": kv_dim,
        }
    n_virtual = int(weights.shape[0])
    config.update({
        "auto_mapping": None,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_layers": shape["layers"],
        "num_transformer_submodules": 1,
        "num_virtual_tokens": n_virtual,
        "peft_type": peft_type,
        "revision": None,
        "task_type": "CAUSAL_LM",
    })
    baked = _render_head(tokenizer, head_ids)
    extra = {
        "format": EXTRA_FORMAT,
        "version": EXTRA_VERSION,
        "peft_type": peft_type,
        "num_virtual_tokens": n_virtual,
        "baked_ids": head_ids,  # the head as token ids; -(k+1) is soft token k
        "baked": baked,
        "n_prefix": prompt.n_prefix,
        "input_template": input_template,
        "fields": list(template.fields),
        "add_special_tokens": False,
        "verbalizer": prompt.verbalizer,
        "kind": prompt.kind,
        "prompt": json.loads(json.dumps(prompt.metadata(), default=_json_default)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tensor = weights.detach().to("cpu", torch.float32).contiguous()
    # mode 0644: a temp file starts as 0600, and an adapter folder is meant to be shared
    atomic.write_safetensors(out_dir / WEIGHTS_FILE, {WEIGHTS_KEY: tensor}, metadata={"format": "pt"}, mode=0o644)
    for name, text in (
        (CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n"),
        (EXTRA_FILE, json.dumps(extra, indent=1, ensure_ascii=False) + "\n"),
        (README_FILE, _readme(prompt, extra, config)),
    ):
        atomic.write_text(out_dir / name, text, mode=0o644)
    return PeftExport(out_dir=out_dir, peft_type=peft_type, num_virtual_tokens=n_virtual, baked=baked,
                      input_template=input_template, files=[CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE, README_FILE])


def _render_head(tokenizer, head_ids: list[int]) -> str:
    """The baked head for people: hard runs decoded (special tokens shown), soft runs as <soft xN>."""
    out, run, n_soft = [], [], 0
    for i in [*head_ids, None]:
        if (i is None or i < 0) and run:
            out.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
        if (i is None or i >= 0) and n_soft:
            out.append(f"<soft x{n_soft}>")
            n_soft = 0
        if i is not None:
            if i < 0:
                n_soft += 1
            else:
                run.append(i)
    return "".join(out)


def _baked_embeddings(prompt: SoftPrompt, model, head_ids: list[int]) -> torch.Tensor:
    """The head as input vectors: soft tokens from the prompt, hard tokens from the model's embeddings."""
    emb = model.get_input_embeddings().weight.detach().to("cpu", torch.float32)
    soft = prompt.embeddings.detach().to("cpu", torch.float32)
    return torch.stack([soft[-i - 1] if i < 0 else emb[i] for i in head_ids])


def _baked_key_values(prompt: SoftPrompt, model, tokenizer, shape: dict[str, int]) -> torch.Tensor:
    """The key/value cache of the whole head (learned prefix + BOS, soft tokens, text) in PEFT's
    prefix-tuning layout: (n_virtual, layers * 2 * kv_heads * head_dim), ordered (layer, k/v, head, dim)."""
    from ...core.bank import PromptBank

    bank = PromptBank(model, tokenizer)
    entry = bank.add_prompt(prompt, "export")
    with torch.no_grad():
        kv = bank.prefix_kv(torch.tensor([entry], device=model.get_input_embeddings().weight.device))
    stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in kv.layers])  # [L, 2, kvh, P, hd]
    n_virtual = stacked.shape[3]
    want = (shape["layers"], 2, shape["kv_heads"], n_virtual, shape["head_dim"])
    if tuple(stacked.shape) != want:  # pragma: no cover - a model whose cache is not [B, kvh, P, hd]
        raise PeftExportError(f"cannot export: this model's key/value cache has shape {tuple(stacked.shape)}, "
                              f"expected {want}; PEFT prefix tuning cannot hold it")
    return stacked.permute(3, 0, 1, 2, 4).reshape(n_virtual, -1).to("cpu", torch.float32)


def _readme(prompt: SoftPrompt, extra: dict, config: dict) -> str:
    """The adapter's model card: what is baked in, what to feed, how labels are scored."""
    base = config.get("base_model_name_or_path") or prompt.identity.name
    verb = extra["verbalizer"]
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(str(base))}",
        "tags:",
        "- softprompt",
        f"- {config['peft_type'].lower().replace('_', '-')}",
        "---",
        "",
        f"# {prompt.task or 'soft prompt'} ({config['peft_type']}, {extra['num_virtual_tokens']} virtual tokens)",
        "",
        (f"Exported by `softprompt export --format peft` from a soft prompt trained on base model "
         f"`{prompt.identity.name}` (hidden size {prompt.identity.hidden_size}). Load it with "
         "`PeftModel.from_pretrained(base_model, this_folder)`."),
        "",
        f"Original template: `{prompt.template!r}`.",
        "",
        ("The template's example-independent head is baked into the virtual tokens"
         + (" as the key/value cache of every layer" if config["peft_type"] == "PREFIX_TUNING" else
            " (hard tokens as their own input embeddings)")
         + f": `{extra['baked']!r}` (`<soft xN>` = N trained vectors). Do **not** add BOS or other special "
         "tokens yourself: feed only the rest of the template,"),
        "",
        "```",
        extra["input_template"],
        "```",
        "",
        (f"with each field ({', '.join('`{' + f + '}`' for f in extra['fields']) or 'none'}) replaced by its value "
         "(leading/trailing whitespace stripped), tokenized with `add_special_tokens=False`."),
        "",
    ]
    if verb:
        lines += [
            ("Classification: score each label word as a continuation of that input (sum of its tokens' "
             "log-probs, each word tokenized on its own without special tokens) and pick the best:"),
            "",
            "| label | word |",
            "|---|---|",
            *[f"| {lab} | `{word!r}` |" for lab, word in verb.items()],
            "",
        ]
    lines += [
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this folder>\")",
        f"text = {extra['input_template']!r}.format(" + ", ".join(f"{f}=value.strip()" for f in extra["fields"]) + ")",
        "ids = tokenizer(text, add_special_tokens=False, return_tensors=\"pt\").input_ids",
        "next_token_logits = model(input_ids=ids).logits[0, -1]",
        "```",
        "",
        ("`softprompt import` turns this folder back into the original prompt (`softprompt.json` keeps its "
         "metadata)."),
        "",
    ]
    return "\n".join(lines)
