"""Headless review views: what a reviewer sees in Slicer's slice views, rendered to PNG.

Uses Slicer's own slice pipeline (vtkMRMLApplicationLogic + vtkMRMLSliceLogic, background input,
foreground heatmap through its colour table, threshold and opacity), so the pictures show the real
blending, not an imitation. The legend and labels are drawn with Pillow (screenshots only).

Make the README screenshots (needs a model; the bundled default one when --model is omitted):

    python -m CRADLAnomalyLib.render --out Resources/Screenshots        # from CRADLAnomaly/
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

VIEWS = (("Red", "Axial"), ("Green", "Coronal"), ("Yellow", "Sagittal"))


class ReviewScene:
    """A scene with the application logic, colour tables and the three slice views (the logics are
    kept here: they must live as long as the scene is rendered)."""

    def __init__(self, scene, appLogic, colorLogic, sliceLogics):
        self.scene, self.appLogic, self.colorLogic, self.sliceLogics = scene, appLogic, colorLogic, sliceLogics


def newReviewScene(viewSize: int = 400) -> ReviewScene:
    """A scene with colour tables and the three standard slice views, as in the application."""
    import slicer

    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkMRMLApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(scene)
    sliceLogics = {}
    for layoutName, orientation in VIEWS:
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLScene(scene)
        sliceNode = sliceLogic.AddSliceNode(layoutName)
        sliceNode.SetOrientation(orientation)
        sliceNode.SetDimensions(viewSize, viewSize, 1)
        sliceLogics[layoutName] = sliceLogic
    appLogic.SetSliceLogics(_collection(sliceLogics.values()))
    return ReviewScene(scene, appLogic, colorLogic, sliceLogics)


def _collection(items):
    import vtk

    collection = vtk.vtkCollection()
    for item in items:
        collection.AddItem(item)
    return collection


def ensureGreyDisplay(volumeNode, window=None):
    """A grey display node with an automatic (or given) window, as the application creates on load."""
    import slicer

    display = volumeNode.GetDisplayNode()
    if display is None:
        scene = volumeNode.GetScene()
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        scene.AddNode(display)
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        volumeNode.SetAndObserveDisplayNodeID(display.GetID())
    array = slicer.util.arrayFromVolume(volumeNode)
    lo, hi = (np.percentile(array[array > 0], [0.5, 99.5]) if np.any(array > 0) else (0.0, 1.0)) \
        if window is None else window
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(float(lo), float(hi))
    return display


def renderSliceLogic(sliceLogic) -> np.ndarray:
    """The blended slice view as an RGB uint8 array (rows top to bottom)."""
    from vtk.util.numpy_support import vtk_to_numpy

    port = sliceLogic.GetImageDataConnection()
    producer = port.GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(port.GetIndex())
    dims = image.GetDimensions()
    scalars = vtk_to_numpy(image.GetPointData().GetScalars())
    rgba = scalars.reshape(dims[1], dims[0], -1)[::-1]
    rgb = rgba[..., :3].astype(float)
    if rgba.shape[-1] == 4:  # outside the volume is transparent: show black like the application
        rgb *= rgba[..., 3:4] / 255.0
    return np.clip(rgb, 0, 255).astype(np.uint8)


def renderViews(sliceLogics, centreRas=None, zoom: float = 1.0) -> dict:
    """Fit every view to the data (``zoom`` > 1 magnifies), move each slice plane through
    ``centreRas``, render."""
    images = {}
    for layoutName, orientation in VIEWS:
        sliceLogic = sliceLogics[layoutName]
        sliceLogic.FitSliceToAll()
        if zoom != 1.0:
            sliceNode = sliceLogic.GetSliceNode()
            fov = sliceNode.GetFieldOfView()
            sliceNode.SetFieldOfView(fov[0] / zoom, fov[1] / zoom, fov[2])
        if centreRas is not None:
            sliceLogic.GetSliceNode().JumpSliceByOffsetting(*[float(v) for v in centreRas])
        images[orientation] = renderSliceLogic(sliceLogic)
    return images


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "Arial.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except Exception:  # noqa: BLE001
        return ImageFont.load_default()


def legendPanel(height: int, displayMax: float, threshold: float, width: int = 122):
    """Colour legend with ticks, the threshold marked; returns a PIL image."""
    from PIL import Image, ImageDraw

    from .colors import legendImage

    panel = Image.new("RGB", (width, height), (18, 18, 22))
    draw = ImageDraw.Draw(panel)
    top, bottom, barX, barW = 34, height - 26, 46, 20
    bar = legendImage(bottom - top, barW, background=(18, 18, 22))
    panel.paste(Image.fromarray(bar), (barX, top))
    draw.rectangle([barX - 1, top - 1, barX + barW, bottom], outline=(150, 150, 150))
    small, tiny = _font(14), _font(12)
    draw.text((barX - 34, 8), "Anomaly", fill=(235, 235, 235), font=small)
    for value in np.linspace(0.0, displayMax, 5):
        y = bottom - (bottom - top) * value / displayMax
        draw.line([barX + barW, y, barX + barW + 5, y], fill=(200, 200, 200))
        draw.text((barX + barW + 8, y - 7), f"{value:.2g}", fill=(220, 220, 220), font=tiny)
    if 0 < threshold < displayMax:
        y = bottom - (bottom - top) * threshold / displayMax
        draw.line([barX - 4, y, barX + barW, y], fill=(90, 200, 255), width=2)
        draw.polygon([(barX - 4, y - 5), (barX - 4, y + 5), (barX + 2, y)], fill=(90, 200, 255))
        label = "shown"
        draw.text((barX - 8 - draw.textlength(label, font=tiny), y - 14), label, fill=(90, 200, 255), font=tiny)
        draw.text((barX - 8 - draw.textlength("above", font=tiny), y + 1), "above", fill=(90, 200, 255), font=tiny)
    return panel


def composeFigure(images: dict, displayMax: float, threshold: float, title: str = "", subtitle: str = ""):
    """Axial | coronal | sagittal with labels, plus the legend; returns a PIL image."""
    from PIL import Image, ImageDraw

    tiles = [Image.fromarray(images[name]) for _, name in VIEWS]
    h = max(t.height for t in tiles)
    header = 58 if title or subtitle else 0
    legend = legendPanel(h, displayMax, threshold)
    gap = 4
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1) + legend.width + gap
    figure = Image.new("RGB", (width, h + header), (18, 18, 22))
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((12, 8), title, fill=(240, 240, 240), font=_font(18))
    if subtitle:
        draw.text((12, 33), subtitle, fill=(190, 190, 190), font=_font(13))
    x = 0
    label = _font(15)
    colours = {"Axial": (242, 80, 80), "Coronal": (110, 200, 100), "Sagittal": (240, 210, 70)}
    for (_, name), tile in zip(VIEWS, tiles):
        figure.paste(tile, (x, header))
        draw.rectangle([x, header, x + 4, header + 22], fill=colours[name])
        draw.text((x + 10, header + 3), name, fill=(235, 235, 235), font=label)
        x += tile.width + gap
    figure.paste(legend, (x, header))
    return figure


def _headline(words: str, longest: int = 80) -> str:
    """The verdict for a one-line title: its first clause where the whole would not fit."""
    return words if len(words) <= longest else words.split(":")[0]


def renderReview(scene, sliceLogics, inputNode, heatmapNode, centreRas, title="", subtitle="", zoom=1.0):
    """Render the three views of an input with its heatmap overlay into a composed PIL figure."""
    from .display import heatmapDisplayMax, heatmapThreshold, showOverlay

    ensureGreyDisplay(inputNode)
    showOverlay(scene, inputNode, heatmapNode)
    images = renderViews(sliceLogics, centreRas, zoom)
    return composeFigure(images, heatmapDisplayMax(heatmapNode), heatmapThreshold(heatmapNode), title, subtitle), images


def _sampleCase(detector, case: str):
    """(image, lesion centre LPS or None, caption) for the screenshot."""
    import SimpleITK as sitk

    from .sample import resampleOblique, sampleScan

    if case == "sample":  # the bundled real sample: a held-out T1 head with a real stroke shape painted in
        from cradl.cli import SAMPLE_LESION, SAMPLE_SCAN

        mask = sitk.ReadImage(str(SAMPLE_LESION))
        index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0).mean(0)[::-1]
        lesion = np.array(mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
        return (sitk.ReadImage(str(SAMPLE_SCAN), sitk.sitkFloat32), lesion,
                "Real T1 head with skull (IXI033, held out) with a real stroke lesion shape painted in")
    if case == "template":
        image, lesion = sampleScan(detector.space.template)
        return image, lesion, "Model template with an inserted lesion on an oblique, flipped grid"
    if case == "synthetic":
        from cradl.synthetic.lesions import insert_anomaly
        from cradl.synthetic.scans import make_normal_scan

        rng = np.random.default_rng(2024)
        normal, labels = make_normal_scan(rng, contrast="t1")
        abnormal, mask = insert_anomaly(normal, labels, "tumour", 30.0, rng, contrast="t1")
        index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0).mean(0)[::-1]
        lesion = np.array(abnormal.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
        image = resampleOblique(abnormal, spacing=(1.2, 1.2, 1.5))
        return image, lesion, "Synthetic T1 with a 30 mm tumour (oblique, flipped grid)"
    image = sitk.ReadImage(case, sitk.sitkFloat32)
    return image, None, os.path.basename(case)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Render headless CRADL review views of a sample scan.")
    parser.add_argument("--model", default=None, help="model bundle (.cradl); default: the bundled model")
    parser.add_argument("--out", default="Resources/Screenshots", help="output folder for the PNGs")
    parser.add_argument("--size", type=int, default=360, help="pixels per view")
    parser.add_argument("--case", default="sample",
                        help="'sample' (the bundled real sample scan), 'synthetic' (the core's synthetic brain with "
                             "a tumour), 'template' (model template with a lesion) or a scan file")
    parser.add_argument("--show-above", type=float, default=None,
                        help="display threshold (default: the model's calibrated threshold)")
    parser.add_argument("--zoom", type=float, default=1.3, help="magnification after fitting the views")
    args = parser.parse_args(argv)

    import slicer  # noqa: F401
    from cradl import AnomalyDetector

    from . import geometry, pipeline, review
    detector = AnomalyDetector.load(args.model, device="cpu")
    image, lesionLps, caption = _sampleCase(detector, args.case)
    review_ = newReviewScene(args.size)
    scene, sliceLogics = review_.scene, review_.sliceLogics
    inputNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Sample T1")
    geometry.updateVolumeNodeFromImage(inputNode, image)
    result = pipeline.detectVolumeNode(scene, detector, inputNode)
    regions = result.report.get("regions") or []
    if regions:
        centre = regions[0]["centre_ras"]
    elif lesionLps is not None:
        centre = geometry._space().lps_to_ras(lesionLps)
    else:
        centre = geometry.rasOfVoxel(inputNode, np.array(image.GetSize()) // 2)
    info = detector.info
    from .display import setHeatmapThreshold

    shown = ""
    if args.show_above is not None:
        setHeatmapThreshold(result.heatmapNode, args.show_above)
        shown = f"; heatmap shown above {args.show_above:g} (calibrated threshold {result.report['threshold']:.2g})"
    figure, images = renderReview(
        scene, sliceLogics, inputNode, result.heatmapNode, centre, zoom=args.zoom,
        title=f"CRADL anomaly heatmap \u2014 {_headline(review.verdict(result.report))}",
        subtitle=f"{caption}; model {info['name']} {info['version']}"
                 f"{'; views through the top-ranked region' if regions else '; views through the lesion'}{shown}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "review_views.png")
    from cradl.atomic import atomic_path

    with atomic_path(path) as tmp:
        figure.save(tmp, format="PNG")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

