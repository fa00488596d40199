"""The one module that talks to MLflow.

Everything a command records goes through a `Tracker`: `MlflowTracker` on rank 0,
`NullTracker` elsewhere (fluent MLflow calls from other ranks start stray runs).
Metrics are buffered and sent with `log_batch` every `flush_every` steps and at
exit, never one call per step. A resumed run skips metric steps it already holds,
so a run killed between a flush and a checkpoint has no duplicated steps. Calls to a
tracking server fail fast, and while it is away the run is spooled to local disk and
replayed later (docs/tracking.md).
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
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Literal, Protocol

from dmstab import __version__
from dmstab.errors import DmstabError
from dmstab.recipe import Recipe, TrainConfig, fingerprint, flatten, to_yaml
from dmstab.spool import SPOOL_DIRNAME, Spool, find_spools

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
UNFINISHED = ("RUNNING", "FAILED", "KILLED")
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_LIMIT = 6000
_METRICS_PER_BATCH = 1000
DEFAULT_SPOOL_ROOT = Path(TrainConfig().out_dir) / SPOOL_DIRNAME
RETRY_INTERVAL_S = 15.0  # while spooling, the server is tried again at most this often
_REQUEST_TIMEOUT_S = 10  # per request to a server: a dead one costs this, not minutes
_UPLOAD_TIMEOUT_S = 120  # an artifact upload, once the server has answered a probe
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
_log = logging.getLogger("dmstab.tracking")

TAG_FINGERPRINT = "dmstab.recipe_fingerprint"
TAG_RECIPE_NAME = "dmstab.recipe_name"
TAG_COMMAND = "dmstab.command"
TAG_KIND = "dmstab.kind"
TAG_RUN_DIR = "dmstab.run_dir"
TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP_FINGERPRINT = "dmstab.sweep_fingerprint"
TAG_LOCAL_RUN_ID = "dmstab.local_run_id"  # an offline run's id before the server had it


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
        return _Client(MlflowClient(tracking_uri=uri), uri)
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


class ServerUnreachable(DmstabError):
    """The MLflow tracking server did not answer: refused, timed out, or a 5xx error."""


def is_remote(uri: str) -> bool:
    """A tracking server (http/https), as opposed to a local store such as SQLite."""
    return uri.startswith(("http://", "https://"))


@contextmanager
def _http_limits(timeout_s: int) -> Iterator[None]:
    """MLflow's HTTP client retries 7 times with exponential backoff and waits up to 120 s per
    request (mlflow.environment_variables), reading these settings from the environment at every
    request. dmstab's own calls run with no retries and `timeout_s` instead, unless the user set
    the variables, and the environment is restored afterwards."""
    wanted = {**_FAIL_FAST, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    added = [key for key in wanted if key not in os.environ]
    os.environ.update({key: wanted[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _is_unreachable(exc: BaseException) -> bool:
    """A connection failure, a timeout or a server error; not a refused request (4xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return int(exc.get_http_status_code()) >= 500  # type: ignore[no-untyped-call]
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "status_code"):
        return int(response.status_code) >= 500
    return isinstance(exc, OSError)  # requests' ConnectionError and Timeout are OSErrors


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "timed out" in text or "Timeout" in text:
        return "timed out"
    return _first_line(exc)[:160]


class _Client:
    """An MlflowClient whose calls to a server fail fast (`_http_limits`) and report a dead
    server as one `ServerUnreachable` line."""

    def __init__(self, client: Any, uri: str, timeout_s: int = _REQUEST_TIMEOUT_S) -> None:
        self._client = client
        self._uri = uri
        self._timeout_s = timeout_s

    def uploads(self) -> _Client:
        """The same client with time for a large artifact to reach the server."""
        return _Client(self._client, self._uri, _UPLOAD_TIMEOUT_S)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute) or not is_remote(self._uri):
            return attribute

        @wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            with _http_limits(self._timeout_s):
                try:
                    return attribute(*args, **kwargs)
                except Exception as exc:
                    if not _is_unreachable(exc):
                        raise
                    raise ServerUnreachable(
                        f"MLflow server {self._uri} is unreachable ({_reason(exc)}); start it "
                        "(nox -s tracking-server), point tracking.uri / MLFLOW_TRACKING_URI at "
                        "a running one, or set tracking.offline=true to train and sync later"
                    ) from None

        return call


