"""Sweeps: expansion into validated child recipes, a real tiny sweep, Ctrl-C and --resume auto."""

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
from typer.testing import CliRunner

from dmstab.cli import app
from dmstab.commands.report_collect import build_report
from dmstab.commands.sweep import load_sweep, run_sweep
from dmstab.config import load_recipe
from dmstab.errors import DmstabError
from dmstab.tracking import TAG_KIND, TAG_LAUNCHER, TAG_PARENT, TAG_SWEEP_FINGERPRINT
from tests.helpers import RECIPES, TINY, progress_counts, store

POINTS = """
sweep:
  points:
    - {label: uniform, timesteps.sampler: uniform}
    - {label: clts, timesteps.sampler: clts}
    - {label: x0, diffusion.target: x0, optim: {lr: 2.0e-3}}
"""


def _write(body: str, name: str = "ablation.yaml") -> Path:
    path = Path(name)
    path.write_text(f"base: {RECIPES / 'quickstart.yaml'}\n{body}")
    return path


def test_children_are_points_times_grid_each_set_as_an_override() -> None:
    path = _write(POINTS + "  grid:\n    train.seed: [0, 1]\n    ema.rate: [0.99, 0.999]\n")
    sweep = load_sweep(path, ["train.steps=7"])
    assert sweep is not None and len(sweep.children) == 3 * 2 * 2
    by_label = {child.label: child.recipe for child in sweep.children}
    name = "ablation/x0,train.seed=1,ema.rate=0.99"
    by_hand = ["diffusion.target=x0", "optim.lr=2e-3", "train.seed=1", "ema.rate=0.99"]
    by_hand += ["train.steps=7", f"name={name}", f"tracking.run_name={name}"]
    assert by_label[name.partition("/")[2]] == load_recipe(RECIPES / "quickstart.yaml", by_hand)
    assert [c.label for c in sweep.children[:2]] == [
        "uniform,train.seed=0,ema.rate=0.99",
        "uniform,train.seed=0,ema.rate=0.999",
    ]
    assert sweep.base.name == "ablation" and sweep.base.train.steps == 7
    assert {c.recipe.timesteps.sampler for c in sweep.children[:4]} == {"uniform"}
    assert sweep.children[0].overrides == [
        "timesteps.sampler=uniform",
        "train.seed=0",
        "ema.rate=0.99",
    ]


def test_unlabelled_points_and_a_bare_grid_are_labelled_by_their_keys() -> None:
    sweep = load_sweep(_write("sweep:\n  points:\n    - {}\n    - {optim.lr: 0.01}\n"))
    assert sweep is not None
    assert [c.label for c in sweep.children] == ["base", "optim.lr=0.01"]
    assert [c.recipe.optim.lr for c in sweep.children] == [1e-3, 0.01]
    sweep = load_sweep(_write("sweep:\n  grid:\n    model.channel_mult: [[1, 2], [1, 2, 2]]\n"))
    assert sweep is not None
    assert [c.recipe.model.channel_mult for c in sweep.children] == [(1, 2), (1, 2, 2)]
    assert load_sweep(RECIPES / "quickstart.yaml") is None


SWEEP_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if "\nsweep:" in p.read_text())


