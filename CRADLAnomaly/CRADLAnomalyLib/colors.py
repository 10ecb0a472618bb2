"""The heatmap colour table: transparent at low scores, then a perceptually ordered heat ramp.

Built procedurally (the slicer-core wheel lacks the application's file-based tables such as
Inferno, and a procedural table needs no file to ship). Colours are the core's heat ramp
(``cradl.colormap``: inferno from dark purple to pale yellow, as in the quick-look PNG); opacity
ramps up smoothly over the lowest part of the range so faint evidence fades into the anatomy
instead of tinting it.
"""
from __future__ import annotations

import numpy as np
from cradl.colormap import heat_rgb

COLOR_TABLE_NAME = "CRADL Anomaly Heat"
COLOR_TABLE_ATTRIBUTE = "CRADL.ColorTable"
NUMBER_OF_COLORS = 256

# The opacity ramp over the table.
TRANSPARENT_BELOW = 0.04   # fraction of the range that is fully transparent
OPAQUE_FROM = 0.40         # fraction of the range from which the colour is fully opaque


def heatRGBA(n: int = NUMBER_OF_COLORS) -> np.ndarray:
    """(n, 4) RGBA in [0, 1]: entry 0 (score 0) fully transparent, opacity rising with the score."""
    t = np.linspace(0.0, 1.0, n)
    rgb = heat_rgb(t)
    ramp = np.clip((t - TRANSPARENT_BELOW) / (OPAQUE_FROM - TRANSPARENT_BELOW), 0.0, 1.0)
    alpha = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep
    return np.concatenate([rgb, alpha[:, None]], axis=1)


def getOrCreateHeatColorNode(scene):
    """The scene's heat colour table node (created once, reused by every heatmap)."""
    import slicer

    from .nodes import nodesByClass

    for node in nodesByClass(scene, "vtkMRMLColorTableNode"):
        if node.GetAttribute(COLOR_TABLE_ATTRIBUTE) == "heat":
            return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(COLOR_TABLE_NAME)
    node.SetAttribute(COLOR_TABLE_ATTRIBUTE, "heat")
    node.SetTypeToUser()
    node.SetNumberOfColors(NUMBER_OF_COLORS)
    rgba = heatRGBA(NUMBER_OF_COLORS)
    for i, (r, g, b, a) in enumerate(rgba):
        node.SetColor(i, f"{i / (NUMBER_OF_COLORS - 1):.3f}", float(r), float(g), float(b), float(a))
    node.SetDescription("CRADL anomaly heatmap: transparent at low scores, inferno-like heat above.")
    scene.AddNode(node)
    return node


def colorNodeRGBA(colorNode) -> np.ndarray:
    """(n, 4) RGBA array read back from a colour table node (for legends and tests)."""
    n = colorNode.GetNumberOfColors()
    out = np.zeros((n, 4))
    for i in range(n):
        rgba = [0.0, 0.0, 0.0, 0.0]
        colorNode.GetColor(i, rgba)
        out[i] = rgba
    return out


def legendImage(height: int = 256, width: int = 24, rgba: np.ndarray | None = None,
                background=(0, 0, 0)) -> np.ndarray:
    """A vertical legend bar (uint8 RGB, high scores at the top) over ``background``, for panels and
    screenshots: the transparent low end blends into the background exactly as over dark anatomy."""
    rgba = heatRGBA() if rgba is None else rgba
    t = np.linspace(1.0, 0.0, height)
    idx = np.clip(np.round(t * (len(rgba) - 1)).astype(int), 0, len(rgba) - 1)
    colours = rgba[idx]
    bg = np.asarray(background, dtype=float)[None, :] / 255.0
    rgb = colours[:, :3] * colours[:, 3:4] + bg * (1.0 - colours[:, 3:4])
    bar = np.repeat(rgb[:, None, :], width, axis=1)
    return np.clip(np.round(bar * 255), 0, 255).astype(np.uint8)
