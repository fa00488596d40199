"""Sweeps: one recipe file, many training runs, children of one MLflow parent run.

A recipe's `sweep:` section lists `points` (named sets of `section.key: value`) and a `grid`
(`section.key: [values]`). The children are every point with every cell of the grid, each the
recipe without `sweep:` and with those keys set exactly as command-line overrides set them, all
validated when the file is loaded. `run_sweep` trains them one after the other, or hands them to
a launcher (`dmstab.commands.launch`: submitit jobs); resumed, it skips the children that
finished and continues the unfinished ones from their checkpoints.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import yaml

from dmstab.config import (
    Recipe,
    apply_overrides,
    fingerprint,
    flatten,
    from_written,
    load_tree,
    parse_override,
    set_key,
    to_yaml,
)
from dmstab.distributed import launched_by_torchrun
from dmstab.errors import DmstabError
from dmstab.tracking import (
    TAG_FINGERPRINT,
    TAG_KIND,
    TAG_LAUNCHER,
    TAG_PARENT,
    TAG_RECIPE_NAME,
    TAG_SWEEP_FINGERPRINT,
    MlflowTracker,
    RunRecord,
    find_runs,
    run_info,
    tracked_run,
)

if TYPE_CHECKING:
    from dmstab.train.loop import Progress, StartedRun

SWEEP_KEYS = ("points", "grid")
SWEEP_ARTIFACT = "sweep.yaml"  # the parent run's: the base recipe and its `sweep:` section
_SHARED_KEYS = ("name", "tracking")  # the sweep names its children and keeps them in one store
Setting = tuple[str, Any]  # ("timesteps.sampler", "clts")
Action = Literal["new", "resumed", "skipped"]


def setting_text(key: str, value: Any) -> str:
    """`key=value` as it would be typed on the command line."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


@dataclass(frozen=True)
class SweepChild:
    """One training run of a sweep: its label, the keys it sets and its validated recipe."""

    label: str
    settings: tuple[Setting, ...]
    recipe: Recipe

    @property
    def overrides(self) -> list[str]:
        return [setting_text(key, value) for key, value in self.settings]


