"""Bad recipes and overrides through the real `dmstab train`: exit 2, exactly one line naming
the key or file, and nothing written (no MLflow store, no run directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import RECIPES, cli, one_line_error

from . import counts

QUICKSTART = str(RECIPES / "quickstart.yaml")
EDM = str(RECIPES / "edm2_mini.yaml")
DCGAN = str(RECIPES / "mini_dcgan.yaml")
BIGGAN = str(RECIPES / "mini_biggan.yaml")

BAD_OVERRIDES = [
    # wrong types
    ([QUICKSTART, "optim.lr=fast"], "'optim.lr' is 'fast'; expected float"),
    ([QUICKSTART, "train.steps=1.5"], "'train.steps' is 1.5; expected int"),
    ([QUICKSTART, "train.batch_size=true"], "'train.batch_size' is True; expected int"),
    ([QUICKSTART, "model.channel_mult=3"], "'model.channel_mult' is 3"),
    ([QUICKSTART, "model.channel_mult=[1,x]"], "'model.channel_mult[1]' is 'x'"),
    ([QUICKSTART, "optim.betas=[0.9]"], "'optim.betas' is [0.9]; expected list of 2 float"),
    ([QUICKSTART, "train=5"], "recipe key 'train' must be a mapping"),
    ([QUICKSTART, "ema.power_sigma_rels=0.1"], "'ema.power_sigma_rels' is 0.1"),
    ([QUICKSTART, "train.precision=fp16"], "'train.precision' is 'fp16'; allowed: 'fp32' | 'bf16'"),
    ([QUICKSTART, "train.device=tpu"], "'train.device' is 'tpu'"),
    (
        [QUICKSTART, "model.attention_order=heads_first"],
        "'model.attention_order' is 'heads_first'; allowed: 'legacy' | 'qkv_first'",
    ),
    ([QUICKSTART, "timesteps.sampler=bogus"], "timesteps.sampler 'bogus' is not registered"),
    # out of range
    ([QUICKSTART, "optim.lr=-1"], "optim.lr is -1.0; must be positive"),
    ([QUICKSTART, "optim.lr=0"], "optim.lr is 0.0; must be positive"),
    ([QUICKSTART, "optim.betas=[0.9,1.5]"], "optim.betas [0.9, 1.5] must be in [0,1)"),
    ([QUICKSTART, "train.steps=0"], "train.steps must be at least 1"),
    ([QUICKSTART, "train.kimg=-1"], "train.kimg is -1.0; must be >= 0"),
    ([QUICKSTART, "ema.rate=1.0"], "ema.rate is 1.0; must be in [0, 1)"),
    ([QUICKSTART, "data.resolution=4"], "data.resolution is 4; must be at least 8"),
    ([QUICKSTART, "sample.steps=5000"], "sample.steps is 5000; must be in [2, diffusion.steps"),
    ([QUICKSTART, "sample.steps=1"], "sample.steps is 1; must be in [2, diffusion.steps=1000]"),
    (
        [QUICKSTART, "sample.steps=300"],  # ddim's integer strides of 1000 give 250 or 334 steps
        "sample.steps=300 for sampler ddim: no integer stride gives exactly 300 of 1000 steps; "
        "the nearest counts one gives are 250 and 334",
    ),
    (
        [QUICKSTART, "sample.sampler=ddpm", "sample.eta=0.5"],
        "sample.eta=0.5 is DDIM's η, which sample.sampler ddpm does not take",
    ),
    ([QUICKSTART, "sample.num_images=0"], "sample.num_images/batch_size must be >= 1"),
    (
        [QUICKSTART, "sample.sections=400,600", "sample.steps=1000"],
        "sample.sections=[400, 600]: section 2 spans 500 of the 1000 steps, so it keeps 1 … 500",
    ),
    ([QUICKSTART, "tracking.flush_every=0"], "tracking.flush_every must be at least 1"),
    ([QUICKSTART, "eval.at=[0]"], "eval.at [0] must be steps >= 1"),
    ([QUICKSTART, "ema.power_sigma_rels=[0.5]"], "ema.power_sigma_rels [0.5] must lie in (0,"),
    ([QUICKSTART, "diffusion.min_snr_gamma=0"], "diffusion.min_snr_gamma is 0.0; must be > 0"),
    # unknown keys and sections
    ([QUICKSTART, "optim.lrr=1e-4"], "unknown recipe key 'optim.lrr'; did you mean 'optim.lr'"),
    ([QUICKSTART, "optimizer.lr=1e-4"], "unknown recipe key 'optimizer'"),
    ([QUICKSTART, "model.edm2.nope=1"], "unknown recipe key 'model.edm2'; model.name adm_unet"),
    ([EDM, "model.edm2.nope=1"], "unknown recipe key 'model.edm2.nope'"),
    # the EDM2 UNet's own checks name the recipe keys, not its constructor's arguments
    ([EDM, "model.edm2.res_balance=1.5"], "model.edm2.res_balance=1.5 must be in [0, 1]"),
    (
        [EDM, "model.edm2.channels_per_head=48"],
        "attention over 64 channels: model.edm2.channels_per_head=48 must divide it",
    ),
    (
        [EDM, "model.edm2.no_group_norm=false"],
        "model.edm2.mp_fixed_layers=true needs model.edm2.no_group_norm=true",
    ),
    # contradictory options
    ([QUICKSTART, "timesteps.mu=1000"], "timesteps.mu is 1000.0; must be in [0, diffusion.steps)"),
    ([QUICKSTART, "timesteps.mu=-1"], "timesteps.mu is -1.0; must be in [0, diffusion.steps)"),
    (
        [QUICKSTART, "sample.sampler=heun"],
        "sample.sampler heun samples diffusion.formulation edm models; this recipe's is ddpm",
    ),
    ([QUICKSTART, "diffusion.formulation=edm"], "model.name adm_unet trains with diffusion."),
    (
        [EDM, "sample.sampler=ddim"],
        "sample.sampler ddim samples diffusion.formulation ddpm models; this recipe's is edm",
    ),
    ([EDM, "diffusion.target=x0"], "diffusion.target x0 is a ddpm option"),
    ([EDM, "diffusion.target=previous_x"], "diffusion.target previous_x is a ddpm option"),
    (
        [QUICKSTART, "diffusion.target=previous_x"],  # quickstart samples DDIM-50 of 1000 steps
        "sample.steps is 50; diffusion.target previous_x predicts the mean of one step of the "
        "1000-step chain, so it samples only with sample.steps=1000",
    ),
    ([QUICKSTART, "train.kimg=1", "train.steps=5"], "set train.steps or train.kimg, not both"),
    # both written, whatever the values: a file's steps, an override's kimg; train.steps equal
    # to its default (500000) beside the file's kimg, which compared with the default let through
    ([QUICKSTART, "train.kimg=1"], "train.steps=1000 and train.kimg=1 are both written"),
    ([EDM, "train.steps=500000"], "train.steps=500000 and train.kimg=57.6 are both written"),
    ([QUICKSTART, "sample.guidance=2"], "sample.guidance != 1 needs sample.guide"),
    (
        [QUICKSTART, "diffusion.label_dropout=0.5"],
        "diffusion.label_dropout (classifier-free guidance) needs diffusion.formulation edm",
    ),
    (
        [QUICKSTART, "eval.every=5", "eval.features=classifier", "data.name=npz", "data.root=x"],
        "eval.features: classifier knows the synthetic shapes only",
    ),
    (
        [QUICKSTART, "optim.ref_kimg=1"],
        "optim.ref_kimg/rampup_kimg belong to optim.schedule inverse_sqrt",
    ),
    (
        [QUICKSTART, "eval.every=5", "eval.features=inception", "eval.inception_weights=no.pt"],
        "no.pt",
    ),
    (
        [QUICKSTART, "eval.every=5", "eval.features=random_conv", "eval.reference=nothere.npz"],
        "nothere.npz",
    ),
    # GANs and the analysis sections
    ([DCGAN, "model.class_cond=true"], "DCGAN is unconditional"),
    ([DCGAN, "data.resolution=24"], "DCGAN needs data.resolution a power of two >= 16"),
    (
        [DCGAN, "model.d_steps=0"],
        "model.z_dim, g_channels, d_channels and d_steps must be at least 1",
    ),
    ([DCGAN, "model.loss=wasserstein"], "'model.loss' is 'wasserstein'"),
    ([DCGAN, "train.nonfinite=skip"], "train.nonfinite: skip is for diffusion models"),
    ([BIGGAN, "model.z_dim=63"], "model.z_dim 63 must split into 4 equal chunks"),
    ([BIGGAN, "model.attention_resolution=12"], "model.attention_resolution is 12"),
    ([QUICKSTART, "train.keep_checkpoints=[0]"], "train.keep_checkpoints [0] must be steps"),
    ([QUICKSTART, "landscape.points=1"], "landscape.points is 1; must be at least 2"),
    ([QUICKSTART, "hessian.timesteps=[1000]"], "hessian.timesteps [1000] must lie in [0,"),
    (
        [QUICKSTART, "consistency.samplers=[heun]"],
        "consistency.samplers.sampler heun samples diffusion.formulation edm models",
    ),
    # data that is not there
    ([QUICKSTART, "data.name=folder"], "data.root is required for data.name='folder'"),
    ([QUICKSTART, "data.name=folder", "data.root=does/not/exist"], "does/not/exist"),
    ([QUICKSTART, "data.name=cifar10", "data.root=nowhere"], "CIFAR-10 not found"),
    # malformed overrides
    ([QUICKSTART, "optim.lr"], "override 'optim.lr' must look like section.key=value"),
    ([QUICKSTART, "optim.betas=[0.9,"], "override 'optim.betas=[0.9,': value"),
    ([QUICKSTART, "optim..lr=1"], "override 'optim..lr=1' must look like"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_OVERRIDES, ids=lambda v: " ".join(v[1:]))
def test_bad_override_is_one_line_exit_2_nothing_written(args: list[str], expected: str) -> None:
    _refused(["train", *args], expected)


BAD_FILES = {
    "malformed YAML": ("optim: {lr: [1e-4\n", "is not valid YAML: expected ',' or ']'"),
    "unclosed bracket": (  # PyYAML gives up on line 3; the bracket opened on line 2
        "optim:\n  betas: [0.9, 0.99\ntrain:\n  steps: 10\n",
        "bad.yaml line 3 is not valid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence that starts on line 2)",
    ),
    "unclosed quote": (
        'name: "x\ntrain:\n  steps: 10\n',
        "(while scanning a quoted scalar that starts on line 1)",
    ),
    "empty file": ("", "is empty"),
    "a list, not sections": ("- optim\n- train\n", "must be a YAML mapping of sections"),
    "unknown section": ("optimiser: {lr: 1.0e-4}\n", "unknown recipe key 'optimiser'"),
    "wrong type in a file": ("train: {steps: many}\n", "'train.steps' is 'many'"),
    "base not a path": ("base: [a, b]\n", "`base:` must be a file path"),
    "missing base": ("base: nowhere.yaml\n", "nowhere.yaml"),
    "base cycle": ("base: bad.yaml\n", "a cycle"),
    "sweep child with steps and kimg": (
        f"base: {EDM}\nsweep:\n  grid:\n    train.steps: [500000]\n",
        "sweep child 'train.steps=500000': set train.steps or train.kimg, not both",
    ),
    "not text": (b"\xff\xfe\x00garbage\x80", "not a readable UTF-8 text (UnicodeDecodeError)"),
}


@pytest.mark.parametrize(("content", "expected"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_recipe_file_is_one_line_exit_2_nothing_written(
    content: str | bytes, expected: str
) -> None:
    path = Path("bad.yaml")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert expected in _refused(["train", str(path)], expected)


def test_directory_or_missing_recipe_is_one_line_exit_2() -> None:
    Path("recipes.d").mkdir()
    assert "recipes.d" in _refused(["train", "recipes.d"], "is a directory, not a file")
    _refused(["train", "missing.yaml"], "recipe file not found: missing.yaml")


def _refused(args: list[str], expected: str) -> str:
    line = one_line_error(cli(*args))
    written = [p for p in ("mlflow.db", "runs", "mlruns", "samples") if Path(p).exists()]
    counts.record(trials=1, faults=1, losses=len(written))
    assert expected in line, line
    assert not written, f"a refused recipe wrote {written}"
    return line