@pytest.mark.parametrize("path", SWEEP_RECIPES, ids=lambda p: p.stem)
def test_every_sweep_recipe_expands_into_valid_children(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep is not None and sweep.base.name == path.stem
    assert len(sweep.children) >= 2
    for child in sweep.children:
        assert child.recipe.name == child.recipe.tracking.run_name == f"{path.stem}/{child.label}"
        assert child.recipe.tracking.experiment == sweep.base.tracking.experiment


@pytest.mark.parametrize(
    ("body", "overrides", "message"),
    [
        ("sweep:\n", [], "recipe key 'sweep' needs `points`"),
        ("sweep: {grids: {train.seed: [1]}}\n", [], "unknown key 'sweep.grids'"),
        ("sweep: {points: []}\n", [], "sweep.points must be a non-empty list"),
        ("sweep: {grid: {train.seed: []}}\n", [], "sweep.grid 'train.seed' is []"),
        ("sweep: {grid: {train.seed: 3}}\n", [], "sweep.grid 'train.seed' is 3"),
        ("sweep: {points: [uniform]}\n", [], "sweep.points[0] must be a mapping"),
        ("sweep: {points: [{label: 3}]}\n", [], "sweep.points[0].label is 3"),
        ("sweep: {points: [{a..b: 1}]}\n", [], "sweep.points[0]: key 'a..b' must look like"),
        ("sweep: {points: [{tracking.uri: x}]}\n", [], "key 'tracking.uri' is not swept"),
        (
            "sweep: {points: [{label: a, timesteps.samplr: clts}]}\n",
            [],
            "sweep child 'a': unknown recipe key 'timesteps.samplr'; did you mean",
        ),
        (
            "sweep: {grid: {timesteps.mu: [300, 5000]}}\n",
            [],
            "sweep child 'timesteps.mu=5000': timesteps.mu is 5000.0; must be in [0,",
        ),
        (
            "sweep: {points: [{label: a}, {label: a, train.seed: 1}]}\n",
            [],
            "two children labelled 'a'",
        ),
        (
            "sweep: {points: [{train.seed: 1}], grid: {train.seed: [2]}}\n",
            [],
            "'train.seed' is set by both",
        ),
        ("sweep: {grid: {train.seed: [1, 2]}}\n", ["train.seed=3"], "sets 'train.seed', which"),
        ("sweep: {grid: {train.seed: [1, 2]}}\n", ["train={seed: 3}"], "sets 'train.seed'"),
        ("sweep: {grid: {train.seed: [1]}}\n", ["sweep.grid=1"], "the sweep is set in the"),
    ],
)
def test_sweep_mistakes_are_one_line_errors_before_any_run(
    body: str, overrides: list[str], message: str
) -> None:
    with pytest.raises(DmstabError) as info:
        load_sweep(_write(body), overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not Path("mlflow.db").exists()


def test_other_commands_refuse_a_sweep_file_and_dry_run_lists_the_children() -> None:
    path = _write(POINTS)
    with pytest.raises(DmstabError, match=r"is a sweep .*`dmstab train ablation.yaml`"):
        load_recipe(path)
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run", "train.steps=5"])
    assert result.exit_code == 0, result.output
    assert "steps: 5" in result.output and "sweep ablation: 3 children" in result.output
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["2", "clts", "timesteps.sampler=clts"] for line in lines)
    bad = CliRunner().invoke(app, ["train", str(path), "timesteps.sampler=clts"])
    assert bad.exit_code == 2 and "which the sweep varies" in bad.output
    assert not Path("mlflow.db").exists()


def test_cli_trains_every_child_under_one_parent(one_thread: None) -> None:
    path = _write("sweep:\n  grid:\n    train.seed: [0, 1]\n")
    every_child = ["--progress-every", "0"]
    result = CliRunner().invoke(app, ["train", str(path), *TINY, "train.steps=2", *every_child])
    assert result.exit_code == 0, result.output
    assert "child 1/2 train.seed=0 (new)" in result.output
    assert "child 2/2 train.seed=1 (new)" in result.output
    assert progress_counts(result.output, "sweep children") == [(1, 2), (2, 2)]
    parent_id = result.output.split("done sweep ")[1].split(":")[0]
    parent = store().get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.tags[TAG_LAUNCHER]) == {"launcher": "in-process"}
    children = _children(parent_id)
    assert [run.data.params["train.seed"] for run in children] == ["0", "1"]
    assert {run.info.status for run in children} == {"FINISHED"}
    again = CliRunner().invoke(
        app, ["train", str(path), *TINY, "train.steps=2", "--resume", parent_id]
    )
    assert again.exit_code == 2 and "already FINISHED" in again.output


class _StopAt:
    """Progress bars for the children; Ctrl-C at `step` of the `child`-th child to train."""

    def __init__(self, child: int | None = None, step: int = 0) -> None:
        self.child, self.step = child, step
        self.started: list[tuple[int, int]] = []  # (total, completed) of each child trained

    def __call__(self) -> _StopAt:
        return self

    def start(self, total: int, completed: int) -> None:
        self.started.append((total, completed))

    def advance(self, step: int, loss: float, images_per_s: float) -> None:
        if len(self.started) == self.child and step == self.step:
            raise KeyboardInterrupt

    def stop(self) -> None:
        pass


