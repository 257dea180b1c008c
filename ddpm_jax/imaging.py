"""Images in and out: [-1, 1] floats -> uint8, grids, PNG / GIF files, 2-D scatter plots."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ddpm_jax import files


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Maps [-1, 1] floats to uint8 [0, 255] (clipped, rounded as the paper's code)."""
    x = np.asarray(x, np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(x, np.float32) / 127.5 - 1.0


def as_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 [-1, 1] (`from_uint8`); arrays already float (or 2-D points) as float32."""
    x = np.asarray(x)
    return from_uint8(x) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


def is_image_shape(shape: Sequence[int]) -> bool:
    """True for an example shape [H, W, C] (images), False for points [D] (2-D toy data)."""
    return len(tuple(shape)) == 3


def box_downsample(x, factor: int, field: str = "factor"):
    """Area (box) downsampling of images [..., H, W, C] by `factor`: the mean of each f×f block.

    Linear, exact on constant blocks, and nearest upsampling of its output downsamples back to
    it; numpy or jax arrays. `field` names the factor's config field in the one-line errors.
    """
    f, shape = int(factor), np.shape(x)
    if len(shape) < 3:
        raise ValueError(f"{field}={factor} needs images [H, W, C], but the examples have shape {shape}; "
                         f"set --config.{field}=0.")
    h, w = shape[-3] // max(f, 1), shape[-2] // max(f, 1)
    if f < 1 or h * f != shape[-3] or w * f != shape[-2]:
        raise ValueError(f"{field}={factor} must be >= 1 and divide the image size {shape[-3]}x{shape[-2]}; "
                         "pick a divisor (2 for 8x8 digits, 2 for 28x28 MNIST).")
    blocks = x.reshape(*shape[:-3], h, f, w, f, shape[-1])
    return blocks.mean(axis=(-4, -2))


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tiles [N, H, W, C] images (uint8, or floats in [-1, 1]) into one uint8 [H', W', C] grid.

    `ncol` defaults to ceil(sqrt(N)); empty cells are left at `pad_value`.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"make_grid wants [N, H, W, C] images, got shape {images.shape}.")
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, c = images.shape
    ncol = int(ncol or math.ceil(math.sqrt(n)))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an [H, W, C] image (8x8 digits are unreadable at 1x)."""
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _to_pil_array(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = to_uint8(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return image


def save_png(path: str, image: np.ndarray) -> str:
    """Writes an [H, W, C] (C = 1 or 3) or [H, W] image; floats are taken as [-1, 1]."""
    from PIL import Image

    return files.write_image_file(path, lambda f: Image.fromarray(_to_pil_array(image)).save(f, format="PNG"))


def save_gif(path: str, frames: np.ndarray, fps: float = 10.0, loop: int = 0) -> str:
    """Writes [K, H, W, C] frames (uint8 or [-1, 1] floats) as an animated GIF."""
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim < 3 or len(frames) == 0:
        raise ValueError(f"save_gif wants [K, H, W, C] frames with K >= 1, got shape {frames.shape}.")
    pics = [Image.fromarray(_to_pil_array(f)) for f in frames]
    duration = max(int(round(1000.0 / fps)), 20)
    return files.write_image_file(
        path,
        lambda f: pics[0].save(
            f, format="GIF", save_all=True, append_images=pics[1:], duration=duration, loop=loop
        ),
    )


def class_grid(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A uint8 picture with one row per class: row k holds the images of the k-th smallest label
    (in index order), rows padded with blank cells to the longest; small images enlarged."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"class_grid needs one label per image, got {labels.shape} for {len(images)} images.")
    rows = [np.asarray(images)[labels == c] for c in np.unique(labels)]
    ncol = max(len(r) for r in rows)
    blank = np.ones((1, *np.asarray(images).shape[1:]), np.float32)  # white in [-1, 1]
    cells = np.concatenate([np.concatenate([as_float(r)] + [blank] * (ncol - len(r))) for r in rows])
    grid = make_grid(cells, ncol=ncol)
    return upscale(grid, max(1, 512 // max(grid.shape[:2])))


def caption_grid(images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """`class_grid` with one row per distinct caption (in order of first use), the caption written
    to the left of its row."""
    from PIL import Image, ImageDraw, ImageFont

    order = list(dict.fromkeys(captions))
    grid = class_grid(images, np.asarray([order.index(c) for c in captions]))
    row = grid.shape[0] / len(order)
    font = ImageFont.load_default()
    width = 8 + max(int(ImageDraw.Draw(Image.new("L", (1, 1))).textlength(c or "(null caption)", font=font))
                    for c in order)
    strip = Image.new("RGB", (width, grid.shape[0]), "white")
    draw = ImageDraw.Draw(strip)
    for k, caption in enumerate(order):
        draw.text((4, int((k + 0.5) * row) - 5), caption or "(null caption)", fill="black", font=font)
    picture = _to_pil_array(grid)
    picture = np.repeat(picture[..., None], 3, -1) if picture.ndim == 2 else picture[..., :3]
    return np.concatenate([np.asarray(strip), picture], axis=1)


def grid_image(samples: np.ndarray, reference: np.ndarray | None = None, title: str = "") -> np.ndarray:
    """A uint8 picture of samples: an image grid (small images enlarged) or a 2-D scatter plot."""
    if not is_image_shape(samples.shape[1:]):
        return scatter_image(samples, reference=reference, title=title)
    grid = make_grid(samples)
    return upscale(grid, max(1, 512 // max(grid.shape[:2])))


def scatter_image(
    points: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    title: str = "",
    size_px: int = 384,
    lim: float | None = None,
) -> np.ndarray:
    """Renders 2-D points (and optional reference points in grey) as a uint8 [H, W, 3] image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = np.asarray(points, np.float32).reshape(-1, 2)
    dpi = 96
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if reference is not None:
        ref = np.asarray(reference, np.float32).reshape(-1, 2)
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", linewidths=0)
    ax.scatter(points[:, 0], points[:, 1], s=3, c="tab:blue", linewidths=0)
    if lim is None:
        lim = float(np.max(np.abs(points))) * 1.05 if points.size else 1.0
        lim = min(max(lim, 1.0), 10.0)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def scatter_frames(trajectory: np.ndarray, titles: Sequence[str], lim: float | None = None) -> np.ndarray:
    """One scatter image per frame of a [K, N, 2] trajectory (for GIFs of 2-D sampling)."""
    trajectory = np.asarray(trajectory)
    if lim is None:
        lim = min(max(float(np.max(np.abs(trajectory[-1]))) * 1.05, 1.0), 10.0)
    return np.stack([scatter_image(f, title=t, lim=lim) for f, t in zip(trajectory, titles)])


def scatter_row(
    rows: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    row_labels: Sequence[str] = (),
    reference: np.ndarray | None = None,
    panel_px: int = 150,
    lim: float | None = None,
    max_points: int = 5000,
) -> np.ndarray:
    """One figure of K scatter panels per row: each of `rows` is a [K, N, 2] trajectory.

    The tutorial's picture of the reverse chain: x_T ... x_0 left to right (and, as a second
    row, e.g. the predicted x_0 at the same steps). `reference` points (grey) are drawn
    under the last panel of each row. At most `max_points` points per panel are drawn.
    Returns a uint8 [H, W, 3] image.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [np.asarray(r, np.float32)[:, :max_points] for r in rows]
    if not rows or any(r.ndim != 3 or r.shape[-1] != 2 for r in rows):
        raise ValueError(f"scatter_row wants [K, N, 2] trajectories, got shapes {[r.shape for r in rows]}.")
    k = rows[0].shape[0]
    if any(r.shape[0] != k for r in rows) or len(titles) != k:
        raise ValueError(f"every row needs the same {k} panels and {k} titles; got "
                         f"{[r.shape[0] for r in rows]} panels and {len(titles)} titles.")
    if lim is None:
        lim = min(max(float(np.percentile(np.abs(rows[0][-1]), 99.5)) * 1.15, 1.0), 10.0)
    dpi = 100
    fig = Figure(figsize=(k * panel_px / dpi, len(rows) * panel_px / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), k, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(k):
            ax = axes[i, j]
            if reference is not None and j == k - 1:
                ref = np.asarray(reference, np.float32).reshape(-1, 2)[:max_points]
                ax.scatter(ref[:, 0], ref[:, 1], s=0.5, c="0.8", linewidths=0, rasterized=True)
            ax.scatter(row[j, :, 0], row[j, :, 1], s=0.5, c="tab:blue", linewidths=0, alpha=0.6)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
            if j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=8)
    fig.subplots_adjust(left=0.02 if not row_labels else 0.04, right=0.995, bottom=0.01, top=0.9,
                        wspace=0.04, hspace=0.04)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of uint8 images (or [-1, 1] floats, mapped with to_uint8)."""
    a, b = np.asarray(image), np.asarray(reference)
    a = a if a.dtype == np.uint8 else to_uint8(a)
    b = b if b.dtype == np.uint8 else to_uint8(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of one shape, got {a.shape} and {b.shape}.")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
