"""Runs spooled to disk while a tracking server was away, replayed onto the server
(`dmstab sync`, and a live run once its server answers again)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmstab.errors import DmstabError
from dmstab.tracking.client import (
    FailFastClient,
    ensure_experiment,
    last_logged_steps,
    log_metric_rows,
    log_params,
    log_stepped_image,
    log_tags,
    open_client,
    resolve_uri,
)
from dmstab.tracking.spool import (
    SPOOL_DIRNAME,
    Spool,
    find_spools,
    remove_leftovers,
)


def _create_spooled_run(client: Any, spool: Spool, record: Mapping[str, Any]) -> str:
    """The server's run for an offline run, created once (its id kept in the spool's meta).

    The run directory keeps its local name; `OUT_DIR/SERVER_ID` is linked to it, so paths made
    from the server's run id (`--resume`, `dmstab sample`) find the checkpoint.
    """
    experiment_id = ensure_experiment(client, str(record["experiment"]))
    run = client.create_run(
        experiment_id,
        start_time=int(record["start_time"]),
        run_name=record["run_name"],
        tags=dict(record["tags"]),
    )
    server_id = str(run.info.run_id)
    spool.update_meta(server_run_id=server_id)
    log_params(client, server_id, dict(record["params"]))
    out_dir = spool.directory.parent.parent
    local = spool.meta()["run_id"]
    link = out_dir / server_id
    if (out_dir / local).is_dir() and not link.exists():
        link.symlink_to(local, target_is_directory=True)
    return server_id


def replay(client: Any, spool: Spool, server_steps: dict[str, int]) -> str:
    """Send the spool's pending records in order, marking each one sent; the server's run id.

    Raises ServerUnreachable when the server goes away again: the rest stays pending.
    """
    client.search_experiments(max_results=1)  # a cheap probe before any large upload
    for index, record in spool.pending():
        server_id = spool.meta().get("server_run_id")
        kind = record["type"]
        if kind == "create":
            server_id = server_id or _create_spooled_run(client, spool, record)
        elif server_id is None:
            raise DmstabError(f"spool {spool.directory} has records before its run was created")
        elif kind == "metrics":
            log_metric_rows(client, server_id, record["metrics"], server_steps)
        elif kind == "tags":
            log_tags(client, server_id, record["tags"])
        elif kind == "artifact":
            uploads = client.uploads() if isinstance(client, FailFastClient) else client
            uploads.log_artifact(server_id, str(spool.file(record)), record["artifact_path"])
        elif kind == "image":
            log_stepped_image(
                client,
                server_id,
                spool.file(record),
                str(record["key"]),
                int(record["step"]),
                int(record["timestamp"]),
            )
        elif kind == "terminate":
            client.set_terminated(server_id, status=record["status"], end_time=record["end_time"])
        else:
            raise DmstabError(f"spool {spool.directory}: unknown record type {kind!r}")
        spool.mark_sent(index + 1)
    return spool.meta()["server_run_id"]


@dataclass(frozen=True)
class SyncResult:
    """One spool uploaded by `sync`: where it was, the server's run id, records sent."""

    directory: Path
    run_id: str
    records: int


def _never_created(spool: Spool) -> bool:
    """An offline run's spool killed between its `meta.json` and its first (`create`) record:
    the run never logged anything and its training never began, so there is nothing to upload."""
    return "server_run_id" not in spool.meta() and not spool.records()


def sync(path: Path, uri: str | None = None) -> list[SyncResult]:
    """Upload the spool at `path`, or every spool in a `.mlflow-spool` folder, and delete it
    (one that holds no run yet is deleted, not uploaded).

    `uri` replaces the tracking URI a spool was written for (a server that moved).
    """
    remove_leftovers(path)
    spools = find_spools(path)
    if not spools:
        raise DmstabError(
            f"no dmstab spool at {path}; spools are in TRAIN_OUT_DIR/{SPOOL_DIRNAME}/RUN_ID"
        )
    results = []
    for spool in spools:
        if _never_created(spool):
            spool.remove()
            continue
        meta = spool.meta()
        client = open_client(resolve_uri(uri or meta["uri"]))
        server_id = meta.get("server_run_id")
        records = len(spool.pending())
        steps = last_logged_steps(client, server_id) if server_id else {}
        run_id = replay(client, spool, steps)
        spool.remove()
        results.append(SyncResult(spool.directory, run_id, records))
    return results
