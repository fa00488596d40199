"""The MLflow client: the store a recipe names, calls to a server that fail fast, and the
batched writes of params, metrics and tags that the tracker and the spool replay share."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

from dmstab.atomic import require_writable_directory
from dmstab.errors import DmstabError
from dmstab.tracking.tags import TAG_NOTE

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


_PARAMS_PER_BATCH = 100


_PARAM_VALUE_LIMIT = 6000


_METRICS_PER_BATCH = 1000


_REQUEST_TIMEOUT_S = 10  # per request to a server: a dead one costs this, not minutes


_UPLOAD_TIMEOUT_S = 120  # an artifact upload, once the server has answered a probe


_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


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


def check_store_writable(recipe_uri: str | None) -> None:
    """Refuse a local SQLite store this process cannot write, before MLflow opens it: MLflow
    retries a store it cannot create for minutes, printing SQLAlchemy warnings, and its last
    error does not say why. SQLite writes its journal beside the database, so the database's
    directory must be writable, and the file itself when it exists; a new experiment's
    artifacts go to ./mlruns in the working directory. A server (http/https) is left to the
    spool, which handles it being away; other stores to MLflow."""
    uri = resolve_uri(recipe_uri)
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return
    database = Path(uri[len(prefix) :].partition("?")[0])
    require_writable_directory(database.parent, "the MLflow store's directory")
    if database.is_file() and not os.access(database, os.R_OK | os.W_OK):
        raise DmstabError(f"cannot write the MLflow store {database}: it is read-only")
    require_writable_directory(Path.cwd(), "the working directory (MLflow's ./mlruns)")


def _quiet_mlflow_logs() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    _quiet_mlflow_logs()  # after the import: mlflow sets its own logger level when imported
    try:
        return FailFastClient(MlflowClient(tracking_uri=uri), uri)
    except Exception as exc:  # a bad URI or an unwritable path: the user's setup, not a bug
        raise DmstabError(f"cannot open MLflow store {uri}: {first_line(exc)}") from None


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
    return first_line(exc)[:160]


class FailFastClient:
    """An MlflowClient whose calls to a server fail fast (`_http_limits`) and report a dead
    server as one `ServerUnreachable` line."""

    def __init__(self, client: Any, uri: str, timeout_s: int = _REQUEST_TIMEOUT_S) -> None:
        self._client = client
        self._uri = uri
        self._timeout_s = timeout_s

    def uploads(self) -> FailFastClient:
        """The same client with time for a large artifact to reach the server."""
        return FailFastClient(self._client, self._uri, _UPLOAD_TIMEOUT_S)

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


def last_logged_steps(client: Any, run_id: str) -> dict[str, int]:
    """The highest step of each metric the store holds for `run_id`."""
    run = client.get_run(run_id)
    last: dict[str, int] = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        last[key] = max((m.step for m in history), default=-1)
    return last


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + _PARAMS_PER_BATCH])


def log_metric_rows(
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


def log_stepped_image(
    client: Any, run_id: str, path: Path, key: str, step: int, timestamp: int
) -> None:
    """The PNG at `path` as MLflow's image `key` at training step `step` (its image chart and
    step slider in `mlflow ui`; stored under the run's `images/` artifacts)."""
    from PIL import Image

    uploads = client.uploads() if isinstance(client, FailFastClient) else client
    with Image.open(path) as image:
        image.load()
        uploads.log_image(run_id, image, key=key, step=step, timestamp=timestamp, synchronous=True)


def logged_image_steps(client: Any, run_id: str) -> set[tuple[str, int]]:
    """(key, step) of the stepped images the store holds for `run_id`, read from the names
    `log_image` gives their files: `images/KEY+step+STEP+timestamp+…png`, `/` in KEY as `~`."""
    found = set()
    for artifact in client.list_artifacts(run_id, "images"):
        name = artifact.path.rpartition("/")[2]
        parts = name.split("+")
        if name.endswith(".png") and len(parts) > 2 and parts[1] == "step":
            found.add((parts[0].replace("~", "/"), int(parts[2])))
    return found


def log_tags(client: Any, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# MLflow 3's UI opens an experiment in its GenAI view (traces, prompts) unless the experiment's
# kind tag says it holds model training; dmstab's experiments do. The UI of MLflow 3.17 ignores
# the tag (its GenAI / Model training toggle, GenAI unless clicked, decides), but honours the
# page's `workflowType` query: run_page adds it (tests/tracking/test_mlflow_ui.py).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def ensure_experiment(client: Any, name: str, note: str = "") -> str:
    """The id of experiment `name`, created (described by `note`) if it does not exist; either
    way tagged as a model-training experiment, so `mlflow ui` opens it on its runs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        tags = {TAG_EXPERIMENT_KIND: TRAINING_KIND}
        if note:
            tags[TAG_NOTE] = note
        return str(client.create_experiment(name, tags=tags))
    if experiment.lifecycle_stage == "deleted":
        raise DmstabError(f"MLflow experiment '{name}' is deleted; restore it or rename it")
    if TAG_EXPERIMENT_KIND not in experiment.tags:  # made by an earlier dmstab, or by hand
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, TRAINING_KIND)
    return str(experiment.experiment_id)


# ---------------------------------------------------------------- finding earlier runs


def run_page(recipe_uri: str | None, experiment_id: str | None, run_id: str) -> str:
    """The run's page in the MLflow UI, in its model-training view: on the tracking server, or
    where `mlflow ui` serves a local store (`browse_hint` says how to start it)."""
    uri = resolve_uri(recipe_uri)
    base = uri.rstrip("/") if is_remote(uri) else "http://127.0.0.1:5000"
    if experiment_id is None:  # a spooled run: the server gives it an id when it is synced
        return base
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def browse_hint(recipe_uri: str | None) -> str:
    """Where to look at a run: the tracking server itself, or `mlflow ui` on a local store."""
    uri = resolve_uri(recipe_uri)
    if is_remote(uri):
        return uri
    store = "" if uri == resolve_uri(DEFAULT_TRACKING_URI) else f" --backend-store-uri {uri}"
    return f"mlflow ui{store}   (then open http://127.0.0.1:5000)"
