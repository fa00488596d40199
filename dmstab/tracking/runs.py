"""Finding runs: the resumable or finished run of a recipe, the latest run of a kind, the
latest runs of the store (`dmstab runs`), a run's record, metric history and run directory."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dmstab.config import Recipe, fingerprint
from dmstab.errors import DmstabError
from dmstab.tracking.client import (
    ServerUnreachable,
    open_client,
    resolve_uri,
)
from dmstab.tracking.tags import (
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_OUTPUT,
    TAG_RUN_DIR,
)

UNFINISHED = ("RUNNING", "FAILED", "KILLED")


def _existing_store(uri: str | None) -> Any | None:
    """A client of the store at `uri`, or None when it is a SQLite file that does not exist:
    looking a run up must not create an empty store (MLflow creates the file on opening it)."""
    resolved = resolve_uri(uri)
    prefix = "sqlite:///"
    if resolved.startswith(prefix) and not Path(resolved[len(prefix) :]).is_file():
        return None
    return open_client(resolved)


def _experiment_ids(client: Any, experiment: str | None) -> list[str]:
    """The id of experiment `experiment` ([] when absent), or of every experiment when None."""
    if experiment is None:
        return [str(e.experiment_id) for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    return [str(found.experiment_id)] if found is not None else []


def _runs_of_recipe(recipe: Recipe) -> list[Any]:
    """This recipe's training runs (by fingerprint), newest first."""
    client = _existing_store(recipe.tracking.uri)
    if client is None:
        return []
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    if experiment is None:
        return []
    return list(
        client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_FINGERPRINT}` = '{fingerprint(recipe)}' "
            f"and tags.`{TAG_KIND}` = 'train'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
    )


def find_resumable_run(recipe: Recipe) -> str | None:
    """Latest unfinished run (RUNNING after kill -9, FAILED, KILLED) of this exact recipe."""
    unfinished = [run for run in _runs_of_recipe(recipe) if run.info.status in UNFINISHED]
    return str(unfinished[0].info.run_id) if unfinished else None


def find_finished_run(recipe: Recipe) -> str | None:
    """Latest FINISHED training run of this exact recipe, for analyses that reuse it."""
    finished = [run for run in _runs_of_recipe(recipe) if run.info.status == "FINISHED"]
    return str(finished[0].info.run_id) if finished else None


@dataclass(frozen=True)
class RunRecord:
    """What a report reads of a run: its params, tags and the latest value of each metric."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=str(run.info.run_id),
        name=str(run.info.run_name or run.info.run_id),
        status=str(run.info.status),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
    )


def run_record(run_id: str, uri: str | None = None) -> RunRecord:
    """One run of the store; a one-line error if the id is unknown."""
    client = _existing_store(uri)
    if client is None:
        raise DmstabError(f"no MLflow run '{run_id}': there is no store at {resolve_uri(uri)}")
    try:
        run = client.get_run(run_id)
    except ServerUnreachable:
        raise
    except Exception:
        raise DmstabError(f"no MLflow run '{run_id}' in {resolve_uri(uri)}") from None
    return _record(run)


def run_info(run_id: str, uri: str | None = None) -> tuple[dict[str, str], str]:
    """Tags and status of a run; a one-line error if the id is unknown."""
    record = run_record(run_id, uri)
    return record.tags, record.status


def find_runs(
    tags: Mapping[str, str], experiment: str | None = None, uri: str | None = None
) -> list[RunRecord]:
    """Runs carrying all `tags`, newest first, in one experiment or in all when None."""
    client = _existing_store(uri)
    if client is None:
        return []
    ids = _experiment_ids(client, experiment)
    if not ids:
        return []
    condition = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs(ids, filter_string=condition, order_by=["attributes.start_time DESC"])
    return [_record(run) for run in runs]


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of one metric, by step; a step logged twice keeps its latest value."""
    client = _existing_store(uri)
    if client is None:
        return []
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, by_step[step][1]) for step in sorted(by_step)]


def run_directory(run_id: str, uri: str | None = None) -> Path:
    """The local directory (checkpoint, snapshots, samples) of a dmstab training run."""
    tags, _ = run_info(run_id, uri)
    if TAG_RUN_DIR not in tags:
        raise DmstabError(f"run {run_id} is not a dmstab training run (no {TAG_RUN_DIR} tag)")
    return Path(tags[TAG_RUN_DIR])


def _store_and_experiments(experiment: str | None, uri: str | None) -> tuple[Any, list[str]] | None:
    """The store's client and the ids of `experiment` (all when None); None when either is
    not there."""
    client = _existing_store(uri)
    if client is None:
        return None
    ids = _experiment_ids(client, experiment)
    return (client, ids) if ids else None


def _newest(client: Any, ids: list[str], condition: str) -> Any | None:
    runs = client.search_runs(
        ids, filter_string=condition, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def latest_run(experiment: str | None, kind: str, uri: str | None = None) -> str | None:
    """Most recent run of `kind` (e.g. 'train') in one experiment, or in all when None."""
    found = _store_and_experiments(experiment, uri)
    if found is None:
        return None
    run = _newest(*found, f"tags.`{TAG_KIND}` = '{kind}'")
    return str(run.info.run_id) if run else None


def latest_checkpoint_run(experiment: str | None, uri: str | None = None) -> RunRecord | None:
    """The run that wrote a checkpoint last: the latest training run, or a later finished
    `ema-reconstruct` run (one experiment, or all when None).

    A training run counts from when it ended (a resumed run writes after a reconstruction
    of its earlier weights), or from its start while it has not ended (killed or running);
    a reconstruction from when it ended.
    """
    found = _store_and_experiments(experiment, uri)
    if found is None:
        return None
    client, ids = found
    trained = _newest(client, ids, f"tags.`{TAG_KIND}` = 'train'")
    rebuilt = _newest(
        client,
        ids,
        f"tags.`{TAG_KIND}` = 'ema-reconstruct' and attributes.status = 'FINISHED' "
        f"and tags.`{TAG_OUTPUT}` != ''",
    )
    if trained is None or (
        rebuilt is not None
        and rebuilt.info.end_time > (trained.info.end_time or trained.info.start_time)
    ):
        trained = rebuilt
    return _record(trained) if trained is not None else None


@dataclass(frozen=True)
class ListedRun:
    """A run as `dmstab runs` lists it: its record, experiment, start and last training step."""

    record: RunRecord
    experiment: str
    started: datetime | None  # UTC
    last_step: int | None  # the highest step of its `step_metric`; None when it logged none


_KIND = re.compile(r"[\w.-]+")


def recent_runs(
    experiment: str | None = None,
    kind: str | None = None,
    limit: int = 20,
    uri: str | None = None,
    step_metric: str = "train/loss",
) -> list[ListedRun]:
    """The `limit` latest runs of the store (of `kind` and in `experiment` when given), newest
    first. A store, an experiment or a kind that is not there is a one-line error."""
    resolved = resolve_uri(uri)
    client = _existing_store(uri)
    if client is None:
        raise DmstabError(f"no MLflow store at {resolved}")
    names = {str(e.experiment_id): str(e.name) for e in client.search_experiments()}
    ids = _experiment_ids(client, experiment)
    if experiment is not None and not ids:
        raise DmstabError(
            f"no MLflow experiment '{experiment}' in {resolved}; its experiments: "
            + (", ".join(sorted(names.values())) or "none")
        )
    if kind is not None and not _KIND.fullmatch(kind):
        raise DmstabError(f"run kind '{kind}' is not a word like train, sample or fid")
    condition = f"tags.`{TAG_KIND}` = '{kind}'" if kind else ""
    order = ["attributes.start_time DESC"]
    runs = client.search_runs(ids, filter_string=condition, order_by=order, max_results=limit)
    if kind is not None and not runs:
        every = client.search_runs(ids, max_results=1000)
        kinds = {r.data.tags[TAG_KIND] for r in every if TAG_KIND in r.data.tags}
        raise DmstabError(
            f"no run of kind '{kind}' in {resolved}"
            + (f" ({experiment})" if experiment else "")
            + f"; the kinds there: {', '.join(sorted(kinds)) or 'none'}"
        )
    listed = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, step_metric)
        started = run.info.start_time
        listed.append(
            ListedRun(
                record=_record(run),
                experiment=names.get(str(run.info.experiment_id), str(run.info.experiment_id)),
                started=datetime.fromtimestamp(started / 1000, UTC) if started else None,
                last_step=max((m.step for m in history), default=None),
            )
        )
    return listed