@dataclass(frozen=True)
class Sweep:
    """The base recipe (the file without `sweep:`), the raw `sweep:` section and the children."""

    base: Recipe
    spec: Mapping[str, Any]
    children: tuple[SweepChild, ...]

    @property
    def fingerprint(self) -> str:
        """Hash of the children's recipe fingerprints (any order): which sweep a parent ran."""
        text = json.dumps(sorted(fingerprint(child.recipe) for child in self.children))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The children, one line each: index, label and the keys it sets."""
        width = max(len(child.label) for child in self.children)
        lines = [f"sweep {self.base.name}: {len(self.children)} children"]
        for index, child in enumerate(self.children, 1):
            lines.append(f"  {index:>3}  {child.label:<{width}}  {' '.join(child.overrides)}")
        return "\n".join(lines)


# ---------------------------------------------------------------- reading and expanding


def load_sweep(path: Path | str, overrides: Sequence[str] = ()) -> Sweep | None:
    """The sweep of a recipe file (overrides apply to every child), None when it has none."""
    path = Path(path)
    tree = load_tree(path)
    if "sweep" not in tree:
        return None
    spec = tree.pop("sweep")
    tree.setdefault("name", path.stem)
    return expand(tree, spec, overrides)


def expand(tree: Mapping[str, Any], spec: Any, overrides: Sequence[str] = ()) -> Sweep:
    """Children = points × product(grid) of the raw recipe `tree`, each one validated."""
    if not isinstance(spec, Mapping) or not spec:
        raise DmstabError(
            "recipe key 'sweep' needs `points` (a list of {label, section.key: value}) "
            "and/or `grid` (section.key: [values])"
        )
    unknown = sorted(str(key) for key in spec if key not in SWEEP_KEYS)
    if unknown:
        raise DmstabError(f"unknown key 'sweep.{unknown[0]}'; sweep allows: points, grid")
    points = _points(spec.get("points"))
    grid = _grid(spec.get("grid"))
    _check_keys(overrides, points, grid)
    base_tree = apply_overrides(dict(tree), overrides)
    base = from_written(base_tree)
    children = [
        _child(base_tree, base, label, settings, cell)
        for label, settings in points
        for cell in itertools.product(*grid)
    ]
    labels = [child.label for child in children]
    repeated = next((label for label in labels if labels.count(label) > 1), None)
    if repeated is not None:
        raise DmstabError(f"sweep has two children labelled '{repeated}'; labels must differ")
    return Sweep(base, dict(spec), tuple(children))


def _apply(tree: Mapping[str, Any], settings: Sequence[Setting]) -> dict[str, Any]:
    """`tree` with each dotted key set to its value in turn, as overrides are."""
    result = dict(tree)
    for key, value in settings:
        result = set_key(result, key.split("."), value)
    return result


def _key(key: Any, where: str) -> str:
    parts = key.split(".") if isinstance(key, str) else [""]
    if not all(parts):
        raise DmstabError(f"{where}: key {key!r} must look like section.key")
    if parts[0] in (*_SHARED_KEYS, "sweep"):
        raise DmstabError(
            f"{where}: key '{key}' is not swept: the sweep names its children and keeps them "
            "in the recipe's tracking store"
        )
    return str(key)


def _points(raw: Any) -> list[tuple[str | None, list[Setting]]]:
    """(label or None, settings) per point; one unlabelled empty point when there are none."""
    if raw is None:
        return [(None, [])]
    if not isinstance(raw, list) or not raw:
        raise DmstabError("sweep.points must be a non-empty list of {label, section.key: value}")
    points: list[tuple[str | None, list[Setting]]] = []
    for index, point in enumerate(raw):
        where = f"sweep.points[{index}]"
        if not isinstance(point, Mapping):
            raise DmstabError(f"{where} must be a mapping of section.key: value (and a label)")
        label = point.get("label")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise DmstabError(f"{where}.label is {label!r}; expected a non-empty string")
        settings = [(_key(k, where), v) for k, v in point.items() if k != "label"]
        points.append((label, settings))
    return points


def _grid(raw: Any) -> list[list[Setting]]:
    """Per grid key, its (key, value) settings; the children take their product."""
    if raw is None:
        return []
    if not isinstance(raw, Mapping) or not raw:
        raise DmstabError("sweep.grid must be a non-empty mapping of section.key: [values]")
    axes = []
    for key, values in raw.items():
        where = f"sweep.grid '{key}'"
        if not isinstance(values, list) or not values:
            raise DmstabError(f"{where} is {values!r}; expected a non-empty list of values")
        axes.append([(_key(key, "sweep.grid"), value) for value in values])
    return axes


def _check_keys(
    overrides: Sequence[str],
    points: Sequence[tuple[str | None, list[Setting]]],
    grid: Sequence[list[Setting]],
) -> None:
    """A key is swept by points or by the grid, never both, and no override shadows it."""
    grid_keys = {axis[0][0] for axis in grid}
    point_keys = {key for _, settings in points for key, _ in settings}
    both = grid_keys & point_keys
    if both:
        raise DmstabError(f"sweep key '{min(both)}' is set by both sweep.points and sweep.grid")
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] == "sweep":
            raise DmstabError(f"override {text!r}: the sweep is set in the recipe file, edit it")
        for key in sorted(grid_keys | point_keys):
            parts = key.split(".")
            shorter = min(len(path), len(parts))
            if path[:shorter] == parts[:shorter]:
                raise DmstabError(
                    f"override {text!r} sets '{key}', which the sweep varies; "
                    "change the sweep in the recipe file instead"
                )


def _child(
    base_tree: Mapping[str, Any],
    base: Recipe,
    label: str | None,
    own: list[Setting],
    cell: Sequence[Setting],
) -> SweepChild:
    """A point's settings (`own`) with one grid cell; labelled by the point's label or keys."""
    parts = [label] if label is not None else [setting_text(k, v) for k, v in own]
    parts += [setting_text(k, v) for k, v in cell]
    child_label = ",".join(parts) or "base"
    name = f"{base.name}/{child_label}"
    settings = [*own, *cell]
    tree = _apply(base_tree, [*settings, ("name", name), ("tracking.run_name", name)])
    try:
        recipe = from_written(tree)
    except DmstabError as exc:
        raise DmstabError(f"sweep child '{child_label}': {exc}") from None
    return SweepChild(child_label, tuple(settings), recipe)


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class ChildRun:
    """What became of one child: trained anew, resumed, or skipped (it had finished)."""

    label: str
    run_id: str
    action: Action


@dataclass(frozen=True)
class PlannedChild:
    """A child as the parent found it: its place in the sweep and its earlier run, if any."""

    index: int  # 1-based, in the sweep's order
    child: SweepChild
    previous: RunRecord | None  # its finished run under the parent, else its newest unfinished

    @property
    def action(self) -> Action:
        if self.previous is None:
            return "new"
        return "skipped" if self.previous.status == "FINISHED" else "resumed"

    @property
    def resume(self) -> str | None:
        """The run to continue: the unfinished one (a finished child is not trained again)."""
        return None if self.previous is None else self.previous.run_id


OnChild = Callable[[int, int, str, Action], None]


class Launcher(Protocol):
    """Trains a sweep's children elsewhere (`dmstab.commands.launch`: submitit's executors),
    yielding each one's ChildRun as it ends, skipped ones included, in any order. It calls
    `on_child(index, total, label, action)` as it takes each child up."""

    def __call__(
        self, plan: Sequence[PlannedChild], parent_run_id: str, on_child: OnChild | None
    ) -> Iterator[ChildRun]: ...

    def describe(self) -> dict[str, Any]:
        """What the parent run records of this launch (TAG_LAUNCHER), JSON-serialisable."""
        ...


@dataclass(frozen=True)
class SweepResult:
    run_id: str  # the parent run
    children: tuple[ChildRun, ...]


def run_sweep(
    sweep: Sweep,
    *,
    resume: str | None = None,
    launcher: Launcher | None = None,
    progress: Callable[[], Progress] | None = None,
    on_sample: Callable[[int, int], None] | None = None,
    on_child: OnChild | None = None,
    on_run: Callable[[StartedRun], None] | None = None,
    children_done: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Train every child under one parent run: one after the other in this process, or through
    `launcher` (then `progress`, `on_sample` and `on_run`, this process's, go unused).

    `resume`: `auto` continues the latest unfinished parent run of this sweep (else starts one),
    a run id continues that parent. Finished children are skipped, an unfinished child resumes
    from its checkpoint. The parent ends FINISHED once every child has; a child's failure or
    Ctrl-C marks it FAILED or KILLED and propagates (through a launcher: ChildrenFailed once
    the other children have ended). `progress` makes one bar per child;
    `on_child(index, total, label, action)` is told before each child, `on_run` of each
    child's run as soon as it exists, `children_done(done, total)` at the start and after
    each child.
    """
    if launched_by_torchrun():
        raise DmstabError(
            "a sweep does not run under torchrun; train each child under torchrun instead "
            "(dmstab train RECIPE --dry-run lists the children's overrides)"
        )
    from dmstab.train.loop import check_writable

    for child in sweep.children:  # before the parent run: a child may name its own out_dir
        check_writable(child.recipe)
    tracker = _open_parent(sweep, _resolve_parent(sweep, resume))
    assert tracker.run_id is not None
    parent_id, total = tracker.run_id, len(sweep.children)
    done: dict[str, ChildRun] = {}
    with tracked_run(tracker):
        launch = {"launcher": "in-process"} if launcher is None else launcher.describe()
        tracker.set_tags({TAG_LAUNCHER: json.dumps(launch, sort_keys=True, default=str)})
        tags = {TAG_KIND: "train", TAG_PARENT: parent_id}
        earlier = find_runs(tags, None, sweep.base.tracking.uri)
        plan = [
            PlannedChild(index, child, _previous_run(earlier, fingerprint(child.recipe)))
            for index, child in enumerate(sweep.children, 1)
        ]
        tracker.log_metrics({"sweep/children_finished": 0}, 0)
        if children_done is not None:
            children_done(0, total)
        if launcher is None:
            ended = _train_in_process(plan, parent_id, on_child, progress, on_sample, on_run)
        else:
            ended = launcher(plan, parent_id, on_child)
        for child_run in ended:
            done[child_run.label] = child_run
            tracker.log_metrics({"sweep/children_finished": len(done)}, len(done))
            tracker.flush()
            if children_done is not None:
                children_done(len(done), total)
    return SweepResult(parent_id, tuple(done[child.label] for child in sweep.children))


