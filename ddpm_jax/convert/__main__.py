"""`python -m ddpm_jax.convert --diffusers DIR --out DIR`: released DDPM weights -> ddpm_jax checkpoint;
`python -m ddpm_jax.convert --to-diffusers WORKDIR --out DIR`: a ddpm_jax run -> diffusers UNet2DModel folder;
`python -m ddpm_jax.convert --autoencoder-kl DIR --out DIR`: a diffusers AutoencoderKL (e.g. the SD VAE) ->
an autoencoder workdir (as `--mode=train_autoencoder` writes)."""

from __future__ import annotations

import argparse
import sys

from ddpm_jax.convert import convert_diffusers
from ddpm_jax.convert.autoencoder_kl import convert_autoencoder_kl
from ddpm_jax.convert.export_diffusers import export_workdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.convert", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--diffusers", metavar="DIR",
                        help="diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.*), "
                             "e.g. a local snapshot of google/ddpm-cifar10-32")
    source.add_argument("--to-diffusers", metavar="WORKDIR", dest="to_diffusers",
                        help="export the newest valid EMA params of this workdir to a diffusers folder")
    source.add_argument("--autoencoder-kl", metavar="DIR", dest="autoencoder_kl",
                        help="diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.*), "
                             "e.g. a local snapshot of stabilityai/sd-vae-ft-mse")
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output directory")
    parser.add_argument("--var-type", dest="var_type", default=None,
                        choices=("fixedlarge", "fixedsmall", "learned", "learned_range"),
                        help="--to-diffusers: the reverse variance for scheduler_config.json (default: the "
                             "workdir's config.json diffusion.var_type; for a converted checkpoint learned_range "
                             "for a 2C-channel output, else fixedlarge)")
    parser.add_argument("--checkpoint-step", dest="checkpoint_step", type=int, default=-1, metavar="N",
                        help="--to-diffusers: the checkpoint to export (default -1: the newest valid one)")
    args = parser.parse_args(argv)
    try:
        if args.to_diffusers:
            step, meta = export_workdir(args.to_diffusers, args.out, var_type=args.var_type,
                                        step=args.checkpoint_step)
            print(f"wrote {args.out}: config.json, diffusion_pytorch_model.safetensors and scheduler_config.json "
                  f"of step {step} (UNet {meta.model_kwargs.get('ch')} channels, images {meta.data_shape}).")
            classes = int(meta.model_kwargs.get("num_classes", 0))
            if classes:
                print(f"class labels 0..{classes - 1}; label {classes} is the null class (unconditional, for "
                      "classifier-free guidance), hence num_class_embeds "
                      f"{classes + 1}.")
            print(f"load with: diffusers.UNet2DModel.from_pretrained({args.out!r})")
            return 0
        if args.autoencoder_kl:
            info = convert_autoencoder_kl(args.autoencoder_kl, args.out)
            print(f"wrote {args.out}: AutoencoderKL({', '.join(f'{k}={v}' for k, v in info['model_kwargs'].items())}), "
                  f"images {info['image_shape']} -> latents {info['latent_shape']}, scale factor "
                  f"{info['scale_factor']:g}, latent mean {info['latent_mean']:g}.")
            return 0
        meta = convert_diffusers(args.diffusers, args.out)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: UNet({', '.join(f'{k}={v}' for k, v in meta.model_kwargs.items())}), "
          f"images {meta.data_shape}, schedule {meta.schedule}, pred {meta.pred}.")
    print(f"sample with: python -m ddpm_jax.main --config=CONFIG --workdir={args.out} --mode=sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
