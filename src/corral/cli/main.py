"""The ``corral`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from corral import __version__
from corral.errors import CorralError
from corral.settings import load_settings

app = typer.Typer(help="Corral: host many LLM agents and conversations at once.", no_args_is_help=True)
err = Console(stderr=True)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to bind [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind [default: 8787]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where the SQLite file lives [default: .corral]")] = None,
    config: Annotated[Path | None, typer.Option(help="a corral.toml file")] = None,
    database_url: Annotated[str | None, typer.Option(help="e.g. postgresql+asyncpg://host/db")] = None,
) -> None:
    """Start the service (SQLite and the demo model unless configured otherwise)."""
    from corral.cli.serve import serve as run_server

    try:
        settings = load_settings(config, host=host, port=port, data_dir=data_dir, database_url=database_url)
        run_server(settings)
    except (CorralError, ValidationError, FileNotFoundError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
