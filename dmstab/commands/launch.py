"""`dmstab train SWEEP --launcher submitit`: a sweep's children as submitit jobs (SLURM, or
processes on this machine), the parent run waiting here and collecting them in MLflow.

The one module that imports submitit; `dmstab.commands.train` imports it only for
`--launcher submitit`. Each child is one job: one task per GPU when it asks for several, each
task a rank of the child's process group (submitit's TorchDistributedEnvironment exports the
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT that `torchrun` would). A job that
SLURM preempts, or that reaches its time limit, is requeued by submitit and resumes the same
MLflow run from its last checkpoint; a job that dies otherwise is resumed by running the sweep
again with `--resume auto`, which also skips the children that finished.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import yaml

from dmstab.commands.sweep import ChildRun, OnChild, PlannedChild
from dmstab.config import Recipe
from dmstab.console import TrainProgress, console
from dmstab.errors import ChildrenFailed, DmstabError
from dmstab.train.loop import StartedRun, train

CLUSTER_KEY = "cluster"  # picks submitit's executor; every other option is one of its parameters
# given to the executor when it is made, not to update_parameters: requeues after a time-out
CONSTRUCTOR_KEYS = ("slurm_max_num_timeout", "local_max_num_timeout")
DEFAULT_TIMEOUT_MIN = 24 * 60  # submitit's own defaults (5 min on SLURM, 2 locally) end a training
POLL_S = {"local": 0.5, "debug": 0.0}  # how often the parent looks at its jobs; SLURM: below
SLURM_POLL_S = 30.0


@dataclass(frozen=True)
class LauncherSettings:
    """Where and how the children run: submitit's cluster (as given, None: SLURM where `sbatch`
    is found, else this machine; `parse_settings` resolves it), its parameters, and how many
    children run at once (None: all)."""

    cluster: str | None
    parameters: Mapping[str, Any]
    parallel: int | None


def parse_settings(options: Sequence[str], parallel: int | None) -> LauncherSettings:
    """`--launcher-option KEY=VALUE` (YAML-typed values) and `--parallel N`, checked by building
    submitit's executor in a scratch folder: a mistake is one line before any run exists."""
    if parallel is not None and parallel < 1:
        raise DmstabError(f"--parallel {parallel}: give at least 1 child at a time")
    values: dict[str, Any] = {}
    for text in options:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise DmstabError(f"--launcher-option {text!r} must look like key=value")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise DmstabError(f"--launcher-option {text!r}: {raw!r} is not valid YAML") from None
    cluster = values.pop(CLUSTER_KEY, None)
    if cluster is not None and not isinstance(cluster, str):
        raise DmstabError(f"--launcher-option cluster={cluster!r}: give slurm, local or debug")
    values.setdefault("timeout_min", DEFAULT_TIMEOUT_MIN)
    gpus = values.get("gpus_per_node")
    if isinstance(gpus, int) and gpus > 1:  # one rank per GPU, as torchrun --nproc_per_node
        values.setdefault("tasks_per_node", gpus)
    settings = LauncherSettings(cluster, values, parallel)
    with tempfile.TemporaryDirectory() as scratch:
        resolved = _executor(settings, Path(scratch)).cluster
    return dataclasses.replace(settings, cluster=resolved)


def _executor(settings: LauncherSettings, folder: Path) -> submitit.AutoExecutor:
    """submitit's executor for `settings`, its logs and pickles in `folder`."""
    made = {k: v for k, v in settings.parameters.items() if k in CONSTRUCTOR_KEYS}
    updated = {k: v for k, v in settings.parameters.items() if k not in CONSTRUCTOR_KEYS}
    try:
        executor = submitit.AutoExecutor(folder, cluster=settings.cluster, **made)
        executor.update_parameters(**updated)
        if executor.cluster == "slurm" and settings.parallel is not None:
            executor.update_parameters(slurm_array_parallelism=settings.parallel)
    except (AssertionError, NameError, RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmstabError(f"--launcher submitit: {first}") from None
    return executor


class ChildJob(submitit.helpers.Checkpointable):
    """One sweep child as a submitit job: train its recipe under the parent run, resuming run
    `resume` when given. Preempted or timed out, submitit calls `checkpoint()`, which
    (Checkpointable's) requeues this same object; by then `resume` is the child's run, so the
    requeued job continues it from its last checkpoint (steps after it are trained again)."""

    def __init__(
        self,
        recipe: Recipe,
        parent_run_id: str,
        resume: str | None,
        announce: Callable[[StartedRun], None],
    ) -> None:
        self.recipe = recipe
        self.parent_run_id = parent_run_id
        self.resume = resume
        self.announce = announce  # a module's function: pickled by name

    def __call__(self) -> str | None:
        """The child's run id (None on ranks other than 0)."""
        if submitit.JobEnvironment().num_tasks > 1:  # each task one rank, on GPU LOCAL_RANK
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )

        def started(run: StartedRun) -> None:
            self.resume = run.run_id
            self.announce(run)

        result = train(
            self.recipe,
            resume=self.resume,
            progress=TrainProgress(),
            parent_run_id=self.parent_run_id,
            on_run=started,
        )
        return result.run_id if result.is_main else None


