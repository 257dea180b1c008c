"""Every random stream of a run: how its keys are derived from the seed, and the stream constants.

All randomness is a function of `config.seed` (or `sampling.seed` / `evaluation.seed`) through
`jax.random.fold_in`, never through a key threaded from call to call, so a number depends only on
what it is for, not on the order in which a run happened to draw it:

- a train step's key is `fold_in(key(seed), step)` (the DDPM trainer and the autoencoder's), split
  into the dropout and loss keys; label dropout draws from `fold_in(step key, LABEL_DROPOUT)` and the
  condition kinds' training augmentation (a low-res image's noise level) from
  `fold_in(step key, COND_AUGMENT)`;
- image i of a sampler has `key_i = fold_in(key(seed), i)` and the noise of its step at timestep t
  is `fold_in(key_i, t)`, so an image does not depend on the batch it was drawn in;
- the likelihood bounds give example i `fold_in(key_i, BPD)` (bits/dim, then folded with t) or
  `fold_in(key_i, ODE)` (the probability-flow ODE's dequantisation and probe noise);
- the one-off draws fold a stream constant into `key(seed)`: the network's initial params
  (`INIT`), the autoencoder's init and latent-scale estimate (`AUTOENCODER_INIT`,
  `AUTOENCODER_SCALE`), the noise of an `init_image`'s x_k (`NOISED_START`, then per image i)
  and Fig. 8's x_t (`FIGURE_MIX`).

Where streams could meet. Two draws share a key only if the same value is folded into the same
parent key. The constants are pairwise distinct. `LABEL_DROPOUT` and `COND_AUGMENT` are the only values
folded into a step key. `BPD` and `ODE` are folded into per-image keys next to the timesteps t ≤ T, and they are
larger than any T a config uses. Into `key(seed)` itself go the step numbers, the image indices and
the one-off streams: `FIGURE_MIX` is larger than any step count or sample count a config uses, but
`INIT`, `AUTOENCODER_INIT`, `AUTOENCODER_SCALE` and `NOISED_START` are not. So under one seed the
init key (0x1417 = 5143) is also train step 5143's key, yet what is drawn differs: `model.init`
folds the module paths into it, the step splits it. The autoencoder's init and scale keys are its
steps 44545 and 44546's in the same way (init vs. a posterior sample of the key itself, and the
scale estimate folds in the batch index). `NOISED_START`'s image i noise does equal the noise of
sampler image 28271 at timestep t = i: the two meet only across runs (partial denoising of a few
images vs. a sampling run of over 28,271 images with the same seed). The values stay as they are
because the released runs and their recorded numbers depend on them. `tests/test_rng.py` checks the
distinctness and these bounds against every config.
"""

from __future__ import annotations

INIT = 0x1417  # the network's initial params: fold_in(key(config.seed), INIT)
LABEL_DROPOUT = 0x1ABE  # classifier-free guidance's label dropout: fold_in(step key, LABEL_DROPOUT)
COND_AUGMENT = 0xA06E  # the condition kinds' augmentation (noise-conditioning level): fold_in(step key, ·)
BPD = 0x627064  # "bpd": the bound's x_t noise and t draws, fold_in(key_i, BPD)
ODE = 0x6F6465  # "ode": the probability-flow likelihood's dequantisation and probe noise, fold_in(key_i, ODE)
FIGURE_MIX = 0x6D6978  # "mix": the noise of Fig. 8's x_t, fold_in(key(seed), FIGURE_MIX)
NOISED_START = 0x6E6F  # "no": the noise of an init_image's x_k, then fold_in(·, i) per image
AUTOENCODER_INIT = 0xAE01  # the autoencoder's initial params
AUTOENCODER_SCALE = 0xAE02  # the autoencoder's latent-scale estimate, then fold_in(·, batch) per batch

STREAMS = {"INIT": INIT, "LABEL_DROPOUT": LABEL_DROPOUT, "COND_AUGMENT": COND_AUGMENT, "BPD": BPD, "ODE": ODE,
           "FIGURE_MIX": FIGURE_MIX, "NOISED_START": NOISED_START, "AUTOENCODER_INIT": AUTOENCODER_INIT,
           "AUTOENCODER_SCALE": AUTOENCODER_SCALE}
