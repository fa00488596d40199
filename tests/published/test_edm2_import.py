"""The edm2 format: a pickle laid out as NVlabs/edm2's snapshots (persistent objects whose
module source would run when unpickled the usual way, EasyDicts, tensors as plain `pickle`
writes them) reads back into a dmstab network that computes exactly what the original did, and
no code in the file ever runs: a foreign global is refused by name, the module source is
never executed, a broken file is one line.

The pickles are written by tests/published/edm2_pickles.py, with no edm2 code.
"""

from __future__ import annotations

import builtins
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dmstab.diffusion.samplers  # noqa: F401  (the recipe's heun sampler)
from dmstab.checkpoint import load_checkpoint
from dmstab.config.loading import apply_overrides, from_mapping
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.published import FORMATS
from dmstab.published.edm2_releases import URL_ROOT, named_sigma_rel
from dmstab.tracking import TAG_RUN_DIR
from dmstab.train.restore import network_from_state, stored_recipe
from tests.helpers import Payload, Runner, one_line_error, store
from tests.published.edm2_pickles import (
    LABELS,
    SCALE,
    EasyDict,
    network,
    snapshot,
    write_pickle,
)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Module source that would write `marker` if anything executed it."""
    marker = tmp_path / "module_src_ran"
    yield f"open({str(marker)!r}, 'w').write('ran')\n", marker


def _outputs(denoiser: nn.Module, label_dim: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator) * 2
    sigma = torch.tensor([0.002, 0.5, 3.0, 80.0])
    labels = torch.eye(LABELS)[[1, 3, 5, 9]] if label_dim else None
    with torch.no_grad():
        return [denoiser(x, sigma, labels), denoiser.logvar(sigma)]


@pytest.mark.parametrize("label_dim", [LABELS, 0], ids=["conditional", "unconditional guide"])
def test_the_imported_network_computes_what_the_original_did(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], label_dim: int
) -> None:
    original = network(label_dim)
    data = snapshot(original, label_dim, source[0])
    path = write_pickle(tmp_path / "edm2-img512-xs-2147483-0.135.pkl", data)
    imported = FORMATS["edm2"].read(path, {})
    assert not source[1].exists(), "the pickled module source ran"
    assert imported.num_classes == label_dim
    assert imported.sigma_rel == 0.135  # the post-hoc EMA length its name gives
    assert imported.known is not None and imported.known.url == f"{URL_ROOT}/{path.name}"
    assert imported.inferred["model.edm2.channels_per_head"] == 8
    assert imported.recipe["model"]["class_cond"] == (label_dim > 0)
    assert all(tensor.dtype == torch.float32 for tensor in imported.weights.values())
    rebuilt = build_model(from_mapping(imported.recipe), label_dim).eval()
    rebuilt.load_state_dict(imported.weights, strict=True)
    expected = _outputs(original, label_dim)
    for ours, theirs in zip(_outputs(rebuilt, label_dim), expected, strict=True):
        assert torch.equal(ours, theirs)
    if not label_dim:  # the guide is named on the main network's recipe
        guided = ["sample.guide=guide.pt", "sample.guidance=1.4"]
        assert from_mapping(apply_overrides(imported.recipe, guided)).sample.guidance == 1.4


class Exec:
    """A pickle that calls builtins.exec on code writing a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class PersistentId(pickle.Pickler):
    def persistent_id(self, obj: object) -> str | None:
        return "storage" if isinstance(obj, bytes) else None


def _with_persistent_id(path: Path, marker: Path) -> None:
    with path.open("wb") as stream:
        PersistentId(stream).dump({"ema": b"weights"})


@pytest.mark.parametrize(
    ("write", "named"),
    [
        (lambda path, marker: write_pickle(path, Payload(marker)), "posix.system"),
        (lambda path, marker: write_pickle(path, EasyDict(ema=Exec(marker))), "builtins.exec"),
        (_with_persistent_id, "persistent_load"),
    ],
    ids=["os.system", "builtins.exec inside an EasyDict", "persistent id"],
)
def test_code_in_the_pickle_is_refused_by_name(
    tmp_path: Path, edm2_names: None, write: Callable[[Path, Path], object], named: str
) -> None:
    path, marker = tmp_path / "net.pkl", tmp_path / "pwned"
    write(path, marker)
    with pytest.raises(DmstabError) as refusal:
        FORMATS["edm2"].read(path, {})
    assert str(refusal.value) == (
        f"EDM2 network pickle {path} refused: it holds pickled code ({named}), "
        "which weights-only loading never runs"
    )
    assert not marker.exists()


