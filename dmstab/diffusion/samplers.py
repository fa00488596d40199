"""Samplers by name (`sample.sampler`): each one function with the ``Sampler`` signature.

A new sampler is one such function and one ``register_sampler`` call. Its schedule object is
its own (DDPM/DDIM: DiscreteSchedule; Heun: SigmaSchedule).
"""

from __future__ import annotations

from typing import Any

from dmstab.diffusion.ddpm_sampling import ddim, ddpm
from dmstab.diffusion.edm_sampling import heun
from dmstab.diffusion.sampling import Sampler

SAMPLERS: dict[str, Sampler[Any]] = {}


def register_sampler(name: str, sampler: Sampler[Any]) -> None:
    """Make `sampler` available as `name`; a name is registered once."""
    if name in SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered")
    SAMPLERS[name] = sampler


register_sampler("ddpm", ddpm)
register_sampler("ddim", ddim)
register_sampler("heun", heun)
