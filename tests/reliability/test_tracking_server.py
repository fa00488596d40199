"""A real `mlflow server` that dies (SIGKILL) while `dmstab train` runs against it: training goes
on, the run is spooled to disk and replayed when the server answers again (or by `dmstab sync`),
every metric step exactly once, the artifacts all there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.tracking import MlflowTracker, sync
from dmstab.tracking.spool import SPOOL_DIRNAME, Spool, find_spools
from dmstab.tracking.tracker import RETRY_INTERVAL_S
from tests.helpers import RECIPES, TINY, one_line_error, store
from tests.mlflow_server import START_TIMEOUT_S, MlflowServer

from . import counts
from .conftest import dmstab, start_dmstab

RESTART_STEPS = 150  # 15-20 s of TINY training, held stopped while its server restarts
GONE_STEPS = 60  # a run that outlives its server only needs steps after the kill
RECIPE = [*TINY, "train.checkpoint_every=100", "tracking.flush_every=2"]
KEYS = ("train/loss", "train/grad_norm", "train/kimg", "system/images_per_s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the module (it takes many seconds to start); tests kill and restart it."""
    instance = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield instance
    if instance.running:
        instance.kill()


def _kill(server: MlflowServer) -> None:
    """SIGKILL to the server and its workers, counted as a fault."""
    server.kill()
    counts.record(faults=1)


def _up(server: MlflowServer) -> MlflowServer:
    if not server.running:
        server.start()
    return server


def _train(server: MlflowServer, steps: int) -> subprocess.Popen[str]:
    args = ["train", str(RECIPES / "quickstart.yaml"), *RECIPE, f"train.steps={steps}"]
    return start_dmstab(*args, f"tracking.uri={server.uri}")


def _run_ids(client: MlflowClient) -> set[str]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {str(run.info.run_id) for run in client.search_runs(experiments)}


def _wait_for_metrics(client: MlflowClient, earlier: set[str], minimum_step: int) -> str:
    """The new run's id (not in `earlier`), once the server holds its `loss` to `minimum_step`."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for run_id in _run_ids(client) - earlier:
            steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
            if steps and max(steps) >= minimum_step:
                return run_id
        time.sleep(0.3)
    raise AssertionError("training logged no metrics")


def _check_complete(client: MlflowClient, run_id: str, steps: int) -> None:
    """Every key has every step 1..`steps` once, the run finished, samples and checkpoint there."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    lost = 0
    for key in KEYS:
        logged = sorted(m.step for m in client.get_metric_history(run_id, key))
        lost += abs(len(logged) - steps) + len(set(range(1, steps + 1)) ^ set(logged))
        assert logged == list(range(1, steps + 1)), (key, logged)
    counts.record(losses=lost)
    assert int(run.data.tags["dmstab.parameters"]) > 0
    artifacts = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert artifacts == {f"samples/step_{steps:08d}.npz"}
    assert ("samples", steps) in _stepped_images(client, run_id)
    # The checkpoint stays in the run directory (its tag says where), never uploaded
    assert {a.path for a in client.list_artifacts(run_id)} == {"recipe.yaml", "samples", "images"}
    assert run.data.tags["dmstab.checkpoint"].endswith(f"{run_id}/checkpoint.pt")


def _stepped_images(client: MlflowClient, run_id: str) -> list[tuple[str, int]]:
    """(key, step) of the run's `log_image` images, by step (KEY+step+STEP+timestamp+….png)."""
    paths = [a.path.removeprefix("images/") for a in client.list_artifacts(run_id, "images")]
    found = [(p.split("+")[0], int(p.split("+")[2])) for p in paths if p.endswith(".png")]
    return sorted(found, key=lambda image: (image[1], image[0]))