def _truncated(path: Path, good: bytes) -> None:
    path.write_bytes(good[: len(good) // 2])


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncated, "is corrupt or truncated: not a readable pickle"),
        (lambda path, good: path.write_bytes(b""), "is empty (0 bytes)"),
        (
            lambda path, good: write_pickle(path, {"net": [1, 2]}),
            "is not an EDM2 network pickle (no",
        ),
        (lambda path, good: torch.save({}, path), "(it is a torch file, not a pickle)"),
    ],
    ids=["truncated", "empty", "no network", "a torch file"],
)
def test_a_broken_file_is_one_line(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], damage: Any, says: str
) -> None:
    good = pickle.dumps(snapshot(network(LABELS), LABELS, source[0]), protocol=4)
    path = tmp_path / "net.pkl"
    damage(path, good)
    with pytest.raises(DmstabError) as error:
        FORMATS["edm2"].read(path, {})
    assert says in str(error.value) and "\n" not in str(error.value)
    assert not source[1].exists()


def _down_block_kept(data: EasyDict) -> None:
    data["ema"].unet.enc["4x4_down"].resample_mode = "keep"


def _other_latent_statistics(data: EasyDict) -> None:
    data["encoder"].args[1]["scale"] = SCALE * 2


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_down_block_kept, "its block enc.4x4_down has resample_mode='none' where dmstab's has"),
        (_other_latent_statistics, "not EDM2's ImageNet-512 statistics"),
    ],
    ids=["a block's resampling", "the latents' statistics"],
)
def test_what_dmstab_cannot_hold_is_one_line(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], change: Any, says: str
) -> None:
    data = snapshot(network(LABELS), LABELS, source[0])
    change(data)
    path = write_pickle(tmp_path / "net.pkl", data)
    with pytest.raises(DmstabError) as error:
        FORMATS["edm2"].read(path, {})
    assert says in str(error.value) and "\n" not in str(error.value)


def test_dmstab_import_writes_a_checkpoint_that_computes_what_the_original_did(
    tmp_path: Path, edm2_names: None, source: tuple[str, Path], dmstab: Runner
) -> None:
    original = network(LABELS)
    name = "network-snapshot-0000001-0.100.pkl"  # edm2's training snapshot of its σrel 0.10 EMA
    path = write_pickle(tmp_path / name, snapshot(original, LABELS, source[0]))
    result = dmstab("import", str(path), "tracking.experiment=tests")
    assert result.returncode == 0, result.stderr
    assert not source[1].exists(), "the pickled module source ran"
    (run,) = store().search_runs([store().get_experiment_by_name("tests").experiment_id])
    assert run.data.tags["dmstab.import.format"] == "edm2"
    checkpoint = Path(run.data.tags[TAG_RUN_DIR]) / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    assert state["sigma_rel"] == 0.1  # as ema-reconstruct's outputs: fid-sweep scores it
    assert state["gamma"] == pytest.approx(6.93720, abs=1e-5)  # EDM2 Eq. 3 solved for γ
    rebuilt = network_from_state(
        state, stored_recipe(state, checkpoint), use_ema=True, source=checkpoint
    )
    for ours, theirs in zip(_outputs(rebuilt, LABELS), _outputs(original, LABELS), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("name", "sigma_rel"),
    [
        ("edm2-img512-xs-uncond-2147483-0.045.pkl", 0.045),
        ("network-snapshot-0134217-0.050.pkl", 0.05),
        ("net.pkl", None),
        ("edm2-img512-xs-2147483-0.300.pkl", None),  # wider than any EMA: 1/√12 = 0.2887
    ],
)
def test_the_ema_length_is_read_from_the_name(name: str, sigma_rel: float | None) -> None:
    assert named_sigma_rel(name) == sigma_rel


def test_dmstab_import_refuses_code_in_a_pickle_in_one_line(tmp_path: Path, dmstab: Runner) -> None:
    marker = tmp_path / "pwned"
    write_pickle(Path("evil.pkl"), Payload(marker))
    line = one_line_error(dmstab("import", "evil.pkl"))
    assert "refused" in line and "posix.system" in line
    assert not marker.exists()
    assert not Path("runs").exists() and not Path("mlflow.db").exists()
