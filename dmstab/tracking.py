"""The one module that talks to MLflow.

Everything a command records goes through a `Tracker`: `MlflowTracker` on rank 0,
`NullTracker` elsewhere (fluent MLflow calls from other ranks start stray runs).
Metrics are buffered and sent with `log_batch` every `flush_every` steps and at
exit, never one call per step. A resumed run skips metric steps it already holds,
so a run killed between a flush and a checkpoint has no duplicated steps.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from dmstab import __version__
from dmstab.errors import DmstabError
from dmstab.recipe import Recipe, fingerprint, flatten, to_yaml

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
UNFINISHED = ("RUNNING", "FAILED", "KILLED")
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_LIMIT = 6000

TAG_FINGERPRINT = "dmstab.recipe_fingerprint"
TAG_RECIPE_NAME = "dmstab.recipe_name"
TAG_COMMAND = "dmstab.command"
TAG_KIND = "dmstab.kind"
TAG_RUN_DIR = "dmstab.run_dir"
TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP_FINGERPRINT = "dmstab.sweep_fingerprint"


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: RunStatus) -> None: ...


class NullTracker:
    """What non-zero ranks (and dry runs) get: accepts everything, records nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: RunStatus) -> None:
        pass


def resolve_uri(recipe_uri: str | None) -> str:
    """`tracking.uri` from the recipe, else MLFLOW_TRACKING_URI, else ./mlflow.db.

    A relative SQLite path is made absolute: MLflow caches one store per URI string, so a
    relative one would keep pointing at the first working directory it was opened in.
    """
    uri = recipe_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _quiet_mlflow_logs() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    _quiet_mlflow_logs()  # after the import: mlflow sets its own logger level when imported
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:  # a bad URI or an unwritable path: the user's setup, not a bug
        raise DmstabError(f"cannot open MLflow store {uri}: {_first_line(exc)}") from None


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _standard_tags(kind: str) -> dict[str, str]:
    tags = {
        "dmstab.version": __version__,
        TAG_COMMAND: " ".join(["dmstab", *sys.argv[1:]]),
        "dmstab.hostname": socket.gethostname(),
        "dmstab.python": platform.python_version(),
        TAG_KIND: kind,
        "mlflow.source.name": "dmstab",
    }
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class MlflowTracker:
    """A run in an MLflow store, written through `MlflowClient.log_batch`."""

    def __init__(self, client: Any, run_id: str, flush_every: int) -> None:
        self._client = client
        self.run_id: str | None = run_id
        self._flush_every = flush_every
        self._buffer: list[Any] = []
        self._last_flushed_step = 0
        self._already_logged = self._last_logged_steps()

    @classmethod
    def start(
        cls,
        recipe: Recipe,
        *,
        kind: str,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        extra_tags: Mapping[str, str] | None = None,
    ) -> MlflowTracker:
        """Create a run (params = the flattened recipe) or reopen `resume_run_id`."""
        if resume_run_id is not None:
            uri = resolve_uri(recipe.tracking.uri)
            client = _client(uri)
            try:
                client.update_run(resume_run_id, status="RUNNING")
            except Exception as exc:  # the store is unreachable or the run is gone
                raise DmstabError(
                    f"cannot reopen run {resume_run_id} in {uri}: {_first_line(exc)}"
                ) from None
            tracker = cls(client, resume_run_id, recipe.tracking.flush_every)
            tracker.set_tags({TAG_COMMAND + ".resume": " ".join(["dmstab", *sys.argv[1:]])})
            return tracker
        tags = {TAG_RECIPE_NAME: recipe.name, TAG_FINGERPRINT: fingerprint(recipe)}
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        tags.update(extra_tags or {})
        tracker = cls.create(
            experiment=recipe.tracking.experiment,
            kind=kind,
            params=flatten(recipe),
            tags=tags,
            uri=recipe.tracking.uri,
            run_name=recipe.tracking.run_name,
            flush_every=recipe.tracking.flush_every,
        )
        tracker.log_text(to_yaml(recipe), "recipe.yaml")
        return tracker

    @classmethod
    def create(
        cls,
        *,
        experiment: str,
        kind: str,
        params: Mapping[str, str],
        tags: Mapping[str, str],
        uri: str | None = None,
        run_name: str | None = None,
        flush_every: int = 50,
    ) -> MlflowTracker:
        """A new run of `kind` with the standard tags plus `tags`, and `params` logged."""
        resolved = resolve_uri(uri)
        client = _client(resolved)
        try:
            experiment_id = _experiment_id(client, experiment)
            all_tags = {**_standard_tags(kind), **tags}
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        except DmstabError:
            raise
        except Exception as exc:  # any backend failure at start is a user-facing setup problem
            raise DmstabError(f"cannot open MLflow store {resolved}: {_first_line(exc)}") from None
        tracker = cls(client, run.info.run_id, flush_every)
        tracker._log_params(params)
        return tracker

    def _last_logged_steps(self) -> dict[str, int]:
        run = self._client.get_run(self.run_id)
        last: dict[str, int] = {}
        for key in run.data.metrics:
            history = self._client.get_metric_history(self.run_id, key)
            last[key] = max((m.step for m in history), default=-1)
        return last

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._already_logged.get(key, -1):
                continue
            self._buffer.append(Metric(key, float(value), now, step))
        if step - self._last_flushed_step >= self._flush_every:
            self.flush()
            self._last_flushed_step = step

    def flush(self) -> None:
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    def artifact_uri(self) -> str:
        """Where this run's artifacts are stored: a local path or a server URI."""
        return str(self._client.get_run(self.run_id).info.artifact_uri)

    def finish(self, status: RunStatus) -> None:
        try:
            self.flush()
        finally:
            self._client.set_terminated(self.run_id, status=status)


