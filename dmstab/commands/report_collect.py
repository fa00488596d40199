"""What `dmstab report` reports, read from MLflow: the paper's numbers beside the measured ones.

Each reported method is one training run, or the seeds of one sweep point averaged: its metric
(e.g. `eval/fid`) at the iterations of its recipe's `paper:` block (AAAI Tables 2-3), and,
against a baseline, the Fig. 5 speed-up. A measured value is the one logged at exactly the
paper's iteration (for seeds, at an iteration every seed logged); nothing is interpolated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from dmstab.commands.sweep import Sweep, load_sweep
from dmstab.config import EvalMetric, fingerprint, flatten, load_recipe
from dmstab.errors import DmstabError
from dmstab.tracking import (
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_PARENT,
    TAG_RECIPE_NAME,
    TAG_SWEEP_FINGERPRINT,
    RunRecord,
    find_runs,
    metric_history,
    resolve_uri,
    run_record,
)
from dmstab.train.metric_names import MEASURED_NAMES, tracked_name

Points = list[tuple[int, float]]  # (iteration, value), by iteration
_ITERATION = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")
_SCALE = {"": 1, "k": 1_000, "m": 1_000_000}
_HIGHER_IS_BETTER = frozenset({"is"})  # Inception Score; FID and KID fall as samples improve
_SEED_PARAMS = ("train.seed", "name", "tracking.run_name")  # what differs between seeds of a point


def parse_iteration(text: str, final_step: int | None = None) -> int:
    """A paper iteration key: '100k' -> 100000, '1M' -> 1000000, '1.5M', '250000'; 'end' ->
    `final_step`, the run's last training step (EDM2 reports its tables at the end of training)."""
    if text.strip() == "end" and final_step is not None:
        return final_step
    match = _ITERATION.match(text.strip())
    if match is None:
        raise DmstabError(
            f"paper iteration '{text}' is not a count like 100k, 1.5M or 250000 (k and M only) "
            "or end"
        )
    return round(float(match.group(1)) * _SCALE[match.group(2).lower()])


def final_step(params: Mapping[str, str]) -> int | None:
    """The last training step a run's (flattened recipe) params ask for: train.kimg or steps."""
    try:
        kimg, batch = float(params.get("train.kimg", "0")), int(params["train.batch_size"])
        return math.ceil(kimg * 1000 / batch) if kimg > 0 else int(params["train.steps"])
    except (KeyError, ValueError):
        return None


def format_iteration(iteration: int) -> str:
    """The paper's spelling of an iteration count: 100k, 2M, or the plain number."""
    for suffix, scale in (("M", 1_000_000), ("k", 1_000)):
        if iteration >= scale and iteration % scale == 0:
            return f"{iteration // scale}{suffix}"
    return str(iteration)


def metric_key(metric: str) -> str:
    """The MLflow key of a metric: `eval:` logs fid, kid and is as eval/<name>, training logs
    loss, mse, grad_norm, … as train/<name> and images_per_s as system/images_per_s."""
    if metric in get_args(EvalMetric):
        return f"eval/{metric}"
    return tracked_name(metric) if metric in MEASURED_NAMES else metric


def higher_is_better(key: str) -> bool:
    return key.rpartition("/")[2] in _HIGHER_IS_BETTER


@dataclass(frozen=True)
class Paper:
    """A recipe's `paper:` block as training logged it (params `paper.*`)."""

    table: str
    metric: str
    values: dict[int, float]  # iteration -> published value

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Paper:
        prefix = "paper.values."
        values: dict[int, float] = {}
        for key, text in params.items():
            if key.startswith(prefix):
                try:
                    values[parse_iteration(key[len(prefix) :], final_step(params))] = float(text)
                except ValueError:
                    raise DmstabError(f"param {key} is '{text}', not a number") from None
        return cls(params.get("paper.table", ""), params.get("paper.metric", ""), values)

    def points(self) -> Points:
        return sorted(self.values.items())


