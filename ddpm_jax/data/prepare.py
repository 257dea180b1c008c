"""Prepare a tensorflow-datasets dataset once, as ArrayRecord files grain can read.

    python -m ddpm_jax.data.prepare --dataset=cifar10 --data_dir=$HOME/tensorflow_datasets

Writing the records needs TensorFlow (`pip install -r requirements-tf.txt`);
training afterwards reads them without it (``--config.data.source=tfds
--config.data.tfds_name=cifar10 --config.data.tfds_data_dir=DIR``). What the
paper's datasets need:

* ``cifar10``: downloads by itself.
* ``celeb_a_hq/256``: a manual download (the CelebA-HQ tar files made with the
  progressive GAN tools) placed in ``DATA_DIR/downloads/manual`` or ``--manual_dir``.
* ``lsun/church_outdoor``, ``lsun/bedroom``, ``lsun/cat``: download the LMDB
  archives from http://dl.yf.io/lsun/ and also need ``pip install tensorflow-io``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from ddpm_jax.data import tfds_source


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.data.prepare",
        description="Prepare a tfds dataset as ArrayRecord files (needs TensorFlow, once).",
    )
    parser.add_argument("--dataset", required=True, help="tfds name, e.g. cifar10, celeb_a_hq/256, lsun/church_outdoor")
    parser.add_argument("--data_dir", default="", help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default="", help="folder with manually downloaded files (CelebA-HQ, LSUN)")
    return parser.parse_args(argv)


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None) -> dict[str, int]:
    """Downloads (where tfds can) and writes ``dataset`` as ArrayRecord; returns examples per split.

    Raises ValueError for an unknown dataset and RuntimeError when TensorFlow is missing.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(dataset, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown tfds dataset {dataset!r}: use a tfds name such as cifar10, celeb_a_hq/256, "
            "lsun/church_outdoor, lsun/bedroom, lsun/cat."
        ) from None
    if builder.is_prepared() and builder.info.file_format is not None and (
        builder.info.file_format.value == "array_record"
    ):
        return {name: split.num_examples for name, split in builder.info.splits.items()}
    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError(
            f"Preparing tfds dataset {dataset!r} needs TensorFlow, which is not installed: run "
            "`pip install -r requirements-tf.txt` (once; training does not need it)."
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return {name: split.num_examples for name, split in builder.info.splits.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    note = tfds_source.prepare_note(args.dataset)
    if note:
        print(f"{args.dataset}: {note}")
    try:
        counts = prepare(args.dataset, args.data_dir or None, args.manual_dir or None)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or tfds_source.default_data_dir()
    print(f"{args.dataset} is prepared as ArrayRecord in {data_dir}: "
          + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"Train with: --config.data.source=tfds --config.data.tfds_name={args.dataset} "
          f"--config.data.tfds_data_dir={data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
