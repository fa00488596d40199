"""Ten classes of anti-aliased coloured shapes, generated procedurally (the quickstart dataset).

Scenes live in resolution-free coordinates: the image spans [-1, 1]² with x to the right and
y downwards, so one seed draws the same scenes at 16, 32 or 64 pixels. Each image holds one
shape in a bold colour whose luma differs from every background pixel by at least
MIN_LUMA_CONTRAST; the background is plain, a linear gradient or a soft sum of cosine waves.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from dmstab.data.base import InMemoryDataset
from dmstab.errors import DmstabError

CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "ring",
    "plus",
    "diamond",
    "star",
    "frame",
    "bars",
    "crescent",
)

MIN_SIZE, MAX_SIZE = 0.45, 0.8  # half-extent of a shape, in image half-widths
EDGE_MARGIN = 0.05  # gap kept between a shape's extent and the image border
MIN_LUMA_CONTRAST = 0.3  # on the 0..1 scale
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601
TEXTURE_WAVES = 4
MIN_WAVE_NUMBER, MAX_WAVE_NUMBER = 1.5, 4.0  # radians per half-width: under 1.3 cycles per image
PLAIN, GRADIENT, TEXTURE = 0, 1, 2
MIN_RESOLUTION = 8
RENDER_CHUNK = 1024  # images rendered at once, to bound memory at high resolution

SignedDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Point = tuple[float, float]


@dataclass(frozen=True)
class ShapeScenes:
    """The random draws behind N images; every tensor's first dimension is N."""

    labels: torch.Tensor  # (N,) int64, index into CLASS_NAMES
    centres: torch.Tensor  # (N, 2) shape centre (x, y)
    sizes: torch.Tensor  # (N,) half-extent
    foreground: torch.Tensor  # (N, 3) RGB in [0, 1]
    background: torch.Tensor  # (N, 2, 3) the two RGB colours the background blends between
    background_kind: torch.Tensor  # (N,) PLAIN, GRADIENT or TEXTURE
    gradient_direction: torch.Tensor  # (N, 2) unit vectors
    wave_vectors: torch.Tensor  # (N, TEXTURE_WAVES, 2)
    wave_phases: torch.Tensor  # (N, TEXTURE_WAVES)

    def rows(self, selection: slice) -> "ShapeScenes":
        """The scenes in `selection`."""
        return ShapeScenes(**{f.name: getattr(self, f.name)[selection] for f in fields(self)})


# Unit shapes: signed distance (negative inside) for a shape whose extent is within [-1, 1]².


def _box(x: torch.Tensor, y: torch.Tensor, half_width: float, half_height: float) -> torch.Tensor:
    outside_x, outside_y = x.abs() - half_width, y.abs() - half_height
    outside = torch.hypot(outside_x.clamp_min(0), outside_y.clamp_min(0))
    return outside + torch.maximum(outside_x, outside_y).clamp_max(0)


def _circle(x: torch.Tensor, y: torch.Tensor, radius: float, centre_x: float = 0.0) -> torch.Tensor:
    return torch.hypot(x - centre_x, y) - radius


def _beyond_line(x: torch.Tensor, y: torch.Tensor, start: Point, end: Point) -> torch.Tensor:
    """Signed distance to the line through start and end, positive on the side away from (0, 0)."""
    normal_x, normal_y = end[1] - start[1], start[0] - end[0]
    if normal_x * start[0] + normal_y * start[1] < 0:
        normal_x, normal_y = -normal_x, -normal_y
    length = math.hypot(normal_x, normal_y)
    return ((x - start[0]) * normal_x + (y - start[1]) * normal_y) / length


_TRIANGLE_APEX_Y, _TRIANGLE_BASE_Y = -0.98, 0.72
_TRIANGLE_HALF_BASE = (_TRIANGLE_BASE_Y - _TRIANGLE_APEX_Y) / math.sqrt(3)  # equilateral
_STAR_POINTS, _STAR_INNER_RADIUS = 5, 0.45
_STAR_HALF_SECTOR = math.pi / _STAR_POINTS
_STAR_INNER_VERTEX = (
    _STAR_INNER_RADIUS * math.sin(_STAR_HALF_SECTOR),
    -_STAR_INNER_RADIUS * math.cos(_STAR_HALF_SECTOR),
)