def _resolve_parent(sweep: Sweep, resume: str | None) -> str | None:
    """`auto` -> latest unfinished parent run of this exact sweep (or None); an id is checked."""
    if resume is None:
        return None
    uri = sweep.base.tracking.uri
    if resume == "auto":
        tags = {TAG_KIND: "sweep", TAG_SWEEP_FINGERPRINT: sweep.fingerprint}
        runs = find_runs(tags, sweep.base.tracking.experiment, uri)
        unfinished = [run for run in runs if run.status != "FINISHED"]
        return unfinished[0].run_id if unfinished else None
    tags, status = run_info(resume, uri)
    if tags.get(TAG_KIND) != "sweep":
        raise DmstabError(
            f"run {resume} is a '{tags.get(TAG_KIND, 'non-dmstab')}' run, not a sweep parent; "
            "give the sweep's parent run id or --resume auto"
        )
    if tags.get(TAG_SWEEP_FINGERPRINT) != sweep.fingerprint:
        raise DmstabError(f"sweep differs from the one run {resume} was started with")
    if status == "FINISHED":
        raise DmstabError(f"sweep run {resume} already FINISHED; every child is trained")
    return resume


def _open_parent(sweep: Sweep, run_id: str | None) -> MlflowTracker:
    """Reopen the parent run `run_id`, or create one holding the sweep and the base recipe."""
    base = sweep.base
    params = {
        **flatten(base),
        "sweep.children": str(len(sweep.children)),
        **{f"sweep.{key}": json.dumps(value, default=str) for key, value in sweep.spec.items()},
    }
    sweep_yaml = to_yaml(base) + yaml.safe_dump({"sweep": dict(sweep.spec)}, sort_keys=False)
    if run_id is not None:  # a parent killed in its setup gets its params and sweep.yaml now
        return MlflowTracker.reopen(
            run_id,
            uri=base.tracking.uri,
            params=params,
            texts={SWEEP_ARTIFACT: sweep_yaml},
            flush_every=base.tracking.flush_every,
        )
    tracker = MlflowTracker.create(
        experiment=base.tracking.experiment,
        kind="sweep",
        params=params,
        tags={TAG_RECIPE_NAME: base.name, TAG_SWEEP_FINGERPRINT: sweep.fingerprint},
        uri=base.tracking.uri,
        run_name=base.tracking.run_name or base.name,
        flush_every=base.tracking.flush_every,
    )
    tracker.log_text(sweep_yaml, SWEEP_ARTIFACT)
    return tracker


