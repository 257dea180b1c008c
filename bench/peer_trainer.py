"""The PyTorch peer of the time-to-quality harness: a diffusers trainer, as a user would write it.

A `PeerTrainer` trains a diffusers `UNet2DModel` on images held in memory with the loop of
diffusers' `examples/unconditional_image_generation/train_unconditional.py`: x_t from
`DDPMScheduler.add_noise`, t ~ U{0..T-1}, MSE to ε, AdamW, a learning-rate schedule with warmup,
global-norm clipping, diffusers' `EMAModel`; and samples with `DPMSolverMultistepScheduler`
(SDE-DPM-Solver++ 2M, x̂_0 clipped to [-1, 1], on the timesteps it is given: the harness gives the
plan of the project's `sde_dpmpp_2m` entry) from the EMA weights.

Two recipes (`bench/time_to_quality.py` picks one):

* `exact_recipe`: the project's run, exported: the U-Net of `diffusers_config` (the same
  architecture, started from the project's step-0 weights through `export_state_dict`), the
  run's own β schedule, T, batch, learning rate and warmup, Adam (AdamW with no decay), clipping
  and fixed-decay EMA. Only the implementation differs.
* `diffusers_recipe`: what a diffusers user would pick for 28x28 digits: train_unconditional.py's
  defaults (AdamW 1e-4, β = (0.95, 0.999), weight decay 1e-6, cosine schedule with 500 warmup
  steps over 100 epochs, batch 16, T = 1000 linear β, EMA with warmup inv_gamma 1, power 3/4,
  max decay 0.9999) with the MNIST U-Net of diffusers' course (block_out_channels (32, 64, 64),
  2 blocks per level, attention in the two lower levels).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the peer trains and samples with."""

    name: str
    unet: dict  # UNet2DModel config
    scheduler: dict  # DDPMScheduler config (β, T, prediction type)
    batch_size: int
    lr: float
    warmup_steps: int
    # After warmup: "constant" | "linear" | "cosine" (diffusers' names; the last two to 0 at total_steps).
    lr_schedule: str
    total_steps: int  # the decay's length
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    ema: dict  # diffusers EMAModel keyword arguments
    init_state_dict: dict | None = None  # numpy tensors to start from (None: diffusers' init)
    snr_gamma: float = 0.0  # min-SNR-γ loss weighting as diffusers' training scripts' --snr_gamma (0: off)


def exact_recipe(config: Any, unet_kwargs: dict, data_shape: tuple, meta: Any, init_params: Any) -> Recipe:
    """The project's run of `config` for diffusers: its exported U-Net, schedule and optimiser."""
    from bench.common import BenchError
    from ddpm_jax.convert import export_diffusers

    if str(config.diffusion.pred) != "eps":
        raise BenchError(f"peer_exact trains diffusers' epsilon target; diffusion.pred={config.diffusion.pred!r} "
                         "has no peer here: run it with --config.diffusion.pred=eps.")
    o = config.optim
    decay = float(o.ema_decay)
    return Recipe(
        name="peer_exact", unet=export_diffusers.diffusers_config(unet_kwargs, data_shape),
        scheduler=export_diffusers.scheduler_config(meta, str(config.diffusion.var_type)),
        batch_size=int(config.training.batch_size), lr=float(o.lr), warmup_steps=int(o.warmup_steps),
        lr_schedule=str(o.lr_decay), total_steps=int(config.training.num_steps),
        betas=(float(o.beta1), float(o.beta2)), eps=float(o.eps), weight_decay=0.0, grad_clip=float(o.grad_clip),
        # min_decay = decay: a fixed decay from the first step, as the project's EMA.
        ema=dict(decay=decay, min_decay=decay, use_ema_warmup=False),
        init_state_dict=export_diffusers.export_state_dict(init_params),
        snr_gamma=float(config.diffusion.min_snr_gamma))


def diffusers_recipe(image_size: int, channels: int, num_train: int) -> Recipe:
    """train_unconditional.py's defaults with diffusers' course MNIST U-Net at `image_size`."""
    batch, epochs = 16, 100
    unet = dict(sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=2,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    scheduler = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    return Recipe(
        name="peer_diffusers", unet=unet, scheduler=scheduler, batch_size=batch, lr=1e-4, warmup_steps=500,
        lr_schedule="cosine", total_steps=epochs * math.ceil(num_train / batch), betas=(0.95, 0.999), eps=1e-8,
        weight_decay=1e-6, grad_clip=1.0, ema=dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75))


def recipe_record(recipe: Recipe) -> dict:
    """The recipe as JSON (without the initial weights)."""
    out = dataclasses.asdict(dataclasses.replace(recipe, init_state_dict=None))
    out["init"] = "ddpm_jax step-0 weights (exported)" if recipe.init_state_dict is not None else "diffusers"
    out["scheduler"] = {k: v for k, v in recipe.scheduler.items() if k != "trained_betas"}
    return out