class SubmititLauncher:
    """The children of a sweep as submitit jobs, `settings.parallel` at a time: on SLURM one
    array job (`slurm_array_parallelism`), elsewhere each one submitted as a slot frees up.
    Logs and pickles go to `root/PARENT_RUN_ID` (`train.out_dir/submitit/...`); each child's
    log begins with `announce(run)` of its MLflow run."""

    def __init__(
        self, settings: LauncherSettings, root: Path, announce: Callable[[StartedRun], None]
    ) -> None:
        self.settings = settings
        self.root = root
        self.announce = announce

    def describe(self) -> dict[str, Any]:
        return {
            "launcher": "submitit",
            "cluster": self.settings.cluster,
            "parallel": self.settings.parallel,
            "parameters": dict(self.settings.parameters),
        }

    def __call__(
        self, plan: Sequence[PlannedChild], parent_run_id: str, on_child: OnChild | None
    ) -> Iterator[ChildRun]:
        folder = (self.root / parent_run_id).resolve()
        executor = _executor(self.settings, folder)
        cluster = executor.cluster
        todo = []
        for planned in plan:
            if planned.action == "skipped":
                if on_child is not None:
                    on_child(planned.index, len(plan), planned.child.label, planned.action)
                assert planned.previous is not None
                yield ChildRun(planned.child.label, planned.previous.run_id, "skipped")
            else:
                todo.append(planned)
        at_once = self.settings.parallel or len(todo)
        console.print(
            f"sweep: {len(todo)} children as submitit {cluster} jobs, {at_once} at a time; "
            f"logs in {folder}",
            highlight=False,
        )
        window = len(todo) if cluster == "slurm" else at_once  # SLURM throttles the array

        def job_of(planned: PlannedChild) -> ChildJob:
            recipe = planned.child.recipe
            return ChildJob(recipe, parent_run_id, planned.resume, self.announce)

        failures: list[str] = []
        for planned, job in _run_jobs(executor, todo, window, job_of, on_child, len(plan)):
            failure = job.exception()
            if failure is None:
                run_id = job.results()[0]
                assert isinstance(run_id, str)
                yield ChildRun(planned.child.label, run_id, planned.action)
            else:
                reason = str(failure).strip().splitlines()[-1:] or [type(failure).__name__]
                failures.append(
                    f"'{planned.child.label}' (job {job.job_id}: {reason[0][:200]}; "
                    f"log {job.paths.stderr})"
                )
        if failures:
            raise ChildrenFailed(
                f"{len(failures)} of {len(plan)} sweep children failed: {', '.join(failures)}; "
                "`--resume auto` continues them, skipping the finished ones"
            )


def _run_jobs(
    executor: submitit.AutoExecutor,
    todo: Sequence[PlannedChild],
    window: int,
    job_of: Callable[[PlannedChild], ChildJob],
    on_child: OnChild | None,
    total: int,
) -> Iterator[tuple[PlannedChild, submitit.Job[Any]]]:
    """Each child's job as it ends, at most `window` submitted and unfinished at once. Ctrl-C
    here cancels every job still running (a local one closes its run KILLED), so that no child
    goes on training with nobody collecting it."""
    waiting = list(todo)
    running: list[tuple[PlannedChild, submitit.Job[Any]]] = []
    poll_s = POLL_S.get(executor.cluster, SLURM_POLL_S)
    try:
        while waiting or running:
            start, waiting = waiting[: window - len(running)], waiting[window - len(running) :]
            for planned in start:
                if on_child is not None:
                    on_child(planned.index, total, planned.child.label, planned.action)
            running += zip(
                start, _submit(executor, [job_of(planned) for planned in start]), strict=True
            )
            ended = [pair for pair in running if pair[1].done()]
            if not ended:
                time.sleep(poll_s)
            for pair in ended:
                running.remove(pair)
                yield pair
    except BaseException:
        for _, job in running:
            job.cancel(check=False)
        raise


def _submit(
    executor: submitit.AutoExecutor, children: Sequence[ChildJob]
) -> list[submitit.Job[Any]]:
    """The children's jobs, submitted together (one array job on SLURM). Outside this process's
    own SLURM or torchrun variables, which would otherwise leak into the jobs."""
    if not children:
        return []
    with submitit.helpers.clean_env(), executor.batch():
        jobs = [executor.submit(child) for child in children]
    return jobs
