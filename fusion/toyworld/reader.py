"""Read an image back into a scene: palette segmentation, connected components, shape from
fill ratio, grid cell from centroid. No learned judge: the same reader scores every model.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

from fusion.toyworld.scenes import BACKGROUND, PALETTE, Obj, Scene

_NAMES = ["background", *PALETTE]
_COLOURS = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float32)


def segment(img: Image.Image, max_dist: float = 90.0) -> np.ndarray:
    """Per-pixel palette index (0 = background, -1 = no palette colour within ``max_dist``)."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32)
    d = np.linalg.norm(x[:, :, None, :] - _COLOURS[None, None], axis=-1)
    idx = d.argmin(-1)
    idx[d.min(-1) > max_dist] = -1
    return idx


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        q, pts = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            pts.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        out.append(np.array(pts))
    return out


def classify_shape(pts: np.ndarray) -> str:
    """square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5 of the bounding box."""
    ys, xs = pts[:, 0], pts[:, 1]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(pts) / box
    if fill > 0.9:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def read_scene(img: Image.Image, min_area_frac: float = 0.01) -> Scene:
    """The scene an image shows; components smaller than ``min_area_frac`` of the image are noise.

    Two components in one cell keep the larger (the scene model allows one object per cell).
    """
    seg = segment(img)
    h, w = seg.shape
    min_area = max(4, int(min_area_frac * h * w))
    found: dict[tuple[int, int], tuple[int, Obj]] = {}
    for ci in range(1, len(_NAMES)):
        for pts in components(seg == ci):
            if len(pts) < min_area:
                continue
            cy, cx = pts[:, 0].mean(), pts[:, 1].mean()
            row, col = min(2, int(cy / (h / 3))), min(2, int(cx / (w / 3)))
            obj = Obj(classify_shape(pts), _NAMES[ci], row, col)
            if (row, col) not in found or found[(row, col)][0] < len(pts):
                found[(row, col)] = (len(pts), obj)
    return tuple(sorted(o for _, o in found.values()))
