"""The names a training run's metrics carry in MLflow, given in this one place.

The trainers and the loop measure under short names (`loss`, `mse`, `grad_norm`, `lr`, …); the
loop hands every logged window through `MetricNames.tracked`, which files them by prefix, the
groups `mlflow ui` draws:

- `train/…`: the optimisation: `train/loss` and its terms (`train/mse`, `train/vb`,
  `train/loss_weight`, `train/loss_before_importance`, EDM2's `train/logvar`, a GAN's
  `train/loss_d`, `train/loss_g`, `train/d_real_logit`, `train/d_fake_logit`), `train/grad_norm`,
  `train/lr`, `train/kimg` (and the loss guard's `train/skipped`, `train/skipped_total`);
- `system/…`: throughput, `system/images_per_s`;
- names made with a prefix keep it: `timesteps/…` (the timestep sampler), `magnitude/…`
  (EDM2 Fig. 3), `eval/…` (FID, KID, IS).

Nothing is charted twice or as a flat line:

- `mse` (the unweighted target MSE) is logged only when the loss is not that MSE, i.e. under a
  loss weighting (`diffusion.weighting` other than `none`), with learned Σ (its VB term, `vb`)
  or with importance-sampled timesteps (`loss_before_importance`). Otherwise `loss` is the MSE
  itself and is logged once, as `train/loss`.
- A quantity that cannot change during the run is a tag, set once: `dmstab.loss_weight` (1,
  `diffusion.weighting: none`) and `dmstab.lr` (a constant schedule without warm-up; a GAN's
  learning rates are constant too).
"""

from __future__ import annotations

from collections.abc import Mapping

from dmstab.config import Recipe
from dmstab.diffusion.objectives import LOSS_BEFORE_IMPORTANCE

# Every name the trainers and the loop measure (what `dmstab report --metric` accepts bare)
MEASURED_NAMES = frozenset(
    {
        *("loss", "mse", "vb", "loss_weight", LOSS_BEFORE_IMPORTANCE, "logvar", "grad_norm"),
        *("loss_d", "loss_g", "d_real_logit", "d_fake_logit", "lr", "kimg", "images_per_s"),
    }
)
TRAIN_PREFIX = "train/"
SYSTEM_PREFIX = "system/"
SYSTEM_METRICS = frozenset({"images_per_s"})
CONSTANT_TAG_PREFIX = "dmstab."
# Terms whose presence makes the loss differ from the unweighted MSE.
_LOSS_IS_NOT_MSE = ("vb", LOSS_BEFORE_IMPORTANCE)


def tracked_name(name: str) -> str:
    """The MLflow key of a metric measured as `name`: `system/…`, `train/…`, or as it is when
    it already has a prefix."""
    if "/" in name:
        return name
    return (SYSTEM_PREFIX if name in SYSTEM_METRICS else TRAIN_PREFIX) + name


class MetricNames:
    """Renames one run's logged windows, and turns its constants into tags once."""

    def __init__(self, recipe: Recipe) -> None:
        optim = recipe.optim
        constant_lr = recipe.model.adversarial or (
            optim.schedule == "constant" and not optim.warmup_steps
        )
        self._weighted = recipe.diffusion.weighting != "none"
        self._constants = {"lr"} if constant_lr else set()
        if not self._weighted:
            self._constants.add("loss_weight")
        self._tagged: set[str] = set()

    def tracked(self, window: Mapping[str, float]) -> tuple[dict[str, float], dict[str, str]]:
        """The window's metrics under their MLflow keys, and the tags of constants not yet set."""
        loss_is_mse = not self._weighted and not any(key in window for key in _LOSS_IS_NOT_MSE)
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        for name, value in window.items():
            if name in self._constants:
                if name not in self._tagged:
                    tags[CONSTANT_TAG_PREFIX + name] = repr(float(value))
                    self._tagged.add(name)
            elif not (name == "mse" and loss_is_mse):
                metrics[tracked_name(name)] = float(value)
        return metrics, tags
