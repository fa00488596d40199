"""clean-fid's image preprocessing, batched in torch on any device.

clean-fid's `clean` mode resizes each channel of a uint8 image to 299x299 as a float32 PIL
image (mode "F") with PIL's bicubic filter, then clips to [0, 255]
(`make_resizer("PIL", False, "bicubic", (299, 299))`). PIL resamples separably, the width
first, with float64 coefficients and float64 sums, storing each pass as float32. Here each
pass is one float64 matmul with PIL's coefficient matrix, rounded to float32 like PIL's
intermediate, so the result matches PIL's up to float64 summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from dmstab.errors import DmstabError

FidMode = Literal["clean", "legacy_pytorch", "legacy_tensorflow"]
FID_MODES: tuple[str, ...] = get_args(FidMode)
INCEPTION_SIZE = 299
BICUBIC_A = -0.5  # PIL's bicubic kernel (Keys, a = -0.5); torch's plain bicubic uses -0.75
BICUBIC_SUPPORT = 2.0

Preprocess = Callable[[torch.Tensor], torch.Tensor]


def bicubic_kernel(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5, zero for |x| >= 2 (PIL's `bicubic_filter`)."""
    x = x.abs()
    near = ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * BICUBIC_A
    return torch.where(x < 1.0, near, torch.where(x < BICUBIC_SUPPORT, far, 0.0))


@functools.lru_cache(maxsize=16)
def pil_bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) float64 resampling weights of PIL's `precompute_coeffs` for bicubic.

    Output pixel i is centred at (i + 0.5)·scale in input coordinates; when shrinking, the
    kernel is stretched by the scale (antialiasing). Each row is normalised to sum to one, which
    also renormalises the rows the image border cuts.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    centres = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    pixels = torch.arange(in_size, dtype=torch.float64)
    # PIL multiplies by the reciprocal of the filter scale; the kernel's support bounds the taps.
    weights = bicubic_kernel((pixels[None, :] - centres[:, None] + 0.5) * (1.0 / filter_scale))
    return weights / weights.sum(dim=1, keepdim=True)


def _resampling_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    return pil_bicubic_matrix(in_size, out_size).to(device)


def resize_clean(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's `clean` resize: (N, C, H, W) on [0, 255] -> float32 (N, C, size, size)."""
    height, width = images.shape[-2:]
    pixels = images.to(torch.float64)
    across = _resampling_matrix(width, size, images.device)
    down = _resampling_matrix(height, size, images.device)
    # Width pass first, stored as float32, then the height pass (PIL's ImagingResampleInner).
    widened = (pixels @ across.T).to(torch.float32)
    resized = (down @ widened.to(torch.float64)).to(torch.float32)
    return resized.clamp(0.0, 255.0)


def resize_legacy_pytorch(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's `legacy_pytorch` resize: float32 bilinear, align_corners=False, no antialias."""
    resized = F.interpolate(
        images.to(torch.float32), size=(size, size), mode="bilinear", align_corners=False
    )
    return resized.clamp(0.0, 255.0)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """`legacy_tensorflow` mode: no resize here, the Inception network resizes inside."""
    return images.to(torch.float32)


def preprocessor(mode: str) -> Preprocess:
    """The image preprocessing clean-fid applies before its feature network in `mode`."""
    preprocessors: dict[str, Preprocess] = {
        "clean": resize_clean,
        "legacy_pytorch": resize_legacy_pytorch,
        "legacy_tensorflow": as_float,
    }
    if mode not in preprocessors:
        raise DmstabError(f"FID mode must be one of {', '.join(FID_MODES)}, got {mode!r}")
    return preprocessors[mode]