def _previous_run(runs: Sequence[RunRecord], child_fingerprint: str) -> RunRecord | None:
    """This child's finished run under the parent, else its newest unfinished one, else None."""
    mine = [run for run in runs if run.tags.get(TAG_FINGERPRINT) == child_fingerprint]
    finished = [run for run in mine if run.status == "FINISHED"]
    candidates = finished or mine
    return candidates[0] if candidates else None


def _train_in_process(
    plan: Sequence[PlannedChild],
    parent_id: str,
    on_child: OnChild | None,
    progress: Callable[[], Progress] | None,
    on_sample: Callable[[int, int], None] | None,
    on_run: Callable[[StartedRun], None] | None,
) -> Iterator[ChildRun]:
    """Each child in turn, here: trained (or at once when it had finished)."""
    from dmstab.train.loop import train

    for planned in plan:
        label, action = planned.child.label, planned.action
        if on_child is not None:
            on_child(planned.index, len(plan), label, action)
        if action == "skipped":
            assert planned.previous is not None
            yield ChildRun(label, planned.previous.run_id, action)
            continue
        result = train(
            planned.child.recipe,
            resume=planned.resume,
            progress=progress() if progress is not None else None,
            on_sample=on_sample,
            parent_run_id=parent_id,
            on_run=on_run,
        )
        yield ChildRun(label, result.run_id, action)