def _disk(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _circle(x, y, 1.0)


def _square(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _box(x, y, 0.85, 0.85)


def _triangle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Equilateral, pointing up; mirrored in x so one slanted edge serves both sides."""
    slanted = _beyond_line(
        x.abs(), y, (0.0, _TRIANGLE_APEX_Y), (_TRIANGLE_HALF_BASE, _TRIANGLE_BASE_Y)
    )
    return torch.maximum(y - _TRIANGLE_BASE_Y, slanted)


def _ring(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.hypot(x, y) - 0.72).abs() - 0.28


def _plus(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_box(x, y, 1.0, 0.32), _box(x, y, 0.32, 1.0))


def _diamond(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.abs() + y.abs() - 1.0) / math.sqrt(2)


def _star(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Five points, one up: fold the angle into half a sector, then one edge tip→inner vertex."""
    radius = torch.hypot(x, y)
    angle_from_up = torch.atan2(x, -y)
    sector_angle = torch.remainder(angle_from_up + _STAR_HALF_SECTOR, 2 * _STAR_HALF_SECTOR)
    folded = (sector_angle - _STAR_HALF_SECTOR).abs()
    folded_x, folded_y = radius * torch.sin(folded), -radius * torch.cos(folded)
    return _beyond_line(folded_x, folded_y, (0.0, -1.0), _STAR_INNER_VERTEX)


def _frame(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.maximum(_box(x, y, 0.95, 0.95), -_box(x, y, 0.55, 0.55))


def _bars(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two horizontal bars, like an equals sign."""
    return _box(x, y.abs() - 0.45, 0.95, 0.25)


def _crescent(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A disk with a smaller disk bitten out on the right: opens to the right."""
    return torch.maximum(_circle(x, y, 1.0), -_circle(x, y, 0.8, centre_x=0.45))


_UNIT_SHAPES: tuple[SignedDistance, ...] = (
    _disk,
    _square,
    _triangle,
    _ring,
    _plus,
    _diamond,
    _star,
    _frame,
    _bars,
    _crescent,
)


def pixel_centres(resolution: int) -> torch.Tensor:
    """Coordinates in [-1, 1] of the pixel centres along one axis."""
    return (torch.arange(resolution, dtype=torch.float32) + 0.5) * (2.0 / resolution) - 1.0


def shape_coverage(
    labels: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor, resolution: int
) -> torch.Tensor:
    """Fraction (N, R, R) of each pixel the shape covers, anti-aliased from its signed distance.

    Coverage ramps linearly over one pixel across the edge (the area of a pixel a straight edge
    covers, to first order), so edges are smooth at any resolution.
    """
    coords = pixel_centres(resolution)
    scale = sizes[:, None, None]
    x = (coords[None, None, :] - centres[:, 0, None, None]) / scale
    y = (coords[None, :, None] - centres[:, 1, None, None]) / scale
    pixel_width = 2.0 / resolution
    coverage = torch.empty(len(labels), resolution, resolution)
    for label, unit_shape in enumerate(_UNIT_SHAPES):
        members = labels == label
        if members.any():
            distance = unit_shape(x[members], y[members]) * scale[members]
            coverage[members] = (0.5 - distance / pixel_width).clamp(0.0, 1.0)
    return coverage


def _background_blend(scenes: ShapeScenes, resolution: int) -> torch.Tensor:
    """Weight (N, R, R) in [0, 1] of the second background colour at each pixel."""
    coords = pixel_centres(resolution)
    x, y = coords[None, None, :], coords[None, :, None]
    direction = scenes.gradient_direction
    # Along a unit direction the square spans [-√2, √2]: map it onto [0, 1].
    gradient = 0.5 + (direction[:, 0, None, None] * x + direction[:, 1, None, None] * y) / (
        2 * math.sqrt(2)
    )
    waves = torch.zeros(len(scenes.labels), resolution, resolution)
    for k in range(TEXTURE_WAVES):
        wave_x, wave_y = scenes.wave_vectors[:, k, 0], scenes.wave_vectors[:, k, 1]
        phase = wave_x[:, None, None] * x + wave_y[:, None, None] * y
        waves += torch.cos(phase + scenes.wave_phases[:, k, None, None])
    texture = 0.5 + waves / (2 * TEXTURE_WAVES)
    kind = scenes.background_kind[:, None, None]
    return torch.where(kind == GRADIENT, gradient, torch.where(kind == TEXTURE, texture, 0.0))


def render_scenes(scenes: ShapeScenes, resolution: int) -> torch.Tensor:
    """uint8 images (N, 3, R, R): the shape composited over its background by coverage."""
    alpha = shape_coverage(scenes.labels, scenes.centres, scenes.sizes, resolution)[:, None]
    blend = _background_blend(scenes, resolution)[:, None]
    first, second = scenes.background[:, 0, :, None, None], scenes.background[:, 1, :, None, None]
    background = first + (second - first) * blend
    image = background + (scenes.foreground[:, :, None, None] - background) * alpha
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of RGB values in the last dimension."""
    return rgb @ torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(N, 3) RGB from hue in [0, 1), saturation and value in [0, 1] (the standard hexcone)."""
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = torch.remainder(offset + hue * 6, 6)
        ramp = torch.minimum(k, 4 - k).clamp(0, 1)
        channels.append(value - value * saturation * ramp)
    return torch.stack(channels, dim=-1)


def _contrasting_backgrounds(colours: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Darken (for a light foreground) or lighten (for a dark one) the (N, 2, 3) colours until
    their luma is MIN_LUMA_CONTRAST away from the foreground's. Luma is linear, so every blend
    of the two colours keeps that distance too."""
    colour_luma = luma(colours)[..., None]
    target = luma(foreground)[:, None, None]
    darken = (target - MIN_LUMA_CONTRAST) / colour_luma.clamp_min(1e-6)
    darker = colours * darken.clamp(max=1.0)
    lighten = (1 - target - MIN_LUMA_CONTRAST) / (1 - colour_luma).clamp_min(1e-6)
    lighter = 1 - (1 - colours) * lighten.clamp(max=1.0)
    return torch.where(target >= 0.5, darker, lighter)


def _uniform(low: float, high: float, shape: tuple[int, ...], rng: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=rng)


def _unit_vectors(shape: tuple[int, ...], rng: torch.Generator) -> torch.Tensor:
    angle = _uniform(0.0, 2 * math.pi, shape, rng)
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)


def sample_scenes(num_images: int, seed: int) -> ShapeScenes:
    """Draw N scenes from a generator seeded with `seed`; classes are balanced to within one."""
    rng = torch.Generator().manual_seed(seed)
    num_classes = len(CLASS_NAMES)
    labels = (torch.arange(num_images) % num_classes)[torch.randperm(num_images, generator=rng)]
    sizes = _uniform(MIN_SIZE, MAX_SIZE, (num_images,), rng)
    # Keep the whole shape (extent `size` around its centre) inside the image.
    centres = _uniform(-1.0, 1.0, (num_images, 2), rng) * (1 - EDGE_MARGIN - sizes)[:, None]
    foreground = _hsv_to_rgb(
        _uniform(0.0, 1.0, (num_images,), rng),
        _uniform(0.65, 1.0, (num_images,), rng),
        _uniform(0.65, 1.0, (num_images,), rng),
    )
    background = _contrasting_backgrounds(torch.rand(num_images, 2, 3, generator=rng), foreground)
    wave_numbers = _uniform(MIN_WAVE_NUMBER, MAX_WAVE_NUMBER, (num_images, TEXTURE_WAVES, 1), rng)
    return ShapeScenes(
        labels=labels,
        centres=centres,
        sizes=sizes,
        foreground=foreground,
        background=background,
        background_kind=torch.randint(0, 3, (num_images,), generator=rng),
        gradient_direction=_unit_vectors((num_images,), rng),
        wave_vectors=_unit_vectors((num_images, TEXTURE_WAVES), rng) * wave_numbers,
        wave_phases=_uniform(0.0, 2 * math.pi, (num_images, TEXTURE_WAVES), rng),
    )


def generate_shapes(
    num_images: int, resolution: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, R, R) and int64 labels (N,), deterministic in `seed`."""
    if num_images < 1:
        raise DmstabError(f"synthetic data needs num_images >= 1, got {num_images}")
    if resolution < MIN_RESOLUTION:
        raise DmstabError(f"synthetic data needs resolution >= {MIN_RESOLUTION}, got {resolution}")
    scenes = sample_scenes(num_images, seed)
    images = torch.empty(num_images, 3, resolution, resolution, dtype=torch.uint8)
    for start in range(0, num_images, RENDER_CHUNK):
        chunk = slice(start, start + RENDER_CHUNK)
        images[chunk] = render_scenes(scenes.rows(chunk), resolution)
    return images, scenes.labels


def synthetic_dataset(num_images: int, resolution: int = 32, seed: int = 0) -> InMemoryDataset:
    """The labelled shapes dataset held in memory."""
    images, labels = generate_shapes(num_images, resolution, seed)
    return InMemoryDataset("synthetic", images, labels, num_classes=len(CLASS_NAMES))
