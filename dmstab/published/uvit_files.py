"""The checkpoints released with U-ViT (baofff/U-ViT README, "Pretrained Models"), and how each
was trained (its configs/*.py and train script), as dmstab recipe settings.

What dmstab's DDPM engine writes differently from the authors' runs:
- schedule: the continuous VP SDE (β from 0.1 to 20; train.py, train_ldm.py) is the DDPM
  `linear` schedule, T = 1000, of which it is the limit; the discrete models (train_ldm_discrete.py,
  the U-ViT-H latent models) use Stable Diffusion's β, `scaled_linear`, exactly;
- sampler: 50 DPM-Solver steps (ImageNet) become 50 DDIM steps; 1000 Euler–Maruyama steps of the
  reverse SDE (CIFAR-10) 1000 DDPM steps;
- classifier-free guidance: U-ViT's ε = ε_c + s·(ε_c − ε_∅) is EDM2's form with w = 1 + s. dmstab
  refuses `sample.guide: self` for DDPM recipes, so these recipes sample without guidance; the
  network has the null class (`model.null_class`) that guidance would use;
- latents: U-ViT feeds its network SD-VAE latents × 0.18215 of images in [−1, 1] (encoder of
  Stable Diffusion's kl-f8 VAE; decoder autoencoder_kl.pth for L, autoencoder_kl_ema.pth, the
  ft-EMA decoder, for H); dmstab's `latents` data are sd-vae-ft-mse latents normalised with
  EDM2's statistics, so latent samples decode correctly only from latents scaled as U-ViT's.
"""

from __future__ import annotations

import json
from typing import Any

from dmstab.published.format import KnownFile

U_VIT_PAPER = "All are Worth Words: A ViT Backbone for Diffusion Models (Bao et al., CVPR 2023)"
README = "https://github.com/baofff/U-ViT#pretrained-models"
LATENT_SCALE = 0.18215  # U-ViT's (Stable Diffusion's) latent scale factor


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view?usp=share_link"


def _settings(**sections: dict[str, Any]) -> tuple[str, ...]:
    """{section: {key: value}} as `section.key=value` overrides (values written as JSON)."""
    return tuple(
        f"{section}.{key}={json.dumps(value)}"
        for section, keys in sections.items()
        for key, value in keys.items()
    )


def _imagenet(
    *,
    heads: int,
    schedule: str,
    lr: float,
    steps: int,
    fid: float,
    data: dict[str, Any],
    guidance: str,
) -> tuple[str, ...]:
    """The shared ImageNet setup: AdamW β (0.99, 0.99), weight decay 0.03, 5000 warm-up steps,
    batch 1024, EMA 0.9999, 50 DPM-Solver steps (here DDIM)."""
    return _settings(
        model={"num_heads": heads},
        data={"hflip": False, **data},
        diffusion={"schedule": schedule, "steps": 1000, "target": "eps"},
        optim={
            "name": "adamw",
            "lr": lr,
            "betas": [0.99, 0.99],
            "weight_decay": 0.03,
            "warmup_steps": 5000,
        },
        ema={"rate": 0.9999},
        train={"steps": steps, "batch_size": 1024},
        sample={"sampler": "ddim", "steps": 50, "clip_denoised": False},
        paper={
            "source": U_VIT_PAPER,
            "table": README,
            "metric": "fid",
            "values": {f"{steps // 1000}k": fid},
            "notes": f"50k samples, 50 DPM-Solver steps; {guidance}",
        },
    )


def _latent_data(resolution: int) -> dict[str, Any]:
    return {"name": "latents", "root": f"data/imagenet{resolution}_latents"}


def _guided(resolution: int, size: str, scale: float, p_uncond: float) -> str:
    return (
        f"classifier-free guidance scale {scale} (w = {1 + scale} here), labels dropped with "
        f"p {p_uncond} in training; SD-VAE latents x {LATENT_SCALE}, {resolution}x{resolution} "
        f"images; U-ViT-{size}"
    )


IMAGENET64 = {"name": "folder", "root": "data/imagenet64"}
UNGUIDED = "no guidance; ImageNet 64x64 pixels, 1000 classes"

