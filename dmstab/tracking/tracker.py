"""The run a command logs to: `MlflowTracker` on rank 0, `NullTracker` elsewhere.

Everything a command records goes through a `Tracker`: `MlflowTracker` on rank 0,
`NullTracker` elsewhere (fluent MLflow calls from other ranks start stray runs).
Metrics are buffered and sent with `log_batch` every `flush_every` steps and at
exit, never one call per step. A resumed run skips metric steps and stepped images it
already holds, so a run killed between a flush and a checkpoint has no duplicated steps. Calls to a
tracking server fail fast, and while it is away the run is spooled to local disk and
replayed later (docs/tracking.md).
"""

from __future__ import annotations

import logging
import platform
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from dmstab import __version__
from dmstab.config import Recipe, TrainConfig, fingerprint, run_params, to_yaml
from dmstab.config.describe import experiment_description, run_description, run_name
from dmstab.errors import DmstabError
from dmstab.tracking.client import (
    FailFastClient,
    ServerUnreachable,
    check_store_writable,
    ensure_experiment,
    first_line,
    last_logged_steps,
    log_metric_rows,
    log_params,
    log_stepped_image,
    log_tags,
    logged_image_steps,
    open_client,
    resolve_uri,
)
from dmstab.tracking.spool import (
    SPOOL_DIRNAME,
    Spool,
)
from dmstab.tracking.sync import replay
from dmstab.tracking.tags import (
    TAG_COMMAND,
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_LOCAL_RUN_ID,
    TAG_NOTE,
    TAG_PARENT,
    TAG_RECIPE_NAME,
    RunStatus,
)

DEFAULT_SPOOL_ROOT = Path(TrainConfig().out_dir) / SPOOL_DIRNAME


RETRY_INTERVAL_S = 15.0  # while spooling, the server is tried again at most this often


_log = logging.getLogger("dmstab.tracking")