class PeerTrainer:
    """Trains and samples one diffusers U-Net under a `Recipe` (CPU, float32)."""

    def __init__(self, recipe: Recipe, images: np.ndarray, seed: int = 0):
        import torch
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.torch, self.recipe = torch, recipe
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.images = torch.from_numpy(np.asarray(images, np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
        self.unet = UNet2DModel(**recipe.unet)
        if recipe.init_state_dict is not None:
            self.unet.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in recipe.init_state_dict.items()})
        self.unet.train()
        self.scheduler = DDPMScheduler.from_config(recipe.scheduler)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=recipe.lr, betas=recipe.betas, eps=recipe.eps,
                                           weight_decay=recipe.weight_decay)
        if recipe.lr_schedule == "constant":
            self.lr_scheduler = get_scheduler("constant_with_warmup", optimizer=self.optimizer,
                                              num_warmup_steps=recipe.warmup_steps)
        else:
            self.lr_scheduler = get_scheduler(recipe.lr_schedule, optimizer=self.optimizer,
                                              num_warmup_steps=recipe.warmup_steps,
                                              num_training_steps=recipe.total_steps)
        self.ema = EMAModel(self.unet.parameters(), model_cls=UNet2DModel, model_config=self.unet.config,
                            **recipe.ema)
        self.steps, self._order, self._pos = 0, torch.randperm(len(self.images), generator=self.generator), 0

    @property
    def num_params(self) -> int:
        return int(sum(p.numel() for p in self.unet.parameters()))

    def _batch(self):
        torch, n = self.torch, self.recipe.batch_size
        if self._pos + n > len(self._order):  # a new epoch: reshuffle (drop_last, as the example's loader)
            self._order, self._pos = torch.randperm(len(self.images), generator=self.generator), 0
        idx = self._order[self._pos:self._pos + n]
        self._pos += n
        return self.images[idx]

    def _loss(self, prediction, noise, t):
        """The ε mse, weighted per example by min(SNR, γ) / SNR = min(1, γ / SNR) when the recipe has a γ."""
        torch = self.torch
        if not self.recipe.snr_gamma:
            return torch.nn.functional.mse_loss(prediction, noise)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        weights = torch.clamp(self.recipe.snr_gamma / snr, max=1.0)  # 1 where SNR = 0, not 0 / 0
        per_example = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        return (per_example * weights).mean()

    def train(self, steps: int) -> float:
        """`steps` optimiser updates; the last loss."""
        torch, T = self.torch, self.scheduler.config.num_train_timesteps
        loss = torch.zeros(())
        for _ in range(int(steps)):
            x0 = self._batch()
            noise = torch.randn(x0.shape, generator=self.generator)
            t = torch.randint(0, T, (x0.shape[0],), generator=self.generator)
            x_t = self.scheduler.add_noise(x0, noise, t)
            loss = self._loss(self.unet(x_t, t).sample, noise, t)
            loss.backward()
            if self.recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.recipe.grad_clip)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.step(self.unet.parameters())
            self.steps += 1
        return float(loss)

    def betas(self) -> np.ndarray:
        """The training β_1..β_T (float64)."""
        return self.scheduler.betas.double().numpy()

    def sample(self, num: int, *, seed: int, timesteps: list[int], batch_size: int = 250) -> np.ndarray:
        """`num` uint8 NHWC images from the EMA weights: SDE-DPM-Solver++ 2M, one network call at each
        of `timesteps` (descending)."""
        from diffusers import DPMSolverMultistepScheduler, UNet2DModel

        torch = self.torch
        model = UNet2DModel.from_config(self.unet.config)
        self.ema.copy_to(model.parameters())
        model.eval()
        # thresholding with sample_max_value 1 clips x̂_0 to [-1, 1], as the project's samplers.
        solver = DPMSolverMultistepScheduler.from_config(
            self.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2, thresholding=True,
            sample_max_value=1.0)
        generator = torch.Generator().manual_seed(seed)
        out = []
        with torch.no_grad():
            for start in range(0, num, batch_size):
                n = min(batch_size, num - start)
                x = torch.randn((n, *self.images.shape[1:]), generator=generator)
                solver.set_timesteps(timesteps=[int(t) for t in timesteps])
                for t in solver.timesteps:
                    x = solver.step(model(x, t).sample, t, x, generator=generator).prev_sample
                out.append(x)
        x = torch.cat(out).clamp(-1, 1).permute(0, 2, 3, 1).numpy()
        return np.round((x + 1.0) * 127.5).astype(np.uint8)

    def forward(self, x_nhwc: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The (training) network's output for x_t NHWC and integer t, NHWC (for parity checks)."""
        torch = self.torch
        x = torch.from_numpy(np.asarray(x_nhwc, np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return self.unet(x, torch.from_numpy(np.asarray(t))).sample.permute(0, 2, 3, 1).numpy()