KNOWN_FILES = (
    KnownFile(
        name="cifar10_uvit_small.pth",
        url=_drive("1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-"),
        overrides=_settings(
            model={"num_heads": 8},
            data={"name": "cifar10", "root": "data/cifar10", "hflip": True},
            diffusion={"schedule": "linear", "steps": 1000, "target": "eps"},
            optim={
                "name": "adamw",
                "lr": 2.0e-4,
                "betas": [0.99, 0.999],
                "weight_decay": 0.03,
                "warmup_steps": 2500,
            },
            ema={"rate": 0.9999},
            train={"steps": 500_000, "batch_size": 128},
            sample={"sampler": "ddpm", "steps": 1000, "clip_denoised": False},
            paper={
                "source": U_VIT_PAPER,
                "table": README,
                "metric": "fid",
                "values": {"500k": 3.11},
                "notes": "50k samples, 1000 Euler-Maruyama steps of the VP SDE; unconditional",
            },
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-S/2, CIFAR-10 32x32, unconditional, 44M parameters (FID 3.11)",
    ),
    KnownFile(
        name="imagenet64_uvit_mid.pth",
        url=_drive("1igVgRY7-A0ZV3XqdNcMGOnIGOxKr9azv"),
        overrides=_imagenet(
            heads=12,
            schedule="linear",
            lr=3.0e-4,
            steps=300_000,
            fid=5.85,
            data=IMAGENET64,
            guidance=UNGUIDED,
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-M/4, ImageNet 64x64, class-conditional, 131M parameters (FID 5.85)",
    ),
    KnownFile(
        name="imagenet64_uvit_large.pth",
        url=_drive("19rmun-T7RwkNC1feEPWinIo-1JynpW7J"),
        overrides=_imagenet(
            heads=16,
            schedule="linear",
            lr=3.0e-4,
            steps=300_000,
            fid=4.26,
            data=IMAGENET64,
            guidance=UNGUIDED,
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-L/4, ImageNet 64x64, class-conditional, 287M parameters (FID 4.26)",
    ),
    KnownFile(
        name="imagenet256_uvit_large.pth",
        url=_drive("1w7T1hiwKODgkYyMH9Nc9JNUThbxFZgs3"),
        overrides=_imagenet(
            heads=16,
            schedule="linear",
            lr=2.0e-4,
            steps=300_000,
            fid=3.40,
            data=_latent_data(256),
            guidance=_guided(256, "L/2", 0.4, 0.15),
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-L/2, ImageNet 256x256 (32x32x4 SD-VAE latents), guided FID 3.40",
    ),
    KnownFile(
        name="imagenet256_uvit_huge.pth",
        url=_drive("13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u"),
        overrides=_imagenet(
            heads=16,
            schedule="scaled_linear",
            lr=2.0e-4,
            steps=500_000,
            fid=2.29,
            data=_latent_data(256),
            guidance=_guided(256, "H/2", 0.4, 0.1),
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-H/2, ImageNet 256x256 (32x32x4 SD-VAE latents), guided FID 2.29",
    ),
    KnownFile(
        name="imagenet512_uvit_large.pth",
        url=_drive("1mkj4aN2utHMBTWQX9l1nYue9vleL7ZSB"),
        overrides=_imagenet(
            heads=16,
            schedule="linear",
            lr=2.0e-4,
            steps=500_000,
            fid=4.67,
            data=_latent_data(512),
            guidance=_guided(512, "L/4", 0.7, 0.15),
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-L/4, ImageNet 512x512 (64x64x4 SD-VAE latents), guided FID 4.67",
    ),
    KnownFile(
        name="imagenet512_uvit_huge.pth",
        url=_drive("1uegr2o7cuKXtf2akWGAN2Vnlrtw5YKQq"),
        overrides=_imagenet(
            heads=16,
            schedule="scaled_linear",
            lr=2.0e-4,
            steps=500_000,
            fid=4.05,
            data=_latent_data(512),
            guidance=_guided(512, "H/4", 0.7, 0.1),
        ),
        paper=U_VIT_PAPER,
        description="U-ViT-H/4, ImageNet 512x512 (64x64x4 SD-VAE latents), guided FID 4.05",
    ),
)
