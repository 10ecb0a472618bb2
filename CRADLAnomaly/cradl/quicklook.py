"""A three-plane quick-look PNG: axial, coronal and sagittal planes through the top region, the heatmap
blended over the scan in a perceptually ordered colour map, with a colour bar."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from .atomic import atomic_path
from .colormap import heat_over_grey, heat_rgb, heat_scale
from .space import ras_to_lps

PANEL = 256


def _orient(image: sitk.Image) -> np.ndarray:
    """Array indexed [superior->inferior, anterior->posterior, right->left]: radiological display order
    (superior at the top, the patient's right on the left) whatever the file's orientation."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPI"))


def _panel(plane: np.ndarray, heat: np.ndarray, aspect: float, threshold: float, vmax: float) -> Image.Image:
    picture = Image.fromarray(heat_over_grey(plane, heat, threshold, vmax))
    h, w = plane.shape
    scale = PANEL / max(h * aspect, w)
    picture = picture.resize((max(1, int(w * scale)), max(1, int(h * aspect * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (PANEL, PANEL))
    canvas.paste(picture, ((PANEL - picture.width) // 2, (PANEL - picture.height) // 2))
    return canvas


def write_quicklook(image: sitk.Image, heatmap: sitk.Image, path, centre_ras=None, threshold: float = 1.0,
                    title: str = "") -> None:
    """Write the quick-look to `path` (atomically). `centre_ras` picks the planes; default: heatmap maximum."""
    oriented = sitk.DICOMOrient(image, "LPI")
    scan, heat = _orient(image), _orient(heatmap)
    if centre_ras is not None:
        index = oriented.TransformPhysicalPointToIndex([float(v) for v in ras_to_lps(centre_ras)])
        x, y, z = (int(np.clip(i, 0, s - 1)) for i, s in zip(index, oriented.GetSize()))
    else:
        z, y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    sx, sy, sz = oriented.GetSpacing()
    vmax = heat_scale(heat, threshold)
    panels = [_panel(scan[z], heat[z], sy / sx, threshold, vmax),
              _panel(scan[:, y, :], heat[:, y, :], sz / sx, threshold, vmax),
              _panel(scan[:, :, x], heat[:, :, x], sz / sy, threshold, vmax)]
    bar_h = 40
    sheet = Image.new("RGB", (3 * PANEL, PANEL + bar_h), "black")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * PANEL, 0))
    ramp = heat_rgb(np.linspace(0, 1, 2 * PANEL))
    sheet.paste(Image.fromarray((np.tile(ramp[None], (10, 1, 1)) * 255).astype(np.uint8)), (PANEL // 2, PANEL + 6))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, PANEL + 4), "0", fill="white")
    draw.text((PANEL // 2, PANEL + 20), f"heatmap (threshold {threshold:.2f}, max {vmax:.2f})  {title}", fill="white")
    for label, i in (("axial", 0), ("coronal", 1), ("sagittal", 2)):
        draw.text((i * PANEL + 4, 4), label, fill="white")
    draw.text((4, 20), "R", fill="white")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