def _finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out, err


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(server: MlflowServer) -> None:
    """The run spools while its server is away; the server restarts while the training is held
    (SIGSTOP) until the spool is due for a retry, so the training, let go, finds the server
    again mid-run, replays the spool and goes on online."""
    client = _up(server).client()
    earlier = _run_ids(client)
    process = _train(server, RESTART_STEPS)
    run_id = _wait_for_metrics(client, earlier, 4)
    _kill(server)
    killed = time.monotonic()
    time.sleep(2)  # the next flush (every 2 steps) fails: from then on the run spools
    os.kill(process.pid, signal.SIGSTOP)
    try:
        server.start()  # same port, same store, same artifact root
        time.sleep(max(0.0, killed + RETRY_INTERVAL_S + 3 - time.monotonic()))
    finally:
        os.kill(process.pid, signal.SIGCONT)
    _, err = _finish(process)
    counts.record(trials=1)
    assert "spooled to" in err
    assert f"MLflow server {server.uri} answers again" in err, err[-2000:]
    assert not (Path("runs") / SPOOL_DIRNAME).exists(), err[-2000:]  # replayed, then deleted
    _check_complete(client, run_id, RESTART_STEPS)


@pytest.mark.slow
def test_server_gone_until_the_end_then_sync(server: MlflowServer) -> None:
    client = _up(server).client()
    earlier = _run_ids(client)
    process = _train(server, GONE_STEPS)
    run_id = _wait_for_metrics(client, earlier, 4)
    _kill(server)
    _, err = _finish(process)
    counts.record(trials=1)
    spool = Path("runs").resolve() / SPOOL_DIRNAME / run_id
    kept = [line for line in err.splitlines() if "dmstab sync" in line]
    assert len(kept) == 1 and str(spool) in kept[0], err[-2000:]
    assert Spool(spool).pending()
    server.start()
    synced = dmstab("sync", str(spool))
    assert synced.returncode == 0, synced.stderr[-2000:]
    assert not spool.exists()
    _check_complete(client, run_id, GONE_STEPS)
    again = dmstab("sync", str(spool))  # nothing left to send: a one-line refusal
    one_line_error(again)


@pytest.mark.slow
def test_unreachable_at_start_then_offline_run_and_sync(server: MlflowServer) -> None:
    if server.running:
        _kill(server)
    refused = dmstab("train", str(RECIPES / "quickstart.yaml"), *TINY, f"tracking.uri={server.uri}")
    line = one_line_error(refused)
    assert server.uri in line and "unreachable" in line
    assert not Path("runs").exists() and not Path("mlflow.db").exists()

    offline = [*TINY, f"tracking.uri={server.uri}", "tracking.offline=true"]
    trained = dmstab("train", str(RECIPES / "quickstart.yaml"), *offline)
    assert trained.returncode == 0, trained.stderr[-3000:]
    counts.record(trials=1)
    (spool,) = (Path("runs") / SPOOL_DIRNAME).iterdir()
    local_id = spool.name
    assert (Path("runs") / local_id / "checkpoint.pt").is_file()
    server.start()
    synced = dmstab("sync")  # the default: every spool in runs/.mlflow-spool
    assert synced.returncode == 0, synced.stderr[-2000:]
    client = server.client()
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`dmstab.local_run_id` = '{local_id}'",
    )
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, 13))
    assert (Path("runs") / run.info.run_id / "checkpoint.pt").is_file()  # linked to the run dir
    assert run.data.params["train.steps"] == "12"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"recipe.yaml", "samples", "images"}
    # spooled as files, replayed with log_image: each image keeps its step
    assert _stepped_images(client, run.info.run_id) == [
        ("timesteps~histogram", 5),
        ("timesteps~histogram", 10),
        ("samples", 12),
    ]


# ---------------------------------------------------------------- the spool on its own


