"""Save a batch of images in [-1, 1] as one PNG grid."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..core.errors import DQDeployError
from ..io.atomic import atomic_write_bytes


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, *, padding: int = 2,
              scale: int = 1, pad_value: float = 0.0) -> Path:
    """Write ``images`` ``[N, C, H, W]`` (C = 1 or 3, values in [-1, 1]) as a PNG grid, atomically
    (layout: :func:`grid_image`)."""
    return _write_png(grid_image(images, nrow, padding=padding, scale=scale, pad_value=pad_value), path)


def _write_png(img, path: str | Path) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "dqdeploy")  # marks the file as dqdeploy's (paths.own_file): --overwrite may replace it
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return atomic_write_bytes(Path(path), buf.getvalue())


def grid_image(images: torch.Tensor, nrow: int | None = None, *, padding: int = 2, scale: int = 1,
               pad_value: float = 0.0):
    """``images`` ``[N, C, H, W]`` (C = 1 or 3, values in [-1, 1]) as one PIL image.

    ``nrow`` images per row (default ``ceil(sqrt(N))``); each tile is upscaled ``scale`` times
    (nearest neighbour) and the grid is ``padding`` pixels of ``pad_value`` between and around tiles.
    The PNG is ``ncol * (W*scale + padding) + padding`` pixels wide, likewise high.
    """
    from PIL import Image

    if (not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0
            or images.shape[1] not in (1, 3)):
        raise DQDeployError(f"save_grid expects images [N, 1 or 3, H, W], found "
                            f"{getattr(images, 'shape', type(images).__name__)}")
    if scale < 1 or padding < 0 or (nrow is not None and nrow < 1):
        raise DQDeployError(f"save_grid needs scale >= 1, padding >= 0, nrow >= 1; found {scale}, {padding}, {nrow}")
    n, c, h, w = images.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    x = images.detach().float().cpu().nan_to_num(0.0).clamp(-1, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    th, tw = h * scale, w * scale
    grid = torch.full((c, nrows * (th + padding) + padding, ncol * (tw + padding) + padding), float(pad_value))
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = padding + r * (th + padding), padding + k * (tw + padding)
        grid[:, top:top + th, left:left + tw] = x[i]
    pixels = ((grid + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)


def save_side_by_side(panels: dict[str, torch.Tensor], path: str | Path, nrow: int | None = None,
                      scale: int = 1, gap: int = 8) -> Path:
    """Write one PNG with a labelled grid per entry of ``panels`` (e.g. ``{"FP": a, "W8A8": b}``),
    left to right, all with the same layout; atomically."""
    from PIL import Image, ImageDraw

    if not panels:
        raise DQDeployError("save_side_by_side needs at least one panel of images")
    tiles = [grid_image(images, nrow, scale=scale).convert("RGB") for images in panels.values()]
    header = 14
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, header + max(t.height for t in tiles)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = 0
    for label, tile in zip(panels, tiles):
        draw.text((left + 2, 1), label, fill=(0, 0, 0))
        canvas.paste(tile, (left, header))
        left += tile.width + gap
    return _write_png(canvas, path)