def _last_logged_steps(client: Any, run_id: str) -> dict[str, int]:
    """The highest step of each metric the store holds for `run_id`."""
    run = client.get_run(run_id)
    last: dict[str, int] = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        last[key] = max((m.step for m in history), default=-1)
    return last


def _log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + _PARAMS_PER_BATCH])


def _log_metric_rows(
    client: Any, run_id: str, rows: list[list[Any]], server_steps: dict[str, int]
) -> None:
    """Send (key, value, timestamp, step) rows the server lacks, by step per key; a row sent
    twice after a lost reply is harmless: the SQL store keeps one (key, timestamp, step, value).
    """
    from mlflow.entities import Metric

    fresh = [row for row in rows if int(row[3]) > server_steps.get(str(row[0]), -1)]
    metrics = [Metric(str(k), float(v), int(ts), int(step)) for k, v, ts, step in fresh]
    for i in range(0, len(metrics), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + _METRICS_PER_BATCH])
    for key, _, _, step in fresh:
        server_steps[str(key)] = max(server_steps.get(str(key), -1), int(step))


def _create_spooled_run(client: Any, spool: Spool, record: Mapping[str, Any]) -> str:
    """The server's run for an offline run, created once (its id kept in the spool's meta).

    The run directory keeps its local name; `OUT_DIR/SERVER_ID` is linked to it, so paths made
    from the server's run id (`--resume`, `dmstab sample`) find the checkpoint.
    """
    experiment_id = _experiment_id(client, str(record["experiment"]))
    run = client.create_run(
        experiment_id,
        start_time=int(record["start_time"]),
        run_name=record["run_name"],
        tags=dict(record["tags"]),
    )
    server_id = str(run.info.run_id)
    spool.update_meta(server_run_id=server_id)
    _log_params(client, server_id, dict(record["params"]))
    out_dir = spool.directory.parent.parent
    local = spool.meta()["run_id"]
    link = out_dir / server_id
    if (out_dir / local).is_dir() and not link.exists():
        link.symlink_to(local, target_is_directory=True)
    return server_id


def _replay(client: Any, spool: Spool, server_steps: dict[str, int]) -> str:
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
            _log_metric_rows(client, server_id, record["metrics"], server_steps)
        elif kind == "tags":
            _log_tags(client, server_id, record["tags"])
        elif kind == "artifact":
            uploads = client.uploads() if isinstance(client, _Client) else client
            uploads.log_artifact(server_id, str(spool.file(record)), record["artifact_path"])
        elif kind == "terminate":
            client.set_terminated(server_id, status=record["status"], end_time=record["end_time"])
        else:
            raise DmstabError(f"spool {spool.directory}: unknown record type {kind!r}")
        spool.mark_sent(index + 1)
    return spool.meta()["server_run_id"]


