"""EDM2 Fig. 6 on released files (`dmstab fid-sweep recipes/edm2_img512_released_guidance.yaml`)
at toy scale: tiny pixel-space pickles named as EDM2's post-hoc reconstructions stand in for
the released S networks and the unconditional XS guide; each is imported once and scored at
every guidance strength. A missing download is one line naming where to get it, before
anything is written."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Run

from dmstab.commands.import_model import KIND
from dmstab.published.edm2_releases import URL_ROOT
from tests.helpers import RECIPES, Runner, one_line_error, store
from tests.published.edm2_pickles import LABELS, network, snapshot, write_pickle

RECIPE = str(RECIPES / "edm2_img512_released_guidance.yaml")
SOURCE = "raise SystemExit('the module source ran')\n"  # never run by the reader
NETWORKS = {"edm2-toy-s-0000001-0.050.pkl": 0, "edm2-toy-s-0000001-0.100.pkl": 1}  # name: seed
GUIDE = "edm2-toy-xs-uncond-0000001-0.050.pkl"
TOY = [
    f"fid_sweep.published={list(NETWORKS)}",
    f"fid_sweep.guide={GUIDE}",
    "fid_sweep.guidance=[1, 2]",
    "fid_sweep.num_images=4",
    "eval.reference=reference.npz",
    "train.device=cpu",
    "tracking.experiment=tests",
    "--features",
    "random_conv",
    "--batch-size",
    "4",
]


def _runs(kind: str) -> list[Run]:
    experiment = store().get_experiment_by_name("tests")
    if experiment is None:
        return []
    return list(store().search_runs([experiment.experiment_id], f"tags.`dmstab.kind` = '{kind}'"))


def _table() -> list[tuple[float, float, float]]:
    text = Path("analyses/fid-sweep/edm2_img512_released_guidance/fid_vs_sigma_rel.csv")
    rows = csv.DictReader(io.StringIO(text.read_text()))
    return [(float(r["sigma_rel"]), float(r["guidance"]), float(r["fid"])) for r in rows]


def test_the_sweep_imports_each_file_once_and_scores_every_network_at_every_guidance(
    edm2_names: None, dmstab: Runner
) -> None:
    for name, seed in NETWORKS.items():
        write_pickle(Path(name), snapshot(network(LABELS, 3, seed), LABELS, SOURCE, 3))
    write_pickle(Path(GUIDE), snapshot(network(0, 3, 2), 0, SOURCE, 3))
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez("reference.npz", images=images)

    swept = dmstab("fid-sweep", RECIPE, *TOY)
    assert swept.returncode == 0, swept.stderr
    table = _table()
    assert [(s, w) for s, w, _ in table] == [(0.05, 1), (0.1, 1), (0.05, 2), (0.1, 2)]
    assert all(np.isfinite(fid) and fid > 0 for *_, fid in table)
    assert [f for *_, f in table[:2]] != [f for *_, f in table[2:]]  # the guide acts at w = 2
    assert len(_runs(KIND)) == 3
    (run,) = _runs("fid-sweep")
    history = store().get_metric_history(run.info.run_id, "fid/guidance_2")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [f for *_, f in table[2:]], rel=1e-6
    )
    (guide_run,) = [r for r in _runs(KIND) if r.data.tags["dmstab.import.source"].endswith(GUIDE)]
    assert Path(run.data.params["guide"]).parent.name == guide_run.info.run_id

    again = dmstab("fid-sweep", RECIPE, *TOY, "--guidance", "1")  # the unguided half, again
    assert again.returncode == 0, again.stderr
    assert len(_runs(KIND)) == 3  # the same files with the same settings: the earlier imports
    assert len(_runs("fid-sweep")) == 2
    assert _table() == table[:2]  # the same networks from the same seeds


def test_a_missing_download_is_one_line_naming_where_to_get_it(dmstab: Runner) -> None:
    line = one_line_error(dmstab("fid-sweep", RECIPE))
    name = "edm2-img512-s-2147483-0.025.pkl"
    assert f"published model models/{name} not found: download it from {URL_ROOT}/{name}" in line
    Path("models").mkdir()
    for entry in ("0.025", "0.070", "0.085", "0.120", "0.130", "0.190"):
        Path(f"models/edm2-img512-s-2147483-{entry}.pkl").touch()
    guide = "edm2-img512-xs-uncond-2147483-0.025.pkl"
    assert f"{URL_ROOT}/{guide}" in one_line_error(dmstab("fid-sweep", RECIPE))
    assert not Path("mlflow.db").exists() and not Path("runs").exists()
    assert not Path("analyses").exists()


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("fid_sweep.published=[a.pkl, b-0.100.pkl]", "'a.pkl': its name gives no EMA length"),
        ("fid_sweep.published=[s-0.100.pkl, xs-0.100.pkl]", "have the same σrel 0.1"),
        ("fid_sweep.guide=null", "fid_sweep.guidance other than 1 needs fid_sweep.guide"),
    ],
    ids=["no σrel in the name", "two networks of one σrel", "guidance without a guide"],
)
def test_the_recipe_is_checked_when_it_loads(dmstab: Runner, override: str, says: str) -> None:
    assert says in one_line_error(dmstab("train", RECIPE, override, "--dry-run"))
