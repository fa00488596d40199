"""U-ViT's released `.pth` state dicts read into dmstab's `uvit`: a tiny reference U-ViT's weights,
read through the `uvit` format into the network its recipe tree builds, give the reference's
outputs (fixtures/README.md: built and run with baofff/U-ViT's own libs/uvit.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from dmstab.checkpoint import load_checkpoint
from dmstab.config import from_mapping
from dmstab.errors import DmstabError
from dmstab.models import build_model
from dmstab.published import FORMATS, published_format
from dmstab.published.uvit import read_uvit, recipe_tree
from dmstab.published.uvit_files import KNOWN_FILES
from dmstab.tracking import TAG_RUN_DIR
from dmstab.train.restore import network_from_state, stored_recipe
from tests.helpers import Payload, Runner, one_line_error, store

FIXTURE = Path(__file__).parent / "fixtures" / "uvit_reference.pt"
REFERENCES: dict[str, dict[str, Any]] = torch.load(FIXTURE, weights_only=True)["models"]


def released(tmp_path: Path, name: str, file_name: str = "model.pth") -> Path:
    """The reference's state dict as U-ViT saves it: float32 tensors under U-ViT's names."""
    path = tmp_path / file_name
    state = {key: value.float() for key, value in REFERENCES[name]["state_dict"].items()}
    torch.save(state, path)
    return path


def imported_network(path: Path, given: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    imported = read_uvit(path, given)
    recipe = from_mapping(imported.recipe)
    network = build_model(recipe, imported.num_classes).eval()
    network.load_state_dict(imported.weights, strict=True)
    return network, imported


@pytest.mark.parametrize("name", sorted(REFERENCES))
@torch.no_grad()
def test_imported_network_gives_the_reference_outputs(tmp_path: Path, name: str) -> None:
    reference = REFERENCES[name]
    network, _ = imported_network(
        released(tmp_path, name), {"model.num_heads": reference["config"]["num_heads"]}
    )
    # U-ViT embeds the n it is given; dmstab embeds its 0-based model time i plus
    # model.time_shift = 1 (n = i + 1), so the reference's n is dmstab's n − 1.
    out = network(reference["x"], reference["timesteps"] - 1, reference["y"])
    torch.testing.assert_close(out, reference["output"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_settings_are_read_from_the_tensors(tmp_path: Path, name: str) -> None:
    config = REFERENCES[name]["config"]
    imported = read_uvit(released(tmp_path, name), {"model.num_heads": config["num_heads"]})
    latent = config["in_chans"] == 4
    classes = config["num_classes"]
    assert imported.inferred == {
        "data.resolution": config["img_size"],
        "model.patch_size": config["patch_size"],
        "model.embed_dim": config["embed_dim"],
        "model.depth": config["depth"] + 1,  # U-ViT's depth counts in- and out-blocks
        "model.mlp_ratio": config["mlp_ratio"],
        "model.qkv_bias": config["qkv_bias"],
        "model.learn_sigma": False,
        "model.conv_out": config["conv"],
        "model.class_cond": classes > 0,
        "model.null_class": latent and classes > 0,  # the latent models' label K
    }
    assert imported.num_classes == max(classes, 0) - (latent and classes > 0)
    assert imported.recipe["data"]["name"] == ("latents" if latent else "folder")
    assert imported.recipe["model"]["time_shift"] == 1.0
    assert all(value.dtype == torch.float32 for value in imported.weights.values())
    assert imported.known is None


def test_the_format_is_registered_for_pth_files() -> None:
    uvit = published_format("uvit")
    assert FORMATS["uvit"] is uvit and uvit.suffixes == (".pth",)
    assert {known.name for known in uvit.known_files} >= {
        "imagenet512_uvit_large.pth",
        "imagenet512_uvit_huge.pth",
    }


@torch.no_grad()
def test_a_known_file_brings_its_heads_training_and_paper(tmp_path: Path) -> None:
    # the latent reference under the released U-ViT-H/4's name: 48 wide, so 16 heads divide it
    path = released(tmp_path, "latent_cond", "imagenet512_uvit_huge.pth")
    network, imported = imported_network(path, {"data.root": "my/latents"})
    tree = imported.recipe
    assert imported.known is not None and imported.known.name == path.name
    assert tree["model"]["num_heads"] == 16
    assert tree["diffusion"]["schedule"] == "scaled_linear"  # train_ldm_discrete.py
    assert tree["data"] == {
        "name": "latents",
        "root": "my/latents",
        "resolution": 8,
        "hflip": False,
    }
    assert tree["paper"]["values"] == {"500k": 4.05}
    assert tree["paper"]["source"].startswith("All are Worth Words")
    reference = REFERENCES["latent_cond"]
    assert network(reference["x"], reference["timesteps"] - 1, reference["y"]).shape == (3, 4, 8, 8)


def test_heads_are_required_and_given_settings_must_agree(tmp_path: Path) -> None:
    path = released(tmp_path, "pixel_cond")
    with pytest.raises(DmstabError, match=re.escape("give model.num_heads")):
        read_uvit(path, {})
    with pytest.raises(DmstabError, match=re.escape("data.resolution=32 disagrees with model.pth")):
        read_uvit(path, {"model.num_heads": 2, "data.resolution": 32})
    with pytest.raises(DmstabError, match=re.escape("data.name=latents disagrees")):
        read_uvit(path, {"model.num_heads": 2, "data.name": "latents"})


def test_a_state_dict_with_other_parameters_is_refused(tmp_path: Path) -> None:
    path = released(tmp_path, "pixel_cond")
    state = torch.load(path, weights_only=True)
    state["time_embed.0.weight"] = torch.ones(4, 32)
    torch.save(state, path)
    with pytest.raises(DmstabError, match="time-embedding MLP"):
        read_uvit(path, {"model.num_heads": 2})
    del state["time_embed.0.weight"]
    state["extra.weight"] = torch.ones(1)
    torch.save(state, path)
    with pytest.raises(DmstabError, match="holds parameters U-ViT's UViT has not"):
        read_uvit(path, {"model.num_heads": 2})


def test_a_pth_with_pickled_code_is_refused_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "imagenet512_uvit_huge.pth"
    torch.save({"pos_embed": Payload(marker)}, path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DmstabError) as refused:
        read_uvit(path, {"model.num_heads": 16})
    message = str(refused.value)
    assert "\n" not in message and "pickled code" in message, message
    assert not marker.exists() and sorted(tmp_path.iterdir()) == before  # nothing written


# The released models' architectures, from baofff/U-ViT configs/*.py (depth there counts in- and
# out-blocks), and their sizes in the U-ViT paper: S 44M, M 131M, L 287M, H 501M parameters.
RELEASED = {
    # file: (resolution, channels, patch, width, code depth, classes incl. null, conv, size M)
    "cifar10_uvit_small.pth": (32, 3, 2, 512, 12, 0, True, 44),
    "imagenet64_uvit_mid.pth": (64, 3, 4, 768, 16, 1000, True, 131),
    "imagenet64_uvit_large.pth": (64, 3, 4, 1024, 20, 1000, True, 287),
    "imagenet256_uvit_large.pth": (32, 4, 2, 1024, 20, 1001, True, 287),
    "imagenet256_uvit_huge.pth": (32, 4, 2, 1152, 28, 1001, False, 501),
    "imagenet512_uvit_large.pth": (64, 4, 4, 1024, 20, 1001, True, 287),
    "imagenet512_uvit_huge.pth": (64, 4, 4, 1152, 28, 1001, False, 501),
}


@pytest.mark.parametrize("known", KNOWN_FILES, ids=lambda known: known.name)
def test_every_known_file_gives_a_valid_recipe_of_the_papers_size(known: Any) -> None:
    resolution, channels, patch, width, depth, labels, conv, size = RELEASED[known.name]
    latent = channels == 4
    inferred = {
        "data.resolution": resolution,
        "model.patch_size": patch,
        "model.embed_dim": width,
        "model.depth": depth + 1,
        "model.mlp_ratio": 4.0,
        "model.qkv_bias": False,
        "model.learn_sigma": False,
        "model.conv_out": conv,
        "model.class_cond": labels > 0,
        "model.null_class": latent,
    }
    recipe = from_mapping(recipe_tree(Path(known.name), inferred, channels, {}, known))
    assert recipe.paper.values and recipe.paper.metric == "fid"
    with torch.device("meta"):
        network = build_model(recipe, labels - latent)
    assert round(sum(p.numel() for p in network.parameters()) / 1e6) == size


def test_dmstab_import_gives_the_reference_outputs_and_refuses_code(
    tmp_path: Path, dmstab: Runner
) -> None:
    name = sorted(REFERENCES)[0]
    reference = REFERENCES[name]
    heads = reference["config"]["num_heads"]
    marker = tmp_path / "pwned"
    torch.save({"pos_embed": Payload(marker)}, "evil.pth")
    line = one_line_error(dmstab("import", "evil.pth", f"model.num_heads={heads}"))
    assert "refused" in line and not marker.exists() and not Path("runs").exists()
    path = released(tmp_path, name)
    result = dmstab("import", str(path), f"model.num_heads={heads}", "tracking.experiment=tests")
    assert result.returncode == 0, result.stderr
    (run,) = store().search_runs([store().get_experiment_by_name("tests").experiment_id])
    checkpoint = Path(run.data.tags[TAG_RUN_DIR]) / "checkpoint.pt"
    state = load_checkpoint(checkpoint)
    network = network_from_state(
        state, stored_recipe(state, checkpoint), use_ema=True, source=checkpoint
    )
    with torch.no_grad():
        out = network(reference["x"], reference["timesteps"] - 1, reference["y"])
    torch.testing.assert_close(out, reference["output"], atol=1e-5, rtol=0)
