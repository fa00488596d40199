"""The real `dmstab` command line, driven as a user would (in process through typer's runner:
exit codes, stdout and stderr apart)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import typer

from dmstab.cli import app
from tests.helpers import RECIPES, TINY, Runner, store


@pytest.mark.parametrize("command", [[], ["train"], ["sample"]])
def test_help_shows_examples(command: list[str], dmstab: Runner) -> None:
    result = dmstab(*command, "--help")
    assert result.returncode == 0
    assert "Examples" in result.stdout and "dmstab" in result.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["trian"], "error: No such command 'trian'. Did you mean 'train'?; see 'dmstab --help'"),
        (["--verbose"], "error: No such option: --verbose (Possible options: --version); see"),
        (["train", "--dryrun"], "error: No such option: --dryrun"),
        (["fid", "--num-images", "1k"], "error: Invalid value for '--num-images': "),
        (["fid-sweep", "--num-images", "many"], "error: Invalid value for '--num-images': "),
        (["sample", "--out"], "error: Option '--out' requires an argument; see 'dmstab sample"),
        (
            ["ema-reconstruct", "--sigma-rel", "0.1.3"],
            "error: Invalid value for '--sigma-rel': ",
        ),
        (["analyse"], "error: Missing argument 'name'; see 'dmstab analyse --help'"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(args: list[str], line: str, dmstab: Runner) -> None:
    """click's usage box (Usage:, Try ..., a framed message) becomes the one `error:` line."""
    result = dmstab(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(line), result.stderr
    assert result.stderr.rstrip().endswith(" --help'"), result.stderr


def test_bare_dmstab_still_prints_the_help(dmstab: Runner) -> None:
    result = dmstab()
    assert "Usage:" in result.stdout + result.stderr and "Examples" in result.stdout
    assert "error:" not in result.stderr


def test_dry_run_prints_the_papers_hyperparameters(dmstab: Runner) -> None:
    result = dmstab("train", str(RECIPES / "cifar10_clts.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "steps: 4000",
        "schedule: cosine",
        "lr: 0.0001",
        "betas: [0.8, 0.999]",
        "batch_size: 128",
        "rate: 0.9999",
        "sampler: clts",
        "mu: 1200.0",
    ):
        assert line in out, line
    assert not Path("mlflow.db").exists(), "a dry run must not touch the store"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optim.lrr=1e-4"], "did you mean 'optim.lr'"),
        (["optim.lr=fast"], "'optim.lr' is 'fast'; expected float"),
        (["data.name=cifar10", "data.root=does/not/exist"], "CIFAR-10 not found"),
        (["data.name=folder", "data.root=does/not/exist"], "does/not/exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, dmstab: Runner) -> None:
    result = dmstab("train", str(RECIPES / "quickstart.yaml"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    if Path("mlflow.db").exists():  # no run may be created for bad input
        client = store()
        assert client.search_experiments()[0].name == "Default"
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_missing_recipe_and_checkpoint_exit_2(isolated_workdir: Path, dmstab: Runner) -> None:
    assert dmstab("train", "nope.yaml").returncode == 2
    corrupt = isolated_workdir / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    result = dmstab("sample", str(corrupt))
    assert result.returncode == 2 and "not a readable torch file" in result.stderr
    truncated = isolated_workdir / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    result = dmstab("sample", str(truncated))
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr
    malicious = isolated_workdir / "malicious.pt"
    torch.save({"model": Exploit()}, malicious)
    result = dmstab("sample", str(malicious))
    assert result.returncode == 2 and "refused: it holds pickled code" in result.stderr
    assert "(posix.system)" in result.stderr
    assert not (isolated_workdir / "pwned").exists()
    result = dmstab("sample", str(isolated_workdir / "absent.pt"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_train_then_sample_with_fixed_seeds(isolated_workdir: Path, dmstab: Runner) -> None:
    trained = dmstab("train", str(RECIPES / "quickstart.yaml"), *TINY)
    assert trained.returncode == 0, trained.stderr
    train_run = store().search_runs([store().get_experiment_by_name("tests").experiment_id])[0]
    assert trained.stdout == f"{train_run.info.run_id}\n", "RUN=$(dmstab train …)"

    first = dmstab("sample", "sample.seed=3", "sample.num_images=6", "--out", "a")
    second = dmstab(
        "sample", "sample.seed=3", "sample.num_images=6", "sample.batch_size=4", "--out", "b"
    )
    other = dmstab("sample", "sample.seed=4", "sample.num_images=6", "--out", "c")
    for result in (first, second, other):
        assert result.returncode == 0, result.stderr
    images = {d: np.load(next(Path(d).glob("*.npz")))["arr_0"] for d in "abc"}
    assert images["a"].shape == (6, 16, 16, 3) and images["a"].dtype == np.uint8
    assert np.array_equal(images["a"], images["b"]), "same seed, other batch split"
    assert not np.array_equal(images["a"], images["c"])

    client = store()
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], "tags.`dmstab.kind` = 'sample'")
    assert len(runs) == 3
    train_run = client.search_runs([experiment.experiment_id], "tags.`dmstab.kind` = 'train'")[0]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {train_run.info.run_id}
    assert any(
        a.path.endswith(".png") for a in client.list_artifacts(runs[0].info.run_id, "samples")
    )

    refused = dmstab("sample", "model.channels=64")
    assert refused.returncode == 2 and "cannot change a trained model" in refused.stderr


def test_the_browse_hint_points_at_the_store_the_run_went_to(tmp_path: Path) -> None:
    from dmstab.tracking import browse_hint as _browse_hint

    assert _browse_hint("http://mlflow.lab:5000") == "http://mlflow.lab:5000"
    assert _browse_hint(None).startswith("mlflow ui   (")
    other = _browse_hint(f"sqlite:///{tmp_path}/other.db")
    assert other.startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/other.db")


def test_help_names_arguments_as_click_does_and_gives_flags_no_type(
    dmstab: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Usage lines read `RECIPE [OVERRIDES]...` (typer's own: `{recipe} [overrides]...`), and a
    flag, which takes no value, has no `<bool>` beside it; in every command's help."""
    monkeypatch.setenv("COLUMNS", "100")
    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for arguments in [[], *([command] for command in commands)]:
        result = dmstab(*arguments, "--help")
        assert result.returncode == 0, result.stderr
        (usage,) = [line for line in result.stdout.splitlines() if "Usage:" in line]
        assert "<bool>" not in result.stdout and "{" not in usage, usage
    usage = dmstab("train", "--help").stdout
    assert "train [OPTIONS] RECIPE [OVERRIDES]..." in usage
    assert "--dry-run " in usage and "Heun" in dmstab("sample", "--help").stdout
