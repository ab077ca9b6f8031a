"""What is available: ``softprompt models list|capabilities|convert`` and ``softprompt tasks``."""
from __future__ import annotations

import typer
from rich.table import Table

from .common import _fail, _results_table, app, console, models_app


# ----------------------------------------------------------------------------- models / tasks
@models_app.command("list")
def models_list():
    """Show the embedded models, whether installed and converted."""
    from ..families.loading import list_models

    rows = [{"alias": r["alias"], "model": r["display_name"], "installed": r["installed"],
             "converted": r["converted"], "cache": str(r["cache_path"])} for r in list_models()]
    console.print(_results_table(rows, "embedded models"))


@models_app.command("capabilities")
def models_capabilities():
    """Show what each model family supports (methods, scoring, serving): the table the code checks."""
    from ..families import FAMILIES, FAMILY_TITLES, capability_rows

    table = Table(title="model families: what each supports")
    table.add_column("capability")
    for f in FAMILIES.values():
        table.add_column(f"{f.name}\n{FAMILY_TITLES[f.name]}", justify="center")
    table.add_column("meaning")
    for r in capability_rows():
        table.add_row(*r.values())
    console.print(table)
    console.print("families: " + "; ".join(f"{f.name}: {f.examples}" for f in FAMILIES.values()))


@models_app.command("convert")
def models_convert(
    alias: str = typer.Argument("smollm2-135m"),
    force: bool = typer.Option(False, help="Convert again even if cached."),
):
    """Convert an embedded GGUF once into the safetensors cache (SOFTPROMPT_CACHE)."""
    from ..families.loading import ModelNotAvailableError, convert_embedded

    try:
        path = convert_embedded(alias, force=force)
    except ModelNotAvailableError as e:
        _fail(str(e))
    console.print(f"{alias}: {path}")


@app.command()
def tasks():
    """List the built-in tasks."""
    from ..data import BUILTIN_TASKS

    console.print("\n".join(sorted(BUILTIN_TASKS)))