@contextmanager
def tracked_run(tracker: Tracker) -> Iterator[Tracker]:
    """Close the run FINISHED, KILLED on Ctrl-C, FAILED on any error, keeping what was logged."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise DmstabError(f"MLflow experiment '{name}' is deleted; restore it or rename it")
        return str(experiment.experiment_id)
    return str(client.create_experiment(name))


# ---------------------------------------------------------------- finding earlier runs


def _experiment_ids(client: Any, experiment: str | None) -> list[str]:
    """The id of experiment `experiment` ([] when absent), or of every experiment when None."""
    if experiment is None:
        return [str(e.experiment_id) for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    return [str(found.experiment_id)] if found is not None else []


def find_resumable_run(recipe: Recipe) -> str | None:
    """Latest unfinished run (RUNNING after kill -9, FAILED, KILLED) of this exact recipe."""
    client = _client(resolve_uri(recipe.tracking.uri))
    experiment = client.get_experiment_by_name(recipe.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_FINGERPRINT}` = '{fingerprint(recipe)}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    unfinished = [run for run in runs if run.info.status in UNFINISHED]
    return str(unfinished[0].info.run_id) if unfinished else None


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
    client = _client(resolve_uri(uri))
    try:
        run = client.get_run(run_id)
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
    client = _client(resolve_uri(uri))
    ids = _experiment_ids(client, experiment)
    if not ids:
        return []
    condition = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs(ids, filter_string=condition, order_by=["attributes.start_time DESC"])
    return [_record(run) for run in runs]


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """(step, value) of one metric, by step; a step logged twice keeps its latest value."""
    client = _client(resolve_uri(uri))
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


def latest_run(experiment: str | None, kind: str, uri: str | None = None) -> str | None:
    """Most recent run of `kind` (e.g. 'train') in one experiment, or in all when None."""
    client = _client(resolve_uri(uri))
    ids = _experiment_ids(client, experiment)
    if not ids:
        return None
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{TAG_KIND}` = '{kind}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


def save_figure(tracker: Tracker, figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact (kept under its directory), then close it."""
    from matplotlib import pyplot as plt

    directory, _, filename = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        figure.savefig(path, dpi=110, bbox_inches="tight")
        tracker.log_artifact(path, directory or None)
    plt.close(figure)
