"""`dmstab sync`: upload runs spooled while the MLflow server was unreachable."""

from __future__ import annotations

from pathlib import Path

from dmstab.console import console
from dmstab.tracking import sync


def main(spool: Path, uri: str | None) -> None:
    for synced in sync(spool, uri):
        console.print(f"[green]synced[/] {synced.records} records -> run {synced.run_id}")
