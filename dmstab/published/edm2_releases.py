"""The network pickles NVlabs/edm2 released, and how its `generate_images.py` presets use them.

Each file is an EMA reconstructed post hoc (EDM2 Sec. 3), named
`edm2-<dataset>-<size>[-uncond]-<thousands of training images, 7 digits>-<σrel>.pkl`. A preset
samples one network, or one guided by a second (`guide`) at `guidance` w:
D = D_guide + w·(D − D_guide) (EDM2 Sec. 5 with an unconditional XS guide; autoguidance with a
smaller, shorter-trained one).
To sample a guided preset in dmstab, import both files and set `sample.guide=<the guide's
checkpoint> sample.guidance=<w>` on the main one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmstab.config import SIGMA_REL_MAX
from dmstab.published.format import KnownFile

URL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
EDM2_PAPER = (
    "Karras et al., Analyzing and Improving the Training Dynamics of Diffusion Models, CVPR 2024"
)
AUTOGUIDANCE_PAPER = (
    "Karras et al., Guiding a Diffusion Model with a Bad Version of Itself, NeurIPS 2024"
)
METRIC_NAMES = {"fid": "FID", "dino": "FD_DINOv2"}
NAMED_SIGMA_REL = re.compile(r"-(\d+\.\d+)\.pkl$")  # `...-0.135.pkl`


def named_sigma_rel(name: str) -> float | None:
    """The EMA length σrel a pickle's name gives: the released reconstructions end in
    `-<σrel>.pkl`, as do the power-EMA snapshots edm2's training writes
    (`network-snapshot-<kimg>-<σrel>.pkl`); None for a name without one in (0, 1/√12]."""
    match = NAMED_SIGMA_REL.search(name)
    sigma_rel = float(match.group(1)) if match else None
    return sigma_rel if sigma_rel is not None and 0 < sigma_rel <= SIGMA_REL_MAX else None


@dataclass(frozen=True)
class Preset:
    """One of `generate_images.py`'s presets: its network, its guide and w, and the paper's
    score for it (FID or FD_DINOv2 on 50k images)."""

    name: str
    net: str
    score: float
    guide: str | None = None
    guidance: float = 1.0

    @property
    def metric(self) -> str:
        return METRIC_NAMES[self.name.rsplit("-", 1)[1]]

    @property
    def paper(self) -> str:
        return AUTOGUIDANCE_PAPER if "autog" in self.name else EDM2_PAPER


PRESETS = (
    # EDM2 Table 2 (ImageNet-512, FID) and Table 5 (FD_DINOv2), no guidance
    Preset("edm2-img512-xs-fid", "edm2-img512-xs-2147483-0.135.pkl", 3.53),
    Preset("edm2-img512-xs-dino", "edm2-img512-xs-2147483-0.200.pkl", 103.39),
    Preset("edm2-img512-s-fid", "edm2-img512-s-2147483-0.130.pkl", 2.56),
    Preset("edm2-img512-s-dino", "edm2-img512-s-2147483-0.190.pkl", 68.64),
    Preset("edm2-img512-m-fid", "edm2-img512-m-2147483-0.100.pkl", 2.25),
    Preset("edm2-img512-m-dino", "edm2-img512-m-2147483-0.155.pkl", 58.44),
    Preset("edm2-img512-l-fid", "edm2-img512-l-1879048-0.085.pkl", 2.06),
    Preset("edm2-img512-l-dino", "edm2-img512-l-1879048-0.155.pkl", 52.25),
    Preset("edm2-img512-xl-fid", "edm2-img512-xl-1342177-0.085.pkl", 1.96),
    Preset("edm2-img512-xl-dino", "edm2-img512-xl-1342177-0.155.pkl", 45.96),
    Preset("edm2-img512-xxl-fid", "edm2-img512-xxl-0939524-0.070.pkl", 1.91),
    Preset("edm2-img512-xxl-dino", "edm2-img512-xxl-0939524-0.150.pkl", 42.84),
    # EDM2 Table 3 (ImageNet-64, FID)
    Preset("edm2-img64-s-fid", "edm2-img64-s-1073741-0.075.pkl", 1.58),
    Preset("edm2-img64-m-fid", "edm2-img64-m-2147483-0.060.pkl", 1.43),
    Preset("edm2-img64-l-fid", "edm2-img64-l-1073741-0.040.pkl", 1.33),
    Preset("edm2-img64-xl-fid", "edm2-img64-xl-0671088-0.040.pkl", 1.33),
    # EDM2 Tables 2 and 5 with guidance by an unconditional XS model (Sec. 5)
    Preset(
        "edm2-img512-xs-guid-fid",
        "edm2-img512-xs-2147483-0.045.pkl",
        2.91,
        "edm2-img512-xs-uncond-2147483-0.045.pkl",
        1.40,
    ),
    Preset(
        "edm2-img512-xs-guid-dino",
        "edm2-img512-xs-2147483-0.150.pkl",
        79.94,
        "edm2-img512-xs-uncond-2147483-0.150.pkl",
        1.70,
    ),
    Preset(
        "edm2-img512-s-guid-fid",
        "edm2-img512-s-2147483-0.025.pkl",
        2.23,
        "edm2-img512-xs-uncond-2147483-0.025.pkl",
        1.40,
    ),
    Preset(
        "edm2-img512-s-guid-dino",
        "edm2-img512-s-2147483-0.085.pkl",
        52.32,
        "edm2-img512-xs-uncond-2147483-0.085.pkl",
        1.90,
    ),
    Preset(
        "edm2-img512-m-guid-fid",
        "edm2-img512-m-2147483-0.030.pkl",
        2.01,
        "edm2-img512-xs-uncond-2147483-0.030.pkl",
        1.20,
    ),
    Preset(
        "edm2-img512-m-guid-dino",
        "edm2-img512-m-2147483-0.015.pkl",
        41.98,
        "edm2-img512-xs-uncond-2147483-0.015.pkl",
        2.00,
    ),
    Preset(
        "edm2-img512-l-guid-fid",
        "edm2-img512-l-1879048-0.015.pkl",
        1.88,
        "edm2-img512-xs-uncond-2147483-0.015.pkl",
        1.20,
    ),
    Preset(
        "edm2-img512-l-guid-dino",
        "edm2-img512-l-1879048-0.035.pkl",
        38.2,
        "edm2-img512-xs-uncond-2147483-0.035.pkl",
        1.70,
    ),
    Preset(
        "edm2-img512-xl-guid-fid",
        "edm2-img512-xl-1342177-0.020.pkl",
        1.85,
        "edm2-img512-xs-uncond-2147483-0.020.pkl",
        1.20,
    ),
    Preset(
        "edm2-img512-xl-guid-dino",
        "edm2-img512-xl-1342177-0.030.pkl",
        35.67,
        "edm2-img512-xs-uncond-2147483-0.030.pkl",
        1.70,
    ),
    Preset(
        "edm2-img512-xxl-guid-fid",
        "edm2-img512-xxl-0939524-0.015.pkl",
        1.81,
        "edm2-img512-xs-uncond-2147483-0.015.pkl",
        1.20,
    ),
    Preset(
        "edm2-img512-xxl-guid-dino",
        "edm2-img512-xxl-0939524-0.015.pkl",
        33.09,
        "edm2-img512-xs-uncond-2147483-0.015.pkl",
        1.70,
    ),
    # Autoguidance (Karras et al. 2024, Table 1): a smaller, shorter-trained guide
    Preset(
        "edm2-img512-s-autog-fid",
        "edm2-img512-s-2147483-0.070.pkl",
        1.34,
        "edm2-img512-xs-0134217-0.125.pkl",
        2.10,
    ),
    Preset(
        "edm2-img512-s-autog-dino",
        "edm2-img512-s-2147483-0.120.pkl",
        36.67,
        "edm2-img512-xs-0134217-0.165.pkl",
        2.45,
    ),
    Preset(
        "edm2-img512-xxl-autog-fid",
        "edm2-img512-xxl-0939524-0.075.pkl",
        1.25,
        "edm2-img512-m-0268435-0.155.pkl",
        2.05,
    ),
    Preset(
        "edm2-img512-xxl-autog-dino",
        "edm2-img512-xxl-0939524-0.130.pkl",
        24.18,
        "edm2-img512-m-0268435-0.205.pkl",
        2.30,
    ),
    Preset(
        "edm2-img512-s-uncond-autog-fid",
        "edm2-img512-s-uncond-2147483-0.070.pkl",
        3.86,
        "edm2-img512-xs-uncond-0134217-0.110.pkl",
        2.85,
    ),
    Preset(
        "edm2-img512-s-uncond-autog-dino",
        "edm2-img512-s-uncond-2147483-0.090.pkl",
        90.39,
        "edm2-img512-xs-uncond-0134217-0.125.pkl",
        2.90,
    ),
    Preset(
        "edm2-img64-s-autog-fid",
        "edm2-img64-s-1073741-0.045.pkl",
        1.01,
        "edm2-img64-xs-0134217-0.110.pkl",
        1.70,
    ),
    Preset(
        "edm2-img64-s-autog-dino",
        "edm2-img64-s-1073741-0.105.pkl",
        31.85,
        "edm2-img64-xs-0134217-0.175.pkl",
        2.20,
    ),
)


def _network(file: str) -> str:
    """`edm2-img512-xs-uncond-2147483-0.045.pkl` -> 'EDM2-XS ImageNet-512 unconditional, ...'."""
    _, dataset, size, *rest = file.removesuffix(".pkl").split("-")
    *kind, kimg, sigma_rel = rest
    data = {"img512": "ImageNet-512 (SD-VAE latents)", "img64": "ImageNet-64 (pixels)"}[dataset]
    cond = "unconditional" if kind == ["uncond"] else "class-conditional"
    return (
        f"EDM2-{size.upper()} {data}, {cond}, trained on {int(kimg) / 1000:.1f}M images, "
        f"post-hoc EMA σrel {sigma_rel}"
    )


def _use(preset: Preset, file: str) -> str:
    score = f"{preset.metric} {preset.score}"
    if preset.guide is None:
        return f"{preset.name}: {score}"
    if file == preset.guide:
        return f"{preset.name}: guide of {preset.net} at guidance {preset.guidance}, {score}"
    return f"{preset.name}: guided by {preset.guide} at guidance {preset.guidance}, {score}"


def known_files() -> tuple[KnownFile, ...]:
    """Every file the presets name, once, with each preset it takes part in."""
    uses: dict[str, list[Preset]] = {}
    for preset in PRESETS:
        for file in (preset.net, preset.guide):
            if file is not None:
                uses.setdefault(file, []).append(preset)
    return tuple(
        KnownFile(
            name=file,
            url=f"{URL_ROOT}/{file}",
            overrides=(),  # the pickle holds every setting of the network
            paper="; ".join(dict.fromkeys(preset.paper for preset in presets)),
            description=f"{_network(file)}. " + "; ".join(_use(preset, file) for preset in presets),
        )
        for file, presets in uses.items()
    )