class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_image(self, path: Path, key: str, step: int) -> None: ...
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

    def log_image(self, path: Path, key: str, step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: RunStatus) -> None:
        pass


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
        self.run_name: str | None = None  # MLflow's name for the run; None while spooled
        self.experiment_id: str | None = None
        self.uri = uri
        self._flush_every = flush_every
        self._buffer: list[list[Any]] = []
        self._last_flushed_step = 0
        self._spool_root = spool_root.resolve()
        self._spool = Spool(self._spool_root / run_id)
        self._next_retry = 0.0
        self._server_steps: dict[str, int] = {}
        if online:
            self._retry(force=True)  # a spool left by an earlier process of this run goes first
            self._server_steps = last_logged_steps(client, run_id)
        self._already_logged = dict(self._server_steps)
        self._images_logged: set[tuple[str, int]] = set()  # of a reopened run, before it

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
        """Create a run (params = the keys that shaped it, `run_params`) or reopen `resume_run_id`.

        With `tracking.offline` and a server that does not answer, a new run starts spooled.
        """
        spool_root = Path(recipe.train.out_dir) / SPOOL_DIRNAME
        params = run_params(recipe, kind)
        if resume_run_id is not None:
            return cls.reopen(
                resume_run_id,
                uri=recipe.tracking.uri,
                params=params,
                texts={"recipe.yaml": to_yaml(recipe)},
                flush_every=recipe.tracking.flush_every,
                spool_root=spool_root,
            )
        tags = {
            TAG_RECIPE_NAME: recipe.name,
            TAG_FINGERPRINT: fingerprint(recipe),
            TAG_NOTE: run_description(recipe, kind),
        }
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        tags.update(extra_tags or {})
        tracker = cls.create(
            experiment=recipe.tracking.experiment,
            kind=kind,
            params=params,
            tags=tags,
            uri=recipe.tracking.uri,
            run_name=run_name(recipe, kind=kind)
            if kind != "train"
            else (recipe.tracking.run_name or run_name(recipe)),
            flush_every=recipe.tracking.flush_every,
            spool_root=spool_root,
            offline=recipe.tracking.offline,
            experiment_note=experiment_description(recipe),
        )
        tracker.log_text(to_yaml(recipe), "recipe.yaml")
        return tracker

    @classmethod
    def reopen(
        cls,
        run_id: str,
        *,
        uri: str | None,
        params: Mapping[str, str],
        texts: Mapping[str, str],
        flush_every: int = 50,
        spool_root: Path = DEFAULT_SPOOL_ROOT,
    ) -> MlflowTracker:
        """Reopen run `run_id` (RUNNING again) and complete its setup: the `params` and the text
        artifacts `texts` (file name -> text) it was created with, where it lacks them."""
        resolved = resolve_uri(uri)
        check_store_writable(resolved)
        client = open_client(resolved)
        try:
            client.update_run(run_id, status="RUNNING")
        except ServerUnreachable:
            raise
        except Exception as exc:  # the run is gone or the store cannot be written
            raise DmstabError(
                f"cannot reopen run {run_id} in {resolved}: {first_line(exc)}"
            ) from None
        tracker = cls(client, run_id, flush_every, uri=resolved, spool_root=spool_root)
        tracker._images_logged = logged_image_steps(client, run_id)
        tracker._complete_setup(params, texts)
        info = client.get_run(run_id).info
        tracker.run_name, tracker.experiment_id = info.run_name, info.experiment_id
        tracker.set_tags({TAG_COMMAND + ".resume": " ".join(["dmstab", *sys.argv[1:]])})
        return tracker

    def _complete_setup(self, params: Mapping[str, str], texts: Mapping[str, str]) -> None:
        """Log what of a new run's setup the run lacks: a kill -9 between `create_run` and the
        params or the recipe artifact leaves a run without them, which `--resume` finds by its
        tags. Idempotent: params already logged are kept (MLflow refuses to change one)."""
        assert self.run_id is not None
        logged = self._client.get_run(self.run_id).data.params
        missing = {key: value for key, value in params.items() if key not in logged}
        if missing:
            log_params(self._client, self.run_id, missing)
        present = {artifact.path for artifact in self._client.list_artifacts(self.run_id)}
        for name, text in texts.items():
            if name not in present:
                self.log_text(text, name)

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
        experiment_note: str = "",
    ) -> MlflowTracker:
        """A new run of `kind` with the standard tags plus `tags`, and `params` logged.

        `offline`: when the server does not answer, a run with a local id, spooled.
        `experiment_note`: the experiment's description, when this run creates it.
        """
        resolved = resolve_uri(uri)
        check_store_writable(resolved)  # every command's run: one line, not MLflow's retries
        client = open_client(resolved)
        all_tags = {**_standard_tags(kind), **tags}
        try:
            experiment_id = ensure_experiment(client, experiment, experiment_note)
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        except ServerUnreachable:
            if not offline:
                raise
            record = {"experiment": experiment, "run_name": run_name, "params": dict(params)}
            return cls._offline(client, resolved, record, all_tags, flush_every, spool_root)
        except DmstabError:
            raise
        except Exception as exc:  # any backend failure at start is a user-facing setup problem
            raise DmstabError(f"cannot open MLflow store {resolved}: {first_line(exc)}") from None
        tracker = cls(client, run.info.run_id, flush_every, uri=resolved, spool_root=spool_root)
        tracker.run_name, tracker.experiment_id = run.info.run_name, experiment_id
        log_params(client, run.info.run_id, params)
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
        self._spool.create({"uri": self.uri, "run_id": self.run_id, "server_run_id": self.run_id})
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
            server_id = replay(self._client, self._spool, self._server_steps)
        except ServerUnreachable:
            self._next_retry = time.monotonic() + RETRY_INTERVAL_S
            return
        sent = self._spool.sent()
        self._spool.remove()
        created = f", created as run {server_id}" if offline else ""
        _log.warning(
            f"MLflow server {self.uri} answers again: {sent} spooled records of run "
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
        log_metric_rows(self._client, str(self.run_id), rows, self._server_steps)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        uploads = (
            self._client.uploads() if isinstance(self._client, FailFastClient) else self._client
        )
        if not self._server(lambda: uploads.log_artifact(self.run_id, str(path), artifact_path)):
            self._spool.add_file(path, artifact_path)
            self._retry()

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self._server(lambda: self._client.log_text(self.run_id, text, artifact_file)):
            self._spool.add_text(text, artifact_file)
            self._retry()

    def log_image(self, path: Path, key: str, step: int) -> None:
        """The PNG at `path` as MLflow's image `key` at `step` (the UI's step slider); skipped
        when a reopened run already has it (logged before a kill, after the last checkpoint)."""
        if (key, step) in self._images_logged:
            return
        now = int(time.time() * 1000)
        send = partial(log_stepped_image, self._client, str(self.run_id), path, key, step, now)
        if not self._server(send):
            self._spool.add_image(path, key, step, now)
            self._retry()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self._server(lambda: log_tags(self._client, str(self.run_id), tags)):
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
                    f"warning: MLflow server {self.uri} is unreachable: run {self.run_id} is kept "
                    f"in {where}; upload it with: dmstab sync {where}"
                )


def caused_by_ctrl_c(error: BaseException) -> bool:
    """Whether `error` is a KeyboardInterrupt or was raised while handling one: Ctrl-C in the
    middle of a SQLite write can surface as SQLAlchemy's "database is locked" from its cleanup."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


@contextmanager
def tracked_run(tracker: Tracker) -> Iterator[Tracker]:
    """Close the run FINISHED, KILLED on Ctrl-C, FAILED on any error, keeping what was logged.

    An error raised while handling Ctrl-C counts as Ctrl-C: the run closes KILLED and
    KeyboardInterrupt propagates in place of the library's error."""
    try:
        yield tracker
    except BaseException as error:
        interrupted = caused_by_ctrl_c(error)
        tracker.finish("KILLED" if interrupted else "FAILED")
        if interrupted and not isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    tracker.finish("FINISHED")