@dataclass(frozen=True)
class Method:
    """One reported training run (or seeds averaged) and what it logged of the reported metric.

    With seeds, `run` is the first of `seeds`, `measured` the mean over seeds and `spread` the
    sample standard deviation, at the iterations every seed logged.
    """

    label: str
    run: RunRecord
    paper: Paper
    measured: Points
    uri: str | None  # the store holding the run
    seeds: tuple[RunRecord, ...] = ()
    spread: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    iteration: int
    paper: float | None
    measured: float | None

    @property
    def delta(self) -> float | None:
        if self.paper is None or self.measured is None:
            return None
        return self.measured - self.paper


def rows(method: Method) -> list[Row]:
    """The paper's iterations (or, without a paper block, every logged step), exact matches only."""
    measured = dict(method.measured)
    iterations = sorted(method.paper.values) or sorted(measured)
    return [Row(i, method.paper.values.get(i), measured.get(i)) for i in iterations]


# ---------------------------------------------------------------- Fig. 5 speed-up


def first_reaching(points: Points, target: float, higher_better: bool) -> int | None:
    """The first iteration whose value is at least as good as `target`."""
    for iteration, value in points:
        if (value >= target) if higher_better else (value <= target):
            return iteration
    return None


def speed_up(baseline: Points, method: Points, higher_better: bool) -> tuple[int, float] | None:
    """AAAI Fig. 5: (first iteration the method reaches the baseline's final value,
    baseline's final iteration / that iteration); None when it never does."""
    if not baseline:
        return None
    final_iteration, final_value = baseline[-1]
    reached = first_reaching(method, final_value, higher_better)
    if reached is None or reached <= 0:
        return None
    return reached, final_iteration / reached


@dataclass(frozen=True)
class SpeedUp:
    method: Method
    measured: tuple[int, float] | None
    paper: tuple[int, float] | None


def paper_comparable(a: Paper, b: Paper) -> bool:
    same_metric = not a.metric or not b.metric or a.metric == b.metric
    return bool(a.values) and bool(b.values) and same_metric


def speed_ups(baseline: Method, methods: Sequence[Method], key: str) -> list[SpeedUp]:
    better = higher_is_better(key)
    result = []
    for method in methods:
        if method.run.run_id == baseline.run.run_id:
            continue
        paper = (
            speed_up(baseline.paper.points(), method.paper.points(), better)
            if paper_comparable(baseline.paper, method.paper)
            else None
        )
        result.append(SpeedUp(method, speed_up(baseline.measured, method.measured, better), paper))
    return result


# ---------------------------------------------------------------- finding the runs


@dataclass(frozen=True)
class _Target:
    """A method to report: its label, published numbers and the runs that may hold it."""

    label: str
    paper: Paper
    uri: str | None
    candidates: list[RunRecord]  # preferred first; with `average`, the seeds to average
    average: bool = False


def _is_recipe(source: str) -> bool:
    return Path(source).suffix in (".yaml", ".yml") or Path(source).is_file()


def _run_target(run: RunRecord, uri: str | None) -> _Target:
    return _Target(run.params.get("name", run.name), Paper.from_params(run.params), uri, [run])


def _recipe_target(path: str) -> _Target:
    """The recipe's training runs (same recipe name), exact fingerprint first, newest first."""
    recipe = load_recipe(path)
    runs = find_runs(
        {TAG_KIND: "train", TAG_RECIPE_NAME: recipe.name},
        recipe.tracking.experiment,
        recipe.tracking.uri,
    )
    if not runs:
        raise DmstabError(
            f"no training runs of recipe '{recipe.name}' in experiment "
            f"'{recipe.tracking.experiment}' of {resolve_uri(recipe.tracking.uri)} yet; "
            f"train it first: dmstab train {path}"
        )
    exact = fingerprint(recipe)
    runs.sort(key=lambda run: run.tags.get(TAG_FINGERPRINT) != exact)  # stable: newest first
    return _Target(recipe.name, Paper.from_params(flatten(recipe)), recipe.tracking.uri, runs)


