"""Commands on a prompt file: inspect it, export it as a PEFT adapter, import one."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..data.task import TaskKind
from .common import MODEL_HELP, _fail, _load_model, _verbalizer, app, console, err


def _cmp_default_model(identity_name: str) -> str:
    """The embedded alias (or local folder) a prompt was trained on, else the default model."""
    from ..families.loading import DEFAULT_MODEL, EMBEDDED_MODELS

    for alias, spec in EMBEDDED_MODELS.items():
        if identity_name in (alias, spec.display_name):
            return alias
    return identity_name if Path(identity_name).is_dir() else DEFAULT_MODEL


@app.command("inspect")
def inspect_cmd(
    prompt: Path = typer.Argument(..., help="A prompt .safetensors."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the prompt's own base model."),
    top_k: int = typer.Option(5, help="Nearest vocabulary tokens per soft token."),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON (for machines)."),
    init_from: Optional[Path] = typer.Option(None, help="Measure drift from this prompt file instead of the recomputed init."),
):
    """For each soft token: nearest vocabulary tokens by cosine, norm relative to real token
    embeddings, and drift from the initialisation. Nearest tokens are a weak hint; see
    docs/inspecting-prompts.md."""
    from ..apps.inspection import format_inspection, inspect_prompt
    from ..core.prompts import PromptFileError, PromptMismatchError, SoftPrompt

    try:
        sp = SoftPrompt.load(prompt)
        init = SoftPrompt.load(init_from).embeddings if init_from else None
    except (PromptFileError, FileNotFoundError) as e:
        _fail(str(e))
    m, tok = _load_model(model or _cmp_default_model(sp.identity.name))
    try:
        report = inspect_prompt(sp, m, tok, k=top_k, init=init,
                                init_note=f"init taken from {init_from}" if init_from else None)
    except PromptMismatchError as e:
        _fail(str(e))
    if json_out:
        sys.stdout.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_inspection(report) + "\n")


# ----------------------------------------------------------------------------- export / import (Hugging Face PEFT)
@app.command("export")
def export_cmd(
    prompt: Path = typer.Argument(..., help="A prompt .safetensors (from `softprompt train`)."),
    out_dir: Path = typer.Argument(..., help="Adapter folder to write (created if missing; its adapter files are replaced)."),
    format: str = typer.Option("peft", "--format", help="Output format. Only 'peft': a Hugging Face PEFT adapter folder."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the prompt's own base model."),
):
    """Write a prompt as a Hugging Face PEFT adapter that `PeftModel.from_pretrained(base_model, OUT_DIR)`
    loads and that scores like `softprompt eval`. Everything before the template's first input field
    (BOS, soft tokens, instruction text) is baked into the adapter's virtual tokens; OUT_DIR/README.md
    says which text to feed and how labels are scored. Prompts with soft tokens after an input field
    cannot be exported (PEFT puts all virtual tokens before the input)."""
    from ..apps.interop.peft import PeftExportError, export_peft
    from ..core.prompts import PromptFileError, PromptMismatchError, SoftPrompt

    if format.lower() != "peft":
        _fail(f"--format {format!r}: the only export format is 'peft' (a Hugging Face PEFT adapter folder)")
    try:
        sp = SoftPrompt.load(prompt)
    except (PromptFileError, FileNotFoundError) as e:
        _fail(str(e))
    m, tok = _load_model(model or _cmp_default_model(sp.identity.name))
    try:
        info = export_peft(sp, m, tok, out_dir)
    except (PeftExportError, PromptMismatchError) as e:
        _fail(str(e))
    console.print(f"wrote {out_dir} ({info.peft_type}, {info.num_virtual_tokens} virtual tokens = {info.baked!r})",
                  markup=False)
    console.print(f"PEFT input: {info.input_template!r} with the fields filled in, tokenized without special "
                  f"tokens; details in {out_dir / 'README.md'}", markup=False)


@app.command("import")
def import_cmd(
    adapter_dir: Path = typer.Argument(..., help="A PEFT prompt-tuning adapter folder (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Argument(..., help="The prompt file to write, e.g. prompt.safetensors."),
    template: Optional[str] = typer.Option(None, help="Template for the adapter's N virtual tokens; must start with {soft:N}, "
                                           "e.g. '{soft:20}Tweet: {text}\\nAnswer:'. Default: the original template "
                                           "(folders from `softprompt export`), else '{soft:N}{text}'."),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label (makes a classification prompt; "
                                                   "a space is put before WORD unless --template ends in a line "
                                                   "break or space). Repeatable."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the adapter's base model when it names one "
                                        "we know, else smollm2-135m."),
    task: Optional[str] = typer.Option(None, help="Task name stored in the prompt (default: the adapter's)."),
):
    """Turn a Hugging Face PEFT prompt-tuning adapter into a softprompt prompt file, to use with
    `softprompt eval`, `predict` and `serve`. The adapter's hidden size and layer count must match
    the model."""
    import warnings

    from rich.markup import escape

    from ..apps.interop.peft import PeftImportError, PeftImportWarning
    from ..apps.interop.peft_import import adapter_base_model, import_peft
    from ..core.prompts import PromptMismatchError
    from ..core.templates import TemplateError

    verb = _verbalizer(verbalizer, template or "{text}")  # the default templates end in text
    if model is None:
        named = adapter_base_model(adapter_dir)
        model = (named if named and Path(named).is_dir() else
                 _cmp_default_model(named.rsplit("/", 1)[-1]) if named else None) or "smollm2-135m"
    m, tok = _load_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PeftImportWarning)
        try:
            sp = import_peft(adapter_dir, m, tok, template=template, verbalizer=verb or None)
        except (PeftImportError, PromptMismatchError, TemplateError, FileNotFoundError) as e:
            _fail(str(e))
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    if task:
        sp.task = task
    size = sp.save(out)
    console.print(f"saved {out} ({size:,} bytes: {sp.n_tokens} soft tokens, template {sp.template!r}, "
                  f"{'labels ' + ', '.join(sp.labels) if sp.verbalizer else TaskKind.GENERATION})", markup=False)

