"""EDM2's learning-rate schedule, with training time counted in images as EDM2 counts it."""

from __future__ import annotations

import math

from dmstab.errors import DmstabError


def edm2_learning_rate(
    images_seen: int, ref_lr: float, ref_images: int, rampup_images: int
) -> float:
    """α(t) = α_ref / √max(t/t_ref, 1) · min(t/t_rampup, 1), t in training images (EDM2 Sec. 2.3).

    The inverse square root decay starts at t_ref = ref_images (EDM2: 70k batches of 2048 at
    512², 35k at 64²); the linear warm-up lasts rampup_images (EDM2: 10M). A zero ref_images
    or rampup_images switches that factor off, as in EDM2's learning_rate_schedule.
    """
    if images_seen < 0 or ref_images < 0 or rampup_images < 0:
        raise DmstabError(
            f"images_seen {images_seen}, ref_images {ref_images} and rampup_images "
            f"{rampup_images} must all be >= 0"
        )
    if not ref_lr > 0:
        raise DmstabError(f"ref_lr is {ref_lr}; must be > 0")
    lr = ref_lr
    if ref_images > 0:
        lr /= math.sqrt(max(images_seen / ref_images, 1.0))
    if rampup_images > 0:
        lr *= min(images_seen / rampup_images, 1.0)
    return lr
