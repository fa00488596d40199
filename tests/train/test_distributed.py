"""`torchrun -m dmstab train` with 2 CPU processes (gloo): same weights as 1 process, gradient
accumulation, Ctrl-C and resume on another world size.

The runs train the tiny EDM2 network (magnitude-preserving layers, no biases). Two runs that
differ only in float summation order (the batch split over ranks or micro-batches) then
differ by about one float32 ulp of the weights (|w| ≤ ~5, ulp ≈ 5e-7) after 12–30 Adam steps,
so rtol 1e-5 / atol 1e-6 is tight: a wrong row, seed or normalisation moves weights by ~lr
(1e-2). (An ADM UNet has biases ahead of GroupNorm whose gradient is zero up to rounding; Adam
scales that rounding noise to steps of ~lr, so its weights agree to ~lr only:
docs/distributed.md.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dmstab.checkpoint import load_checkpoint
from dmstab.config import load_recipe
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, TINY_EDM, store

MINI = RECIPES / "edm2_mini.yaml"
EDM = [*TINY_EDM, "train.device=cpu", "model.dropout=0", "train.checkpoint_every=2"]


def _sigint_as_default() -> None:
    """A child started from a shell's background job inherits SIGINT ignored (POSIX: no job
    control), and Python then installs no KeyboardInterrupt for it; these tests press Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _torchrun(processes: int, *args: str) -> subprocess.Popen[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, f"--nproc_per_node={processes}", "-m", "dmstab", "train"]
    return subprocess.Popen(
        [*command, str(MINI), *EDM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=_sigint_as_default,
    )


def _single(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dmstab", "train", str(MINI), *EDM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=_sigint_as_default,
    )


def _finish(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out + err  # rich writes to stderr


def _reference(*args: str) -> Path:
    """The same recipe trained in this process, uninterrupted, in another experiment."""
    recipe = load_recipe(MINI, [*EDM, *args, "tracking.experiment=ref", "train.out_dir=ref"])
    return train(recipe).checkpoint


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)
    weights = {**state["model"], **{f"ema.{k}": v for k, v in state["ema"]["shadow"].items()}}
    for index, shadow in enumerate(state["power_ema"]["shadows"]):
        weights.update({f"power_ema{index}.{k}": v for k, v in shadow.items()})
    return weights


def _assert_same_weights(path: Path, reference: Path) -> None:
    got, expected = _weights(path), _weights(reference)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _only_run(client: MlflowClient) -> str:
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, "rank 0 alone opens the MLflow run"
    assert runs[0].info.status == "FINISHED"
    return str(runs[0].info.run_id)


def _logged_steps(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(isolated_workdir: Path) -> None:
    out = _finish(_torchrun(2))
    assert out.count("done run") == 1, "only rank 0 reports"
    client = store()
    run_id = _only_run(client)
    assert _logged_steps(client, run_id) == list(range(1, 13))
    _assert_same_weights(isolated_workdir / "runs" / run_id / "checkpoint.pt", _reference())
    reference_run = client.search_runs([client.get_experiment_by_name("ref").experiment_id])[0]
    for key in ("train/loss", "train/logvar"):
        two = [m.value for m in sorted(client.get_metric_history(run_id, key), key=_step)]
        one = [
            m.value
            for m in sorted(client.get_metric_history(reference_run.info.run_id, key), key=_step)
        ]
        assert two == pytest.approx(one, rel=1e-5), key  # global means, not rank 0's rows


def _step(metric: Metric) -> int:
    return int(metric.step)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_whole_batch(one_thread: None) -> None:
    accumulated = _reference("train.micro_batch_size=2", "tracking.experiment=accumulated")
    _assert_same_weights(accumulated, _reference())


def test_importance_sampler_learns_from_the_whole_batch_under_accumulation(
    one_thread: None,
) -> None:
    """Each micro-batch's (t, loss) must reach the sampler: its history is the whole batch's."""
    importance = [*TINY, "timesteps.sampler=importance", "train.steps=4", "model.dropout=0"]
    states = []
    for micro in (0, 2):
        recipe = load_recipe(
            RECIPES / "quickstart.yaml",
            [*importance, f"train.micro_batch_size={micro}", f"train.out_dir=m{micro}"],
        )
        states.append(load_checkpoint(train(recipe).checkpoint)["objective"])
    whole, accumulated = states
    assert int(whole["timesteps.loss_counts"].sum()) > 8, "more than one micro-batch's worth"
    assert torch.equal(accumulated["timesteps.loss_counts"], whole["timesteps.loss_counts"])
    torch.testing.assert_close(
        accumulated["timesteps.loss_history"], whole["timesteps.loss_history"], rtol=1e-5, atol=0
    )


def _rank_pid(launcher: subprocess.Popen[str], rank: int) -> int:
    """The pid of `torchrun`'s worker of that rank (its child whose environment says RANK)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


def _wait_for_checkpoint(process: subprocess.Popen[str], root: Path, step: int) -> Path:
    deadline = time.monotonic() + 240
    while True:
        checkpoints = list(root.glob("runs/*/checkpoint.pt"))
        if checkpoints and load_checkpoint(checkpoints[0])["step"] >= step:
            return checkpoints[0]
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no checkpoint of step {step}"
        time.sleep(0.05)


def _stopped_at(process: subprocess.Popen[str], checkpoint: Path) -> int:
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0, f"the run finished before Ctrl-C; make it longer: {err[-800:]}"
    return int(load_checkpoint(checkpoint)["step"])


def _interrupt_after_checkpoint(process: subprocess.Popen[str], root: Path, step: int) -> int:
    """SIGINT (Ctrl-C) once the run's checkpoint has reached `step`; the step it stopped at."""
    checkpoint = _wait_for_checkpoint(process, root, step)
    process.send_signal(signal.SIGINT)
    return _stopped_at(process, checkpoint)


def _interrupt_peer_first(launcher: subprocess.Popen[str], root: Path, step: int) -> int:
    """Ctrl-C in the order that used to close the run FAILED: rank 1 gets SIGINT half a second
    before `torchrun` relays its own to both ranks; the step the run stopped at."""
    checkpoint = _wait_for_checkpoint(launcher, root, step)
    os.kill(_rank_pid(launcher, 1), signal.SIGINT)
    time.sleep(0.5)
    launcher.send_signal(signal.SIGINT)
    return _stopped_at(launcher, checkpoint)


@pytest.mark.slow
def test_ctrl_c_then_resume_on_one_then_on_two_processes(isolated_workdir: Path) -> None:
    longer = "train.kimg=0.48"  # 60 steps of 8 images: each phase stops well before the end
    first = _interrupt_peer_first(_torchrun(2, longer), isolated_workdir, 2)
    client = store()
    (killed,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert killed.info.status == "KILLED"
    second = _interrupt_after_checkpoint(
        _single(longer, "--resume", "auto"), isolated_workdir, first + 2
    )
    assert first < second < 60
    _finish(_torchrun(2, longer, "train.micro_batch_size=2", "--resume", "auto"))
    run_id = _only_run(client)
    assert run_id == killed.info.run_id
    assert _logged_steps(client, run_id) == list(range(1, 61)), "each step logged exactly once"
    checkpoint = isolated_workdir / "runs" / run_id / "checkpoint.pt"
    _assert_same_weights(checkpoint, _reference(longer))
