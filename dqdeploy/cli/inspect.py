"""``dqdeploy inspect``: describe a quantized artifact or an export folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw metadata.")
def inspect(path, as_json) -> None:
    """Describe a quantized artifact or an export folder."""
    from ..verify.inspect import describe

    click.echo(describe(path, as_json=as_json))
