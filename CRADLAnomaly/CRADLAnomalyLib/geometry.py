"""Volume node <-> SimpleITK image, with the exact voxel-to-RAS geometry.

Slicer stores a volume's geometry in the node (IJKToRAS matrix, RAS world), SimpleITK in the image
(spacing, direction, origin, LPS world). The sign flip between RAS and LPS is done by
``cradl.space`` (the one place for it); here we only split and join the 4x4 matrix.

Parent transforms: the core must see the volume where the user sees it. A volume under a *linear*
transform is converted with its world geometry (as if the transform were hardened on a copy; the
input node is never modified). A non-linear parent transform is refused with a clear message.
"""
from __future__ import annotations

import numpy as np
import vtk

import slicer

from .errors import BridgeError

# Orthogonality tolerance for the IJK->RAS axes (relative to the voxel size).
_ORTHO_TOL = 1e-4


def _space():
    # Imported lazily: the core package pulls in torch, the geometry helpers themselves do not need it.
    from cradl import space
    return space


def matrixToArray(vmatrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[vmatrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def arrayToMatrix(array) -> vtk.vtkMatrix4x4:
    vmatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vmatrix.SetElement(r, c, float(array[r][c]))
    return vmatrix


def parentTransformToWorld(node) -> np.ndarray:
    """4x4 local->world matrix of a transformable node; identity without a parent transform.

    Raises BridgeError when the parent transform (or any above it) is not linear.
    """
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise BridgeError(
            f'"{node.GetName()}" is under the non-linear transform "{transformNode.GetName()}". '
            "Harden the transform first (Transforms module, 'Harden transform'), then run detection again.")
    vmatrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(vmatrix)
    return matrixToArray(vmatrix)


def ijkToRasArray(volumeNode, world: bool = True) -> np.ndarray:
    """The node's IJK->RAS matrix as a 4x4 array; with ``world`` the parent transform is applied."""
    vmatrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(vmatrix)
    ijkToRas = matrixToArray(vmatrix)
    if world:
        ijkToRas = parentTransformToWorld(volumeNode) @ ijkToRas
    return ijkToRas


def splitIjkToRas(ijkToRas: np.ndarray):
    """IJK->RAS 4x4 -> (spacing, direction columns in RAS (3x3), origin RAS). Refuses shear."""
    linear = np.asarray(ijkToRas, dtype=float)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(linear)):
        raise BridgeError("The volume has a degenerate voxel-to-world matrix (zero or non-finite spacing).")
    direction = linear / spacing
    gram = direction.T @ direction
    if np.max(np.abs(gram - np.eye(3))) > _ORTHO_TOL:
        raise BridgeError("The volume's voxel axes are not orthogonal (sheared geometry); "
                          "resample it to an orthogonal grid first (Resample Scalar Volume module).")
    return spacing, direction, np.asarray(ijkToRas, dtype=float)[:3, 3].copy()


def joinIjkToRas(spacing, direction, origin) -> np.ndarray:
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = np.asarray(direction, dtype=float) * np.asarray(spacing, dtype=float)
    ijkToRas[:3, 3] = origin
    return ijkToRas


def imageFromVolumeNode(volumeNode, world: bool = True, pixelType=None):
    """A SimpleITK image (LPS) holding a copy of the node's voxels on the node's exact grid.

    With ``world`` (default) a linear parent transform is included in the geometry, so the image is
    where the user sees the volume; a non-linear one raises BridgeError.
    """
    import SimpleITK as sitk

    if volumeNode is None:
        raise BridgeError("No volume selected.")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise BridgeError(f'"{volumeNode.GetName()}" has no voxel data.')
    if imageData.GetNumberOfScalarComponents() != 1:
        raise BridgeError(f'"{volumeNode.GetName()}" is a colour or vector volume; '
                          "a single-channel MRI volume is needed (use the Vector to Scalar Volume module).")
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    image = sitk.GetImageFromArray(array)
    if pixelType is not None:
        image = sitk.Cast(image, pixelType)
    spacing, directionRas, originRas = splitIjkToRas(ijkToRasArray(volumeNode, world=world))
    space = _space()
    # A direction column is a vector; the RAS<->LPS flip is linear, so the same conversion applies.
    directionLps = space.ras_to_lps(directionRas.T).T
    originLps = space.ras_to_lps(originRas)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in directionLps.ravel()])
    image.SetOrigin([float(v) for v in originLps])
    return image


