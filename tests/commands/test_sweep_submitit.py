"""`dmstab train SWEEP --launcher submitit`: the children as submitit jobs on this machine
(submitit's local executor, the path SLURM jobs take), two at a time; one child killed with
SIGKILL and resumed by `--resume auto` on two ranks, one preempted (SIGUSR2, SLURM's warning
signal) and requeued by submitit itself; option mistakes and a missing submitit as one-line
errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import Run

from dmstab.tracking import TAG_LAUNCHER, TAG_PARENT
from tests.helpers import RECIPES, TINY, cli, failure_line, one_line_error, store

SWEEP = f"base: {RECIPES / 'quickstart.yaml'}\nsweep:\n  grid:\n    train.seed: [0, 1, 2]\n"
LOCAL = ["--launcher", "submitit", "--parallel", "2", "--launcher-option", "cluster=local"]
STEPS = 12  # TINY: checkpoints at steps 4, 8 and 12


def _sweep_file() -> Path:
    path = Path("seeds.yaml")
    path.write_text(SWEEP)
    return path


def _launch(parent_id: str) -> dict[str, object]:
    """How the parent run says its children were last launched."""
    launch: dict[str, object] = json.loads(store().get_run(parent_id).data.tags[TAG_LAUNCHER])
    return launch


def _children(parent_id: str) -> dict[str, Run]:
    """The sweep's child runs by run id."""
    client = store()
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
    )
    return {run.info.run_id: run for run in runs}


def _task_of(run_id: str, logs: Path) -> int | None:
    """The pid of the process training run `run_id`: the child of the submitit controller whose
    log (named after the controller's pid, the local job id) announces that run."""
    for log in logs.glob("*/*_0_log.err"):
        if run_id in log.read_text(errors="replace"):
            controller = log.name.split("_")[0]
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                if fields[1] == controller:  # the parent pid
                    return int(stat.parent.name)
    return None


def _steps(run_id: str) -> list[int]:
    return sorted(m.step for m in store().get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_local_jobs_two_at_a_time_killed_child_resumes_on_two_ranks_preempted_one_requeues(
    isolated_workdir: Path,
) -> None:
    path = _sweep_file()
    args = [sys.executable, "-m", "dmstab", "train", str(path), *TINY, *LOCAL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 240
    signalled: dict[str, int] = {}  # run id -> the signal its process got
    while len(signalled) < 2:  # SIGKILL the first child with a checkpoint, SIGUSR2 the second
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline, "no two children wrote a checkpoint in time"
        time.sleep(0.05)
        for checkpoint in sorted(isolated_workdir.glob("runs/*/checkpoint.pt")):
            run_id = checkpoint.parent.name
            pid = None if run_id in signalled else _task_of(run_id, Path("runs/submitit"))
            if pid is not None:
                sig = signal.SIGKILL if not signalled else signal.SIGUSR2
                os.kill(pid, sig)
                signalled[run_id] = sig
    killed, preempted = signalled
    out, err = sweep.communicate(timeout=240)
    line = failure_line(subprocess.CompletedProcess(args, sweep.returncode, out, err))
    assert line.startswith("error: 1 of 3 sweep children failed: 'train.seed=")
    assert "`--resume auto` continues them" in line and "runs/submitit/" in line
    parent_id = err.split("logs in ")[1].split("\n")[0].rsplit("/", 1)[1]
    assert store().get_run(parent_id).info.status == "FAILED"
    assert _launch(parent_id) == {
        "launcher": "submitit",
        "cluster": "local",
        "parallel": 2,
        "parameters": {"timeout_min": 24 * 60},
    }
    first = _children(parent_id)
    assert first[killed].info.status == "RUNNING"  # nothing could mark it
    assert len(_steps(killed)) < STEPS
    assert first[preempted].info.status == "FINISHED"  # requeued by submitit, same run
    assert _steps(preempted) == list(range(1, STEPS + 1))  # each step logged once
    (third,) = set(first) - {killed, preempted}
    assert first[third].info.status == "FINISHED"

    logs = Path("runs/submitit", parent_id)
    assert not list(logs.glob("*_1_log.out"))  # one task per job so far
    # Resumed on two ranks (tasks_per_node=2: submitit starts two processes, which the child joins
    # into one process group, gloo on CPU, through the variables torchrun would set); were they
    # not joined, each would train the run alone and log every step twice.
    two_ranks = ["--launcher-option", "tasks_per_node=2"]
    resumed = cli("train", str(path), *TINY, *LOCAL, *two_ranks, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip() == parent_id
    announced = [line for line in resumed.stderr.splitlines() if line.startswith("child ")]
    seed = first[killed].data.params["train.seed"]
    assert sorted(line.rsplit(" ", 1)[1] for line in announced) == ["(resumed)", *["(skipped)"] * 2]
    assert f"train.seed={seed} (resumed)" in resumed.stderr
    after = _children(parent_id)
    assert set(after) == set(first)  # the killed child continued its own run
    assert {run.info.status for run in after.values()} == {"FINISHED"}
    for run_id in (preempted, third):  # not trained again
        assert after[run_id].info.end_time == first[run_id].info.end_time
    assert _steps(killed) == list(range(1, STEPS + 1))  # from its checkpoint: no step twice
    assert store().get_run(parent_id).info.status == "FINISHED"
    assert _launch(parent_id)["parameters"] == {"timeout_min": 24 * 60, "tasks_per_node": 2}
    (rank_1,) = logs.glob("*_1_log.out")
    job = rank_1.name.split("_")[0]
    assert killed in (logs / f"{job}_0_log.err").read_text()
    for rank in (0, 1):
        out = (logs / f"{job}_{rank}_log.out").read_text()
        assert f"global_rank={rank}(2)" in out and "Job completed successfully" in out


def test_launcher_mistakes_are_one_line_errors_before_any_run() -> None:
    path = _sweep_file()
    cases = [
        (["--parallel", "2"], "--parallel and --launcher-option need --launcher submitit"),
        (["--launcher", "slurm"], "--launcher slurm: the one launcher is submitit"),
        (["--launcher", "submitit", "--parallel", "0"], "--parallel 0: give at least 1"),
        (["--launcher", "submitit", "--launcher-option", "partition"], "must look like key=value"),
        (
            ["--launcher", "submitit", "--launcher-option", "slurm_partiton=gpu"],
            "Unknown argument 'partiton' for executor 'slurm'",
        ),
        (
            ["--launcher", "submitit", "--launcher-option", "timeout_min=soon"],
            'Parameter "timeout_min" expected type',
        ),
    ]
    for options, message in cases:
        assert message in one_line_error(cli("train", str(path), *TINY, *options))
    plain = cli("train", str(RECIPES / "quickstart.yaml"), "--launcher", "submitit")
    assert "has no `sweep:` section" in one_line_error(plain)
    more = ["mem_gb=4", "slurm_max_num_timeout=20", "slurm_additional_parameters={constraint: a}"]
    options = [arg for option in more for arg in ("--launcher-option", option)]
    dry = cli("train", str(path), *LOCAL, *options, "--dry-run")
    assert dry.returncode == 0 and "sweep seeds: 3 children" in dry.stdout
    assert not Path("mlflow.db").exists() and not Path("runs").exists()


def test_without_submitit_the_launcher_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` fails as if absent
    monkeypatch.delitem(sys.modules, "dmstab.commands.launch", raising=False)
    result = cli("train", str(_sweep_file()), "--launcher", "submitit")
    assert one_line_error(result) == (
        "error: --launcher submitit needs submitit: pip install 'dmstab[cluster]'"
    )
    assert not Path("mlflow.db").exists()
