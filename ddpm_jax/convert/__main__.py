"""`python -m ddpm_jax.convert --diffusers DIR --out DIR`: released DDPM weights -> ddpm_jax checkpoint."""

from __future__ import annotations

import argparse
import sys

from ddpm_jax.convert import convert_diffusers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.convert", description=__doc__)
    parser.add_argument("--diffusers", required=True, metavar="DIR",
                        help="diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.*), "
                             "e.g. a local snapshot of google/ddpm-cifar10-32")
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) checkpoint directory")
    args = parser.parse_args(argv)
    try:
        meta = convert_diffusers(args.diffusers, args.out)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: UNet({', '.join(f'{k}={v}' for k, v in meta.model_kwargs.items())}), "
          f"images {meta.data_shape}, schedule {meta.schedule}, pred {meta.pred}.")
    var_type = meta.source.get("var_type", "fixedlarge")
    flag = f" --config.diffusion.var_type={var_type}" if var_type in ("learned", "learned_range") else ""
    print(f"sample with: python -m ddpm_jax.main --config=CONFIG --workdir={args.out} --mode=sample{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
