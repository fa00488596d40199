"""One GAN training step for `dmstab train` (DCGAN, BigGAN-style): `model.d_steps` discriminator
updates, then one generator update, each with its own Adam (dmstab.models.gan for the losses).

As in the diffusion loop, every draw of step k (real batches, flips, z, fake labels) comes from
seeds derived from (train.seed, k), so a resumed run continues bit for bit. Discriminator step j
of training step k reads batch (k−1)·d_steps + j + 1 of the epoch order. Fake images get class
labels drawn uniformly (BigGAN); a DCGAN is unconditional. The loop logs `loss` (= loss_d +
loss_g), `loss_d`, `loss_g` and the mean real/fake logits. GANs train in one process.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmstab.config import Recipe
from dmstab.data import ImageDataset, build_dataset, resident
from dmstab.devices import upload
from dmstab.diffusion.objectives import DDPMObjective
from dmstab.distributed import SINGLE_PROCESS, DistributedContext
from dmstab.errors import DmstabError
from dmstab.models import build_model, count_parameters
from dmstab.models.gan import (
    build_discriminator,
    discriminator_loss,
    gan_config,
    generator_loss,
)
from dmstab.train.common import (
    EpochOrder,
    autocast,
    checkpoint_part,
    common_state,
    ema_copy,
    load_common_state,
    step_seed,
)
from dmstab.train.ema import EMA
from dmstab.train.loss_guard import LossGuard
from dmstab.train.power_ema import PowerEMA


class GanTrainer:
    """Generator (`model`, with an EMA), discriminator, their optimisers, and one step."""

    power_ema: PowerEMA | None = None  # power EMAs are for EDM2's diffusion models

    def __init__(
        self, recipe: Recipe, device: torch.device, context: DistributedContext = SINGLE_PROCESS
    ) -> None:
        if context.active:
            raise DmstabError(
                f"GAN recipes ({recipe.model.name}) train in one process; run dmstab train "
                "without torchrun"
            )
        self.recipe = recipe
        self.device = device
        self.context = context
        self.dataset: ImageDataset = resident(build_dataset(recipe.data), device)
        classes = self.dataset.num_classes
        if recipe.model.class_cond and classes < 1:
            raise DmstabError("model.class_cond is true but the dataset has no labels")
        self.num_classes = classes if recipe.model.class_cond else 0
        torch.manual_seed(recipe.train.seed)
        self.model: nn.Module = build_model(recipe, classes).to(device)
        self.discriminator = build_discriminator(recipe, classes).to(device)
        g = gan_config(recipe)
        self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
            self.model.parameters(), lr=g.g_lr, betas=g.betas
        )
        self.d_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=g.d_lr, betas=g.betas
        )
        self.ema = EMA(self.model, recipe.ema.rate, recipe.ema.warmup)
        self._every_step = torch.ones((), dtype=torch.bool, device=device)  # EMA: no skips
        self.guard = LossGuard(recipe.train)
        self.order = EpochOrder(len(self.dataset), recipe.train.seed)
        self.step = 0

    def _real_batch(self, index: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        indices = self.order.batch(index, self.recipe.train.batch_size)
        x0, labels = self.dataset.get_batch(indices)
        x0 = upload(x0, self.device)
        if self.recipe.data.hflip:
            flip = upload(torch.rand(len(indices), generator=generator) < 0.5, self.device)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        return x0, upload(labels, self.device) if self.num_classes else None

    def _fakes(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """z ~ N(0, I) and, for a conditional GAN, uniform class labels."""
        rows = self.recipe.train.batch_size
        z = torch.randn(rows, gan_config(self.recipe).z_dim, generator=generator)
        if not self.num_classes:
            return upload(z, self.device), None
        labels = torch.randint(0, self.num_classes, (rows,), generator=generator)
        return upload(z, self.device), upload(labels, self.device)

    def train_step(self) -> dict[str, Tensor]:
        self.step += 1
        recipe, gan = self.recipe, gan_config(self.recipe)
        seed = step_seed(recipe.train.seed, self.step)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        precision = autocast(self.device, recipe.train.precision)
        for index in range(gan.d_steps):
            real, real_labels = self._real_batch(
                (self.step - 1) * gan.d_steps + index + 1, generator
            )
            z, fake_labels = self._fakes(generator)
            with precision:
                with torch.no_grad():
                    fake = self.model(z, fake_labels)
                real_logits = self.discriminator(real, real_labels).float()
                fake_logits = self.discriminator(fake, fake_labels).float()
                loss_d = discriminator_loss(real_logits, fake_logits, gan.loss)
            self.d_optimizer.zero_grad(set_to_none=True)
            loss_d.backward()  # type: ignore[no-untyped-call]
            self.d_optimizer.step()
        z, fake_labels = self._fakes(generator)
        with precision:
            loss_g = generator_loss(
                self.discriminator(self.model(z, fake_labels), fake_labels).float(), gan.loss
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss_g.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        total = (loss_d + loss_g).detach()
        self.ema.update(self.model, self._every_step)
        # Judged after the updates (GAN recipes allow only `train.nonfinite: stop`): a
        # non-finite loss stops the run at the loop's next host point, before anything is saved.
        self.guard.judge(self.step, total)
        return {
            "loss": total,
            "loss_d": loss_d.detach(),
            "loss_g": loss_g.detach(),
            "d_real_logit": real_logits.detach().mean(),
            "d_fake_logit": fake_logits.detach().mean(),
        }

    def ema_model(self) -> nn.Module:
        return ema_copy(self.model, self.ema, self.device)

    def parameter_counts(self) -> dict[str, int]:
        return {
            "parameters": count_parameters(self.model),
            "discriminator_parameters": count_parameters(self.discriminator),
        }

    def objective_metrics(self, step: int) -> dict[str, float]:
        return {}

    def ddpm_objective(self) -> DDPMObjective | None:
        return None

    def state_dict(self, run_id: str) -> dict[str, object]:
        return {
            **common_state(self, run_id),
            "discriminator": self.discriminator.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        load_common_state(self, state)
        try:
            self.discriminator.load_state_dict(checkpoint_part(state, "discriminator"))
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0]
            raise DmstabError(f"checkpoint does not fit this recipe's GAN: {first_line}") from None
        self.d_optimizer.load_state_dict(checkpoint_part(state, "d_optimizer"))
