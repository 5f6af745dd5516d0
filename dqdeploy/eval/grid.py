"""Save a batch of images in [-1, 1] as one PNG grid."""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes
from ..errors import DQDeployError


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, *, padding: int = 2,
              scale: int = 1, pad_value: float = 0.0) -> Path:
    """Write ``images`` ``[N, C, H, W]`` (C = 1 or 3, values in [-1, 1]) as a PNG grid, atomically.

    ``nrow`` images per row (default ``ceil(sqrt(N))``); each tile is upscaled ``scale`` times
    (nearest neighbour) and the grid is ``padding`` pixels of ``pad_value`` between and around tiles.
    The PNG is ``ncol * (W*scale + padding) + padding`` pixels wide, likewise high.
    """
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
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
    img = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(Path(path), buf.getvalue())
