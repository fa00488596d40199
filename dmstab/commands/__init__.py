"""One module per `dmstab` verb: build objects from a recipe, run them, log to MLflow.

Importing this package registers dmstab's built-in components, so every recipe a command loads
may name them: the prediction targets, timestep samplers and samplers (`dmstab.diffusion`),
the networks (`dmstab.models`) and the analyses whose sections a recipe may hold
(consistency, fid_sweep, hessian, landscape).
"""

import dmstab.diffusion.samplers
import dmstab.diffusion.targets
import dmstab.models  # noqa: F401  (registers the built-in networks)
from dmstab.commands import consistency, fid_sweep, hessian, landscape  # noqa: F401  (the analyses)