def ijkToRasFromImage(image) -> np.ndarray:
    """IJK->RAS 4x4 of a SimpleITK image."""
    space = _space()
    directionLps = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    directionRas = space.lps_to_ras(directionLps.T).T
    originRas = space.lps_to_ras(np.array(image.GetOrigin(), dtype=float))
    return joinIjkToRas(image.GetSpacing(), directionRas, originRas)


def updateVolumeNodeFromImage(volumeNode, image, ijkToRas: np.ndarray | None = None):
    """Write a SimpleITK image's voxels into a node. Geometry from the image, or ``ijkToRas`` if given."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise BridgeError("Only 3D single-channel images can be shown as a volume.")
    array = sitk.GetArrayFromImage(image)
    slicer.util.updateVolumeFromArray(volumeNode, array)
    matrix = ijkToRasFromImage(image) if ijkToRas is None else ijkToRas
    volumeNode.SetIJKToRASMatrix(arrayToMatrix(matrix))
    return volumeNode


def sameGrid(imageA, imageB, tol: float = 1e-4) -> bool:
    return (tuple(imageA.GetSize()) == tuple(imageB.GetSize())
            and np.allclose(imageA.GetSpacing(), imageB.GetSpacing(), atol=tol)
            and np.allclose(imageA.GetOrigin(), imageB.GetOrigin(), atol=tol)
            and np.allclose(imageA.GetDirection(), imageB.GetDirection(), atol=tol))


def placeOnInputGrid(resultNode, inputNode, resultImage, inputImageWorld):
    """Put a result image (on the input's *world* grid) into ``resultNode`` sharing the input's node
    geometry: same local IJK->RAS and the same (linear) parent transform, so the result follows the
    input if the user edits that transform."""
    if not sameGrid(resultImage, inputImageWorld):
        raise BridgeError("Internal error: the result is not on the input's voxel grid.")
    updateVolumeNodeFromImage(resultNode, resultImage, ijkToRas=ijkToRasArray(inputNode, world=False))
    resultNode.SetAndObserveTransformNodeID(inputNode.GetTransformNodeID())
    return resultNode


def rasOfVoxel(volumeNode, ijk, world: bool = True) -> np.ndarray:
    ijkToRas = ijkToRasArray(volumeNode, world=world)
    return (ijkToRas @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]


def maskImageFromNode(maskNode, referenceVolumeNode, scene):
    """A brain-mask SimpleITK image (uint8, world geometry) from a label map or segmentation node.

    Segmentations are exported (all visible segments, union) onto the reference volume's grid with
    a temporary label map node that is removed afterwards.
    """
    import SimpleITK as sitk

    if maskNode is None:
        return None
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        from .nodes import temporaryNodes

        with temporaryNodes(scene):
            temp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__CRADL_temp_mask__")
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
                    maskNode, temp, referenceVolumeNode):
                raise BridgeError(f'Could not turn the segmentation "{maskNode.GetName()}" into a brain mask.')
            # The label map is exported on the reference volume's grid: give it the same parent transform.
            temp.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
            image = imageFromVolumeNode(temp)
    elif maskNode.IsA("vtkMRMLVolumeNode"):
        image = imageFromVolumeNode(maskNode)
    else:
        raise BridgeError("The brain mask must be a label map volume or a segmentation.")
    mask = sitk.Cast(image > 0, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(mask).max() == 0:
        raise BridgeError(f'The brain mask "{maskNode.GetName()}" is empty.')
    return mask