@pytest.mark.slow
def test_ctrl_c_mid_sweep_then_resume_auto_trains_only_what_is_missing(one_thread: None) -> None:
    path = _write(POINTS)
    sweep = load_sweep(path, TINY)
    assert sweep is not None
    interrupt = _StopAt(child=2, step=6)  # TINY: checkpoints at steps 4, 8, 12
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, progress=interrupt)
    client = store()
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = 'sweep'",
    )
    parent_id = parent.info.run_id
    assert parent.info.status == "KILLED"
    assert parent.data.tags[TAG_SWEEP_FINGERPRINT] == sweep.fingerprint
    assert parent.data.params["sweep.children"] == "3"
    first, second = _children(parent_id)
    assert (first.info.status, second.info.status) == ("FINISHED", "KILLED")
    assert first.data.tags["dmstab.recipe_name"] == "ablation/uniform"
    first_losses = len(client.get_metric_history(first.info.run_id, "train/loss"))

    resumed = _StopAt()
    result = run_sweep(sweep, resume="auto", progress=resumed)
    assert result.run_id == parent_id
    assert [c.action for c in result.children] == ["skipped", "resumed", "new"]
    assert resumed.started == [(12, 4), (12, 0)]  # child 2 from its step-4 checkpoint
    after = _children(parent_id)
    assert [run.info.run_id for run in after[:2]] == [first.info.run_id, second.info.run_id]
    assert after[0].info.end_time == first.info.end_time
    assert len(client.get_metric_history(first.info.run_id, "train/loss")) == first_losses
    for run in after[1:]:  # every step logged once, the resumed child's included
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 13))
    assert [run.info.status for run in after] == ["FINISHED"] * 3
    assert [run.data.tags[TAG_PARENT] for run in after] == [parent_id] * 3
    assert client.get_run(parent_id).info.status == "FINISHED"
    finished = client.get_metric_history(parent_id, "sweep/children_finished")
    assert sorted((m.step, m.value) for m in finished) == [(i, float(i)) for i in range(4)]
    with pytest.raises(DmstabError, match="already FINISHED"):
        run_sweep(sweep, resume=parent_id)

    report = CliRunner().invoke(app, ["report", parent_id, "--metric", "loss"])
    assert report.exit_code == 0, report.output
    labels = [m.label for m in build_report([parent_id], metric="loss").methods]
    assert labels == ["uniform", "clts", "x0"]  # the sweep's common prefix is dropped


def _children(parent_id: str) -> list[Run]:
    """The sweep's child runs, oldest first."""
    client = store()
    runs = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
    )
    return list(runs)


@pytest.mark.slow
def test_kill_9_mid_sweep_then_resume_auto_finishes_the_same_sweep(
    isolated_workdir: Path,
) -> None:
    """A SIGKILL leaves the parent and the child RUNNING; --resume auto takes both up again."""
    path = _write("sweep:\n  grid:\n    train.seed: [0, 1]\n")
    args = [sys.executable, "-m", "dmstab", "train", str(path), *TINY, "train.steps=60"]
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    checkpoints: list[Path] = []
    while len(checkpoints) < 2:  # the second child has written a checkpoint
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline, "the second child never wrote a checkpoint"
        time.sleep(0.05)
        checkpoints = list(isolated_workdir.glob("runs/*/checkpoint.pt"))
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    client = store()
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = 'sweep'",
    )
    parent_id = parent.info.run_id
    assert parent.info.status == "RUNNING"  # nothing could mark it
    first, second = _children(parent_id)
    assert (first.info.status, second.info.status) == ("FINISHED", "RUNNING")

    resumed = subprocess.run([*args, "--resume", "auto"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "child 1/2 train.seed=0 (skipped)" in resumed.stderr  # rich writes to stderr
    assert "child 2/2 train.seed=1 (resumed)" in resumed.stderr
    after = _children(parent_id)
    assert [run.info.run_id for run in after] == [first.info.run_id, second.info.run_id]
    assert [run.info.status for run in after] == ["FINISHED", "FINISHED"]
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 61))  # no step lost or logged twice
    assert client.get_run(parent_id).info.status == "FINISHED"
