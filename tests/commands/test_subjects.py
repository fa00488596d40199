"""Trained models for analyses: kept checkpoints, finished-run reuse, override limits."""

from __future__ import annotations

import pytest
import torch

from dmstab.analysis.spectrum import HessianConfig
from dmstab.checkpoint import load_checkpoint
from dmstab.commands.sample import sample
from dmstab.commands.subjects import load_subject, trained_subject
from dmstab.config import fingerprint, load_recipe
from dmstab.errors import DmstabError
from dmstab.tracking import find_finished_run
from dmstab.train.loop import train
from tests.helpers import RECIPES, TINY, store


def _recipe(*extra: str):  # type: ignore[no-untyped-def]
    return load_recipe(RECIPES / "quickstart.yaml", [*TINY, *extra])


@pytest.mark.slow
def test_kept_checkpoint_equals_a_run_that_stops_there(one_thread: None) -> None:
    """The weights kept at step 8 of a 12-step run are those of an 8-step run: every draw of a
    step depends only on (seed, step), and nothing in this recipe depends on the run length."""
    long_run = train(_recipe("train.keep_checkpoints=[4,8]"))
    kept = {p.name for p in (long_run.run_dir / "checkpoints").iterdir()}
    assert kept == {"step_00000004.pt", "step_00000008.pt"}
    short_run = train(_recipe("train.steps=8"))
    at_8 = load_subject(long_run.run_id).kept(8)
    assert at_8.step == 8
    reference = load_checkpoint(short_run.checkpoint)["model"]
    for name, value in at_8.state["model"].items():
        assert torch.equal(value, reference[name]), name


def test_keep_checkpoints_does_not_change_the_fingerprint() -> None:
    assert fingerprint(_recipe("train.keep_checkpoints=[4]")) == fingerprint(_recipe())
    assert fingerprint(_recipe("hessian.top_k=5", "landscape.points=5")) == fingerprint(_recipe())


def test_finished_run_is_reused_and_only_training_runs_count(one_thread: None) -> None:
    recipe = _recipe("train.steps=4")
    assert find_finished_run(recipe) is None
    first = trained_subject(recipe, label="a")
    sample(first.run_id, ["sample.num_images=2", "sample.batch_size=2"])  # same fingerprint tag
    second = trained_subject(recipe, label="b")
    assert second.run_id == first.run_id == find_finished_run(recipe)
    runs = store().search_runs(
        [store().get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`dmstab.kind` = 'train'",
    )
    assert len(runs) == 1


def test_missing_kept_checkpoint_and_model_overrides_are_one_line_errors(one_thread: None) -> None:
    run = train(_recipe("train.steps=4"))
    subject = load_subject(str(run.checkpoint), ["hessian.top_k=2", "sample.seed=3"])
    assert subject.recipe.analysis(HessianConfig).top_k == 2 and subject.recipe.sample.seed == 3
    with pytest.raises(DmstabError, match=r"kept no checkpoint at step 2.*keep_checkpoints=\[2\]"):
        subject.kept(2)
    with pytest.raises(DmstabError, match=r"'model\.channels' cannot change a trained model"):
        load_subject(run.run_id, ["model.channels=64"])