def seed_groups(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Runs whose recipes differ only in train.seed (and names) form one group, in order.

    A group holding a seed twice is no set of seeds (a repeated run): its runs stay apart.
    """
    groups: dict[tuple[tuple[str, str], ...], list[RunRecord]] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.params.items() if k not in _SEED_PARAMS))
        groups.setdefault(key, []).append(run)
    result: list[list[RunRecord]] = []
    for group in groups.values():
        seeds = [run.params.get("train.seed") for run in group]
        distinct = len(set(seeds)) == len(seeds)
        result += [group] if distinct else [[run] for run in group]
    return result


def _seed_label(group: Sequence[RunRecord]) -> str:
    """The first run's recipe name without its seed part, with the number of seeds."""
    name = group[0].params.get("name", group[0].name)
    if len(group) == 1:
        return name
    bare = re.sub(r"[,/ ]*train\.seed=\d+", "", name).strip(" ,/") or name
    return f"{bare} ({len(group)} seeds)"


def _grouped_targets(runs: Sequence[RunRecord], uri: str | None) -> list[_Target]:
    """One target per run, or per set of seeds of the same recipe (averaged); the children of
    one sweep are labelled without their common `SWEEP/` prefix."""
    groups = seed_groups(runs)
    labels = [_seed_label(group) for group in groups]
    prefixes = {label.partition("/")[0] for label in labels}
    if len(prefixes) == 1 and all("/" in label for label in labels):
        labels = [label.partition("/")[2] for label in labels]
    return [
        _Target(label, Paper.from_params(group[0].params), uri, list(group), len(group) > 1)
        for label, group in zip(labels, groups, strict=True)
    ]


def _run_id_targets(run_id: str, uri: str | None) -> list[_Target]:
    """A training run, or the training runs under a sweep parent (seeds of a point averaged)."""
    run = run_record(run_id, uri)
    if run.tags.get(TAG_KIND) == "train":
        return [_run_target(run, uri)]
    children = find_runs({TAG_KIND: "train", TAG_PARENT: run_id}, None, uri)
    if not children:
        kind = run.tags.get(TAG_KIND, "non-dmstab")
        raise DmstabError(
            f"run {run_id} is a '{kind}' run with no training runs under it; "
            "give a training run, a sweep parent, a recipe or --experiment"
        )
    return _grouped_targets(list(reversed(children)), uri)


def _experiment_targets(experiment: str, uri: str | None) -> list[_Target]:
    runs = find_runs({TAG_KIND: "train"}, experiment, uri)
    if not runs:
        raise DmstabError(f"MLflow experiment '{experiment}' has no dmstab training runs")
    return _grouped_targets(list(reversed(runs)), uri)


def _sweep_targets(sweep: Sweep) -> list[_Target]:
    """The children of the sweep file's newest parent run, preferring runs of exactly it."""
    base = sweep.base
    parents = find_runs(
        {TAG_KIND: "sweep", TAG_RECIPE_NAME: base.name}, base.tracking.experiment, base.tracking.uri
    )
    if not parents:
        raise DmstabError(
            f"no runs of sweep '{base.name}' in experiment '{base.tracking.experiment}' of "
            f"{resolve_uri(base.tracking.uri)} yet; run it first: dmstab train RECIPE"
        )
    parents.sort(key=lambda run: run.tags.get(TAG_SWEEP_FINGERPRINT) != sweep.fingerprint)
    return _run_id_targets(parents[0].run_id, base.tracking.uri)


def _targets(source: str, uri: str | None) -> list[_Target]:
    if not _is_recipe(source):
        return _run_id_targets(source, uri)
    sweep = load_sweep(source)
    return [_recipe_target(source)] if sweep is None else _sweep_targets(sweep)


def _method(target: _Target, key: str) -> Method:
    """The first candidate run that logged `key` (else the first run), with its curve; or,
    for seeds, their mean curve."""
    if target.average:
        return _seed_mean(target, key)
    run = next((r for r in target.candidates if key in r.metrics), target.candidates[0])
    measured = metric_history(run.run_id, key, target.uri)
    return Method(target.label, run, target.paper, measured, target.uri)


def _seed_mean(target: _Target, key: str) -> Method:
    """Mean and sample standard deviation over seeds, at the iterations all of them logged."""
    curves = [dict(metric_history(r.run_id, key, target.uri)) for r in target.candidates]
    common = sorted(set.intersection(*(set(curve) for curve in curves)))
    measured: Points = []
    spread: dict[int, float] = {}
    for step in common:
        values = [curve[step] for curve in curves]
        mean = math.fsum(values) / len(values)
        measured.append((step, mean))
        spread[step] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
    runs = tuple(target.candidates)
    return Method(target.label, runs[0], target.paper, measured, target.uri, runs, spread)


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    key: str  # the MLflow metric key reported, e.g. eval/fid
    methods: list[Method]
    baseline: Method | None
    speed_ups: list[SpeedUp]


def build_report(
    sources: Sequence[str],
    *,
    experiment: str | None = None,
    metric: str | None = None,
    baseline: str | None = None,
    uri: str | None = None,
) -> Report:
    """Read the runs behind `sources` (recipe files, run ids) and `experiment` from MLflow.

    `metric` defaults to the first method's `paper.metric` (else fid); `baseline` (a recipe or
    run id, reported too) adds the Fig. 5 speed-up of every other method.
    """
    targets = [t for source in sources for t in _targets(source, uri)]
    if experiment is not None:
        targets += _experiment_targets(experiment, uri)
    if not targets:
        raise DmstabError("nothing to report: give recipe files, run ids or --experiment NAME")
    base_targets = _baseline_targets(baseline, targets, uri) if baseline is not None else []
    if len(base_targets) > 1:
        raise DmstabError(f"baseline {baseline} names {len(base_targets)} runs; give one run")
    first = (base_targets or targets)[0]
    key = metric_key(metric or first.paper.metric or "fid")
    base = _method(base_targets[0], key) if base_targets else None
    methods = _unique([base] if base else [], (_method(t, key) for t in targets))
    if metric is not None and not any(method.measured for method in methods):
        logged = sorted({name for method in methods for name in method.run.metrics})
        raise DmstabError(
            f"--metric {metric}: no reported run logged {key}; they logged: "
            f"{', '.join(logged) or 'no metrics'}"
        )
    return Report(key, methods, base, speed_ups(base, methods, key) if base else [])


def _short_label(label: str) -> str:
    """A sweep child's label as the sweep wrote it: `mini/uniform (3 seeds)` -> `uniform`."""
    return re.sub(r" \(\d+ seeds\)$", "", label).rpartition("/")[2]


def _baseline_targets(baseline: str, targets: Sequence[_Target], uri: str | None) -> list[_Target]:
    """A reported method named by its label (e.g. a sweep point `uniform`), else a recipe or
    run id."""
    named = [t for t in targets if baseline in (t.label, _short_label(t.label))]
    return named[:1] if named else _targets(baseline, uri)


def _unique(head: list[Method], rest: Iterable[Method]) -> list[Method]:
    """Methods in order, each run once (a run given twice, or also as baseline, is one)."""
    seen = {m.run.run_id for m in head}
    result = list(head)
    for method in rest:
        if method.run.run_id not in seen:
            seen.add(method.run.run_id)
            result.append(method)
    return result


def varied_parameter(report: Report) -> str | None:
    """The one numeric recipe key in which the reported methods differ (a 1-D sweep such as
    AAAI Fig. 6's μ or target iteration), else None."""
    if len(report.methods) < 2:
        return None
    params = [m.run.params for m in report.methods]
    keys = {k for p in params for k in p} - set(_SEED_PARAMS)
    varied = [k for k in sorted(keys) if len({p.get(k) for p in params}) > 1]
    if len(varied) != 1:
        return None
    try:
        [float(p[varied[0]]) for p in params]
    except (KeyError, ValueError):
        return None
    return varied[0]
