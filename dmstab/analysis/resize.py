"""clean-fid's image preprocessing, batched in torch on any device.

clean-fid's `clean` mode resizes each channel of a uint8 image to 299x299 as a float32 PIL
image (mode "F") with PIL's bicubic filter, then clips to [0, 255]
(`make_resizer("PIL", False, "bicubic", (299, 299))`). PIL resamples separably, the width
first, with float64 coefficients and float64 sums, storing each pass as float32. Here each
pass is float64 matrix products with PIL's coefficient matrix (band by band, skipping its zero
weights), rounded to float32 like PIL's intermediate, so the result matches PIL's up to float64
summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
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


ROWS_PER_BAND = 32  # output pixels per matrix product of a pass (see `_bands`)
CPU_CHUNK_BYTES = 2**22  # a chunk's float64 width-pass output on a CPU: within the cores' L2


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class _Band:
    """Output pixels [start, stop) of a pass and the only input pixels [low, high) they read,
    with their (stop - start, high - low) block of the resampling matrix."""

    start: int
    stop: int
    low: int
    high: int
    weights: torch.Tensor


@functools.lru_cache(maxsize=16)
def _bands(in_size: int, out_size: int, device: torch.device) -> tuple[_Band, ...]:
    """PIL's resampling matrix cut into bands of `ROWS_PER_BAND` rows, each with the columns
    its taps reach. A bicubic tap reaches 2 input pixels (2·scale when shrinking) either side,
    so a band of 32 output rows upsampling 32 -> 299 reads at most 8 of the 32 input rows: the
    products skip only zero weights, each output summing the nonzero float64 terms a dense
    product sums."""
    matrix = pil_bicubic_matrix(in_size, out_size)
    bands = []
    for start in range(0, out_size, ROWS_PER_BAND):
        stop = min(start + ROWS_PER_BAND, out_size)
        reached = (matrix[start:stop] != 0).any(dim=0).nonzero().flatten()
        low, high = int(reached[0]), int(reached[-1]) + 1
        weights = matrix[start:stop, low:high].to(device)
        bands.append(_Band(start, stop, low, high, weights))
    return tuple(bands)


def resize_clean(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """clean-fid's `clean` resize: (N, C, H, W) on [0, 255] -> float32 (N, C, size, size).

    Every channel of every image is a plane, resampled in its own layout: the width pass
    multiplies its rows by the transposed resampling matrix, the height pass multiplies the
    matrix into its columns, one band of output pixels at a time. No dense matrix of mostly zero
    weights, no transposed copy of the images and no float64 copy of the output. On a CPU the
    planes go through in chunks whose float64 intermediate stays in the cores' caches; a GPU
    takes them all."""
    count, channels, height, width = images.shape
    resized = torch.empty((count, channels, size, size), dtype=torch.float32, device=images.device)
    planes, resized_planes = images.reshape(-1, height, width), resized.view(-1, size, size)
    per_chunk = len(planes)
    if images.device.type == "cpu":
        per_chunk = max(1, CPU_CHUNK_BYTES // (height * size * 8))
    for start in range(0, len(planes), per_chunk):
        _resize_into(resized_planes[start : start + per_chunk], planes[start : start + per_chunk])
    return resized


def _resize_into(resized: torch.Tensor, planes: torch.Tensor) -> None:
    """Resample (P, H, W) planes into the float32 (P, size, size) `resized`."""
    count, height, width = planes.shape
    size = resized.shape[-1]
    # Width pass first, stored as float32 (PIL's ImagingResampleHorizontal_32bpc).
    pixels = planes.to(torch.float64)
    widened = torch.empty((count, height, size), dtype=torch.float64, device=planes.device)
    for band in _bands(width, size, planes.device):
        columns = pixels[..., band.low : band.high]
        torch.matmul(columns, band.weights.T, out=widened[..., band.start : band.stop])
    rows = widened.to(torch.float32).to(torch.float64)
    for band in _bands(height, size, planes.device):
        block = torch.matmul(band.weights, rows[:, band.low : band.high]).clamp_(0.0, 255.0)
        # Clamping before rounding to float32 is the same: rounding is monotone, 0 and 255 exact.
        resized[:, band.start : band.stop].copy_(block)


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