def test_spool_keeps_order_and_survives_a_torn_last_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run")
    assert not spool.exists and spool.records() == []
    spool.create({"uri": "http://x", "run_id": "run"})
    records = [{"type": "metrics", "metrics": [["loss", float(i), 1000 + i, i]]} for i in range(5)]
    for record in records:
        spool.append(record)
    source = tmp_path / "grid.png"
    source.write_bytes(b"\x89PNG")
    spool.add_file(source, "samples")
    source.write_bytes(b"changed after logging")
    assert spool.records()[:5] == records
    artifact = spool.records()[5]
    assert artifact["artifact_path"] == "samples"
    assert spool.file(artifact).read_bytes() == b"\x89PNG"  # a copy, as it was when logged

    with open(tmp_path / "run" / "records.jsonl", "a") as handle:  # kill -9 mid-append
        handle.write('{"type": "metrics", "metrics": [["loss", 9.0, 20')
    assert len(spool.records()) == 6
    spool.mark_sent(2)
    assert [i for i, _ in spool.pending()] == [2, 3, 4, 5]
    reopened = Spool(tmp_path / "run")
    reopened.append({"type": "tags", "tags": {"a": "b"}})
    lines = (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["metrics"] * 5 + ["artifact", "tags"]
    reopened.remove()
    assert not (tmp_path / "run").exists()


def test_replaying_a_spool_twice_logs_each_step_once(tmp_path: Path) -> None:
    """A crash between an upload and its `sent` mark re-sends records: still one row a step."""
    tracker = MlflowTracker.start(load_recipe(RECIPES / "quickstart.yaml", TINY), kind="train")
    run_id = str(tracker.run_id)
    tracker.log_metrics({"loss": 0.5}, 1)
    tracker.flush()
    rows = [["loss", 1.0 / step, 1000 + step, step] for step in range(1, 8)]  # step 1 is there
    for attempt in range(2):
        spool = Spool(tmp_path / SPOOL_DIRNAME / run_id)
        spool.create({"uri": "sqlite:///mlflow.db", "run_id": run_id, "server_run_id": run_id})
        spool.append({"type": "metrics", "metrics": rows[:4]})
        spool.append({"type": "metrics", "metrics": rows[3:]})  # step 4 twice in the spool
        spool.append({"type": "tags", "tags": {"attempt": str(attempt)}})
        (result,) = sync(tmp_path / SPOOL_DIRNAME)
        assert result.run_id == run_id and result.records == 3
    history = {m.step: m.value for m in store().get_metric_history(run_id, "loss")}
    assert len(store().get_metric_history(run_id, "loss")) == 7
    assert history == {1: 0.5, **{step: 1.0 / step for step in range(2, 8)}}
    assert store().get_run(run_id).data.tags["attempt"] == "1"


def test_sync_deletes_an_offline_spool_killed_before_its_first_record(tmp_path: Path) -> None:
    """kill -9 between an offline run's spool `meta.json` and its `create` record: no run."""
    spool = Spool(tmp_path / SPOOL_DIRNAME / "local")
    spool.create({"uri": "sqlite:///mlflow.db", "run_id": "local"})
    assert sync(tmp_path / SPOOL_DIRNAME) == []
    assert not (tmp_path / SPOOL_DIRNAME).exists()
    assert not Path("mlflow.db").exists() or not _run_ids(store())


def test_sync_finishes_deleting_a_spool_a_kill_cut_short(tmp_path: Path) -> None:
    """kill -9 while sync deleted an uploaded spool: a leftover, never a spool to replay."""
    folder = tmp_path / SPOOL_DIRNAME
    spool = Spool(folder / "run")
    spool.create({"uri": "sqlite:///mlflow.db", "run_id": "run", "server_run_id": "run"})
    leftover = folder / ".gone.removed"
    leftover.mkdir()
    (leftover / "meta.json").write_text("{}")  # what a cut-short deletion leaves
    assert [s.directory for s in find_spools(folder)] == [spool.directory]
    spool.remove()
    assert list(folder.iterdir()) == [leftover]
    with pytest.raises(DmstabError, match="no dmstab spool"):
        sync(folder)
    assert not folder.exists() or not any(folder.iterdir())