def _log_tags(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


class MlflowTracker:
    """A run in an MLflow store, written through `MlflowClient.log_batch`.

    With a tracking server, a request the server does not answer switches the tracker to
    spooling: metrics, tags and artifacts go, in order, to a durable spool (`dmstab.spool`) in
    `spool_root/RUN_ID` and training goes on. At a later flush (at most every
    `RETRY_INTERVAL_S`) and at the end the spool is replayed and deleted; left over, it waits
    for `dmstab sync`. Local stores (SQLite) are written directly.
    """

    def __init__(
        self,
        client: Any,
        run_id: str,
        flush_every: int,
        *,
        uri: str,
        spool_root: Path,
        online: bool = True,
    ) -> None:
        self._client = client
        self.run_id: str | None = run_id
        self._uri = uri
        self._flush_every = flush_every
        self._buffer: list[list[Any]] = []
        self._last_flushed_step = 0
        self._spool_root = spool_root.resolve()
        self._spool = Spool(self._spool_root / run_id)
        self._next_retry = 0.0
        self._server_steps: dict[str, int] = {}
        if online:
            self._retry(force=True)  # a spool left by an earlier process of this run goes first
            self._server_steps = _last_logged_steps(client, run_id)
        self._already_logged = dict(self._server_steps)

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
        """Create a run (params = the flattened recipe) or reopen `resume_run_id`.

        With `tracking.offline` and a server that does not answer, a new run starts spooled.
        """
        spool_root = Path(recipe.train.out_dir) / SPOOL_DIRNAME
        if resume_run_id is not None:
            uri = resolve_uri(recipe.tracking.uri)
            client = _client(uri)
            try:
                client.update_run(resume_run_id, status="RUNNING")
            except ServerUnreachable:
                raise
            except Exception as exc:  # the run is gone or the store cannot be written
                raise DmstabError(
                    f"cannot reopen run {resume_run_id} in {uri}: {_first_line(exc)}"
                ) from None
            tracker = cls(
                client, resume_run_id, recipe.tracking.flush_every, uri=uri, spool_root=spool_root
            )
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
            spool_root=spool_root,
            offline=recipe.tracking.offline,
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
        spool_root: Path = DEFAULT_SPOOL_ROOT,
        offline: bool = False,
    ) -> MlflowTracker:
        """A new run of `kind` with the standard tags plus `tags`, and `params` logged.

        `offline`: when the server does not answer, a run with a local id, spooled.
        """
        resolved = resolve_uri(uri)
        client = _client(resolved)
        all_tags = {**_standard_tags(kind), **tags}
        try:
            experiment_id = _experiment_id(client, experiment)
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        except ServerUnreachable:
            if not offline:
                raise
            record = {"experiment": experiment, "run_name": run_name, "params": dict(params)}
            return cls._offline(client, resolved, record, all_tags, flush_every, spool_root)
        except DmstabError:
            raise
        except Exception as exc:  # any backend failure at start is a user-facing setup problem
            raise DmstabError(f"cannot open MLflow store {resolved}: {_first_line(exc)}") from None
        tracker = cls(client, run.info.run_id, flush_every, uri=resolved, spool_root=spool_root)
        _log_params(client, run.info.run_id, params)
        return tracker

    @classmethod
    def _offline(
        cls,
        client: Any,
        uri: str,
        record: Mapping[str, Any],
        tags: Mapping[str, str],
        flush_every: int,
        spool_root: Path,
    ) -> MlflowTracker:
        """A run the server does not know yet: a local id, and its creation as the first record."""
        run_id = uuid.uuid4().hex
        tracker = cls(client, run_id, flush_every, uri=uri, spool_root=spool_root, online=False)
        tracker._spool.create({"uri": uri, "run_id": run_id})
        start_time = int(time.time() * 1000)
        tags = {**tags, TAG_LOCAL_RUN_ID: run_id}
        tracker._spool.append({"type": "create", "start_time": start_time, "tags": tags, **record})
        tracker._next_retry = time.monotonic() + RETRY_INTERVAL_S
        _log.warning(
            f"warning: MLflow server {uri} is unreachable; tracking.offline: run {run_id} is "
            f"spooled to {tracker._spool.directory} until the server answers"
        )
        return tracker

    @property
    def spooling(self) -> bool:
        """Whether records wait in the local spool for the server."""
        return self._spool.exists

    def _server(self, send: Callable[[], object]) -> bool:
        """Run `send` unless spooling; False (and spooling from now on) if the server is away."""
        if self.spooling:
            return False
        try:
            send()
        except ServerUnreachable as exc:
            self._start_spooling(exc)
            return False
        return True

    def _start_spooling(self, exc: ServerUnreachable) -> None:
        assert self.run_id is not None
        self._spool.create({"uri": self._uri, "run_id": self.run_id, "server_run_id": self.run_id})
        self._next_retry = time.monotonic() + RETRY_INTERVAL_S
        reason = str(exc).partition(";")[0]
        _log.warning(
            f"warning: {reason}; training goes on, run {self.run_id} is spooled to "
            f"{self._spool.directory}"
        )

    def _retry(self, *, force: bool = False) -> None:
        """Replay the spool when due (or `force`), and delete it once the server has it all."""
        if not self.spooling or not (force or time.monotonic() >= self._next_retry):
            return
        offline = self._spool.meta().get("server_run_id") is None
        try:
            server_id = _replay(self._client, self._spool, self._server_steps)
        except ServerUnreachable:
            self._next_retry = time.monotonic() + RETRY_INTERVAL_S
            return
        sent = self._spool.sent()
        self._spool.remove()
        created = f", created as run {server_id}" if offline else ""
        _log.warning(
            f"MLflow server {self._uri} answers again: {sent} spooled records of run "
            f"{self.run_id} uploaded{created}"
        )
        self.run_id = server_id
        self._spool = Spool(self._spool_root / server_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._already_logged.get(key, -1):
                continue
            self._buffer.append([key, float(value), now, step])
        if step - self._last_flushed_step >= self._flush_every:
            self.flush()
            self._last_flushed_step = step

    def flush(self) -> None:
        rows, self._buffer = self._buffer, []
        if rows and not self._server(lambda: self._send_rows(rows)):
            self._spool.append({"type": "metrics", "metrics": rows})
        self._retry()

    def _send_rows(self, rows: list[list[Any]]) -> None:
        _log_metric_rows(self._client, str(self.run_id), rows, self._server_steps)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        uploads = self._client.uploads() if isinstance(self._client, _Client) else self._client
        if not self._server(lambda: uploads.log_artifact(self.run_id, str(path), artifact_path)):
            self._spool.add_file(path, artifact_path)
            self._retry()

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._server(lambda: self._client.log_text(self.run_id, text, artifact_file)):
            self._spool.add_text(text, artifact_file)
            self._retry()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self._server(lambda: _log_tags(self._client, str(self.run_id), tags)):
            self._spool.append({"type": "tags", "tags": dict(tags)})
            self._retry()

    def artifact_uri(self) -> str:
        """Where this run's artifacts are stored: a local path or a server URI."""
        return str(self._client.get_run(self.run_id).info.artifact_uri)

    def finish(self, status: RunStatus) -> None:
        """Flush and close the run; if the server is away, the spool keeps both for `sync`."""
        try:
            self.flush()
        finally:
            end_time = int(time.time() * 1000)
            closed = self._server(
                lambda: self._client.set_terminated(self.run_id, status=status, end_time=end_time)
            )
            if not closed:
                self._spool.append({"type": "terminate", "status": status, "end_time": end_time})
                self._retry(force=True)
            if self.spooling:
                where = self._spool.directory
                _log.warning(
                    f"warning: MLflow server {self._uri} is unreachable: run {self.run_id} is kept "
                    f"in {where}; upload it with: dmstab sync {where}"
                )


@dataclass(frozen=True)
class SyncResult:
    """One spool uploaded by `sync`: where it was, the server's run id, records sent."""

    directory: Path
    run_id: str
    records: int


def sync(path: Path, uri: str | None = None) -> list[SyncResult]:
    """Upload the spool at `path`, or every spool in a `.mlflow-spool` folder, and delete it.

    `uri` replaces the tracking URI a spool was written for (a server that moved).
    """
    spools = find_spools(path)
    if not spools:
        raise DmstabError(
            f"no dmstab spool at {path}; spools are in TRAIN_OUT_DIR/{SPOOL_DIRNAME}/RUN_ID"
        )
    results = []
    for spool in spools:
        meta = spool.meta()
        client = _client(resolve_uri(uri or meta["uri"]))
        server_id = meta.get("server_run_id")
        records = len(spool.pending())
        steps = _last_logged_steps(client, server_id) if server_id else {}
        run_id = _replay(client, spool, steps)
        spool.remove()
        results.append(SyncResult(spool.directory, run_id, records))
    return results


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


def _runs_of_recipe(recipe: Recipe) -> list[Any]:
    """This recipe's training runs (by fingerprint), newest first."""
    client = _client(resolve_uri(recipe.tracking.uri))
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
    client = _client(resolve_uri(uri))
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
