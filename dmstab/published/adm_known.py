"""The improved-diffusion and guided-diffusion checkpoints OpenAI released, by file name.

Each one's overrides hold what its file cannot tell (the `MODEL_FLAGS` / `DIFFUSION_FLAGS` of
the repository's README: resolution, heads, attention order, dropout, schedule, steps) and how
it was trained (its paper's batch size, learning rate and iterations; EMA 0.9999 and Adam as
both codebases default; guided-diffusion flips images at random, improved-diffusion does not).
Sources: openai/improved-diffusion README (commit 1bc7bbb), openai/guided-diffusion README
(commit 22e0df8), Nichol & Dhariwal 2021 and Dhariwal & Nichol 2021 (Appendix, hyper-parameter
tables).

Left out, because dmstab's DDPM could not run them as trained: improved-diffusion's `L_vlb`
models (`*_vlb_*.pt`, trained on the VB alone), its class-conditional ImageNet-64 model
(`--rescale_timesteps False` at T = 4000: dmstab feeds the network t·1000/T) and the
super-resolution models (6 input channels).
"""

from __future__ import annotations

from dmstab.published.format import KnownFile

IDDPM = "Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, ICML 2021)"
ADM = "Diffusion Models Beat GANs on Image Synthesis (Dhariwal & Nichol, NeurIPS 2021)"
IDDPM_URL = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"
ADM_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"

_TRAINING = ("ema.rate=0.9999", "optim.name=adam", "sample.sampler=ddpm", "sample.steps=250")
# improved-diffusion: the model flags default to 4 heads, attention at 16 and 8 pixels, its
# QKVAttention splits qkv as (heads, 3, C/heads) ("legacy"), and hybrid loss with learned Σ.
_IDDPM = (*_TRAINING, "model.num_heads=4", "model.attention_order=legacy", "data.hflip=false")
_IMAGENET = ("data.name=folder", "data.root=data/imagenet/train", "data.hflip=true")
# guided-diffusion's 256x256 and 512x512 flags (both classifier-guided and unconditional).
_ADM_LARGE = (
    *_TRAINING,
    "model.num_head_channels=64",
    "model.attention_order=legacy",
    "model.dropout=0.0",
    "diffusion.schedule=linear",
    "diffusion.steps=1000",
    "optim.lr=1e-4",
    "train.batch_size=256",
)

KNOWN_FILES = (
    KnownFile(
        name="cifar10_uncond_50M_500K.pt",
        url=IDDPM_URL + "cifar10_uncond_50M_500K.pt",
        overrides=(
            *_IDDPM,
            "data.name=cifar10",
            "data.root=data/cifar10",
            "data.resolution=32",
            "model.dropout=0.3",
            "diffusion.schedule=cosine",
            "diffusion.steps=4000",
            "optim.lr=1e-4",
            "train.batch_size=128",
            "train.steps=500000",
        ),
        paper=IDDPM,
        description="unconditional CIFAR-10, L_hybrid, cosine schedule (the AAAI paper's ID)",
    ),
    KnownFile(
        name="imagenet64_uncond_100M_1500K.pt",
        url=IDDPM_URL + "imagenet64_uncond_100M_1500K.pt",
        overrides=(
            *_IDDPM,
            "data.name=folder",
            "data.root=data/imagenet64/train",
            "data.resolution=64",
            "model.dropout=0.0",
            "diffusion.schedule=cosine",
            "diffusion.steps=4000",
            "optim.lr=1e-4",
            "train.batch_size=128",
            "train.steps=1500000",
        ),
        paper=IDDPM,
        description="unconditional ImageNet-64, L_hybrid, cosine schedule",
    ),
    KnownFile(
        name="64x64_diffusion.pt",
        url=ADM_URL + "64x64_diffusion.pt",
        overrides=(
            *_TRAINING,
            *_IMAGENET,
            "data.resolution=64",
            "model.num_head_channels=64",
            "model.attention_order=qkv_first",  # --use_new_attention_order True
            "model.dropout=0.1",
            "diffusion.schedule=cosine",
            "diffusion.steps=1000",
            "optim.lr=3e-4",
            "train.batch_size=2048",
            "train.steps=540000",
        ),
        paper=ADM,
        description="class-conditional ImageNet 64x64 (ADM)",
    ),
    KnownFile(
        name="128x128_diffusion.pt",
        url=ADM_URL + "128x128_diffusion.pt",
        overrides=(
            *_TRAINING,
            *_IMAGENET,
            "data.resolution=128",
            "model.num_heads=4",
            "model.attention_order=legacy",
            "model.dropout=0.0",
            "diffusion.schedule=linear",
            "diffusion.steps=1000",
            "optim.lr=1e-4",
            "train.batch_size=256",
            "train.steps=4360000",
        ),
        paper=ADM,
        description="class-conditional ImageNet 128x128 (ADM; the AAAI paper's GD)",
    ),
    KnownFile(
        name="256x256_diffusion.pt",
        url=ADM_URL + "256x256_diffusion.pt",
        overrides=(*_ADM_LARGE, *_IMAGENET, "data.resolution=256", "train.steps=1980000"),
        paper=ADM,
        description="class-conditional ImageNet 256x256 (ADM)",
    ),
    KnownFile(
        name="256x256_diffusion_uncond.pt",
        url=ADM_URL + "256x256_diffusion_uncond.pt",
        # the paper's tables give no iteration count for this model: train.steps is not set
        overrides=(*_ADM_LARGE, *_IMAGENET, "data.resolution=256"),
        paper=ADM,
        description="unconditional ImageNet 256x256 (ADM)",
    ),
    KnownFile(
        name="512x512_diffusion.pt",
        url=ADM_URL + "512x512_diffusion.pt",
        overrides=(*_ADM_LARGE, *_IMAGENET, "data.resolution=512", "train.steps=1940000"),
        paper=ADM,
        description="class-conditional ImageNet 512x512 (ADM; trained in float32)",
    ),
)
