"""Convert pytorch-fid's FID Inception state dict (.pth) into our .npz, once.

    python -m ddpm_jax.evaluation.convert_inception \
        --pth pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

The .pth is pytorch-fid's port of the 2015-12-05 TensorFlow Inception graph,
released at ``inception.FID_WEIGHTS_URL``. PyTorch is needed for this step only
(to unpickle the .pth); ``inception.load_inception`` reads the .npz without it.
The .npz holds flattened Flax variable paths (``params/Mixed_5b/branch1x1/conv/kernel``,
``batch_stats/.../bn/mean``, ...) plus a ``format`` tag.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ddpm_jax import files
from ddpm_jax.evaluation import inception

# Keys of torchvision's Inception3 that the FID network does not use.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_IGNORED_PREFIXES = ("AuxLogits.",)


def _import_torch():
    try:
        import torch  # noqa: PLC0415 (optional dependency, conversion only)
    except ImportError as e:
        raise ImportError("convert_inception needs PyTorch to read the .pth (conversion only): "
                          "pip install torch (the CPU build is enough); loading the converted "
                          ".npz does not need it") from e
    return torch


def convert_state_dict(state_dict: dict) -> dict[str, np.ndarray]:
    """pytorch-fid / torchvision Inception3 state dict → flattened Flax variables (float32)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES) or key.startswith(_IGNORED_PREFIXES):
            continue
        v = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value,
                       dtype=np.float32)
        *module, leaf = key.split(".")
        prefix = "/".join(module)
        if module == ["fc"]:
            if leaf == "weight":      # torch Linear [out, in] → Dense kernel [in, out]
                flat["params/fc/kernel"] = v.T
            elif leaf == "bias":
                flat["params/fc/bias"] = v
            else:
                raise ValueError(f"unexpected key {key!r} in the Inception state dict")
        elif module[-1] == "conv" and leaf == "weight":
            # torch OIHW → Flax HWIO.
            flat[f"params/{prefix}/kernel"] = v.transpose(2, 3, 1, 0)
        elif module[-1] == "bn":
            name = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                    "running_mean": ("batch_stats", "mean"),
                    "running_var": ("batch_stats", "var")}.get(leaf)
            if name is None:
                raise ValueError(f"unexpected key {key!r} in the Inception state dict")
            flat[f"{name[0]}/{prefix}/{name[1]}"] = v
        else:
            raise ValueError(f"unexpected key {key!r} in the Inception state dict; is this "
                             f"pytorch-fid's {inception.FID_WEIGHTS_PTH}?")
    return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def convert(pth_path: str, out_path: str) -> dict[str, np.ndarray]:
    """Read ``pth_path`` (needs torch), check it against the network, write ``out_path``."""
    if not os.path.isfile(pth_path):
        raise FileNotFoundError(f"{pth_path!r} not found: download {inception.FID_WEIGHTS_URL} "
                                f"and pass its path to --pth")
    torch = _import_torch()
    state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{pth_path!r} holds a {type(state_dict).__name__}, not a state dict; "
                         f"pass pytorch-fid's {inception.FID_WEIGHTS_PTH}")
    flat = convert_state_dict(state_dict)
    inception.check_variables(flat, repr(pth_path))
    files.write_npz(out_path, format=np.asarray(inception.FORMAT_TAG), **flat)
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.evaluation.convert_inception",
        description=f"Convert pytorch-fid's {inception.FID_WEIGHTS_PTH} "
                    f"({inception.FID_WEIGHTS_URL}) into the .npz that load_inception reads.")
    parser.add_argument("--pth", required=True, help="pytorch-fid's FID Inception state dict")
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args(argv)
    try:
        flat = convert(args.pth, args.out)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.size for k, v in flat.items() if k.startswith("params/"))
    print(f"wrote {args.out}: {len(flat)} arrays, {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
