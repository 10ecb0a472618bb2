"""Result nodes are tagged with the input volume they belong to, so a re-run replaces them.

Each result node carries
- a node reference ``CRADL.Input`` to the input volume (kept valid by MRML when a saved scene is
  loaded again and node IDs change), and
- attributes ``CRADL.InputVolumeID`` (the input's ID when the node was made) and ``CRADL.Role``.
"""
from __future__ import annotations

from contextlib import contextmanager

INPUT_REFERENCE = "CRADL.Input"
ATTR_INPUT_ID = "CRADL.InputVolumeID"
ATTR_ROLE = "CRADL.Role"

# Roles of the result nodes made for one input.
HEATMAP = "heatmap"
REPORT = "report"
SLICE_TABLE = "sliceScoresTable"
SLICE_SERIES = "sliceScoresSeries"
SLICE_THRESHOLD_SERIES = "sliceScoresThresholdSeries"
SLICE_CHART = "sliceScoresChart"
REGION_TABLE = "regionsTable"
SEGMENTATION = "segmentation"

_ROLE_SUFFIX = {
    HEATMAP: "anomaly heatmap",
    REPORT: "anomaly report",
    SLICE_TABLE: "slice scores",
    SLICE_SERIES: "slice scores",
    SLICE_THRESHOLD_SERIES: "normal range",
    SLICE_CHART: "slice scores",
    REGION_TABLE: "anomaly regions",
    SEGMENTATION: "anomaly regions",
}


@contextmanager
def temporaryNodes(scene):
    """Remove every node added to the scene inside the block (temporary label maps and the colour
    tables / display nodes that export and import create for them), except singletons such as the
    subject hierarchy."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(added):
            if node is None or node.GetID() in before or node.GetSingletonTag():
                continue
            if node.IsA("vtkMRMLSubjectHierarchyNode"):
                continue
            scene.RemoveNode(node)


def nodesByClass(scene, className) -> list:
    """The scene's nodes of ``className`` as a list.

    ``vtkMRMLScene.GetNodesByClass`` returns a new collection that the caller owns: unless it is
    released, it keeps a reference to every node in it for ever (a deleted volume stays in memory).
    ``slicer.util.getNodesByClass`` releases it but reads ``slicer.mrmlScene`` whatever scene it is
    given, so the bridge, which takes its scene explicitly, does the same release here."""
    collection = scene.GetNodesByClass(className)
    collection.UnRegister(None)  # the Python wrapper now holds the only reference
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def isResultNode(node) -> bool:
    """True for any node CRADL made (heatmap, tables, report, ...): never an input for detection."""
    return node is not None and bool(node.GetAttribute(ATTR_ROLE))


def resultNodeIDs(scene, className: str = "vtkMRMLNode") -> list:
    """IDs of every CRADL result node of ``className`` (e.g. to hide them from an input selector)."""
    return [node.GetID() for node in nodesByClass(scene, className) if isResultNode(node)]


def findResultNodes(scene, inputNode, role: str | None = None) -> list:
    found = []
    for node in nodesByClass(scene, "vtkMRMLNode"):
        nodeRole = node.GetAttribute(ATTR_ROLE)
        if not nodeRole or (role is not None and nodeRole != role):
            continue
        owner = node.GetNodeReference(INPUT_REFERENCE)
        if owner is inputNode or (owner is None and node.GetAttribute(ATTR_INPUT_ID) == inputNode.GetID()):
            found.append(node)
    return found


def findResultNode(scene, inputNode, role: str):
    nodes = findResultNodes(scene, inputNode, role)
    return nodes[0] if nodes else None


def tagResultNode(node, inputNode, role: str):
    node.SetAttribute(ATTR_ROLE, role)
    node.SetAttribute(ATTR_INPUT_ID, inputNode.GetID())
    node.SetNodeReferenceID(INPUT_REFERENCE, inputNode.GetID())
    return node


def resultNodeName(inputNode, role: str) -> str:
    return f"{inputNode.GetName()} {_ROLE_SUFFIX[role]}"


def getOrCreateResultNode(scene, inputNode, role: str, className: str, created: list | None = None):
    """This input's node for ``role``; created (and tagged) when missing.

    Extra duplicates (e.g. from an older scene) are removed so exactly one node per role remains.
    Newly created nodes are appended to ``created`` so a caller can roll back after an error.
    """
    existing = [n for n in findResultNodes(scene, inputNode, role) if n.IsA(className)]
    for stale in findResultNodes(scene, inputNode, role):
        if stale not in existing[:1]:
            removeNodeAndDisplay(scene, stale)
    if existing:
        node = existing[0]
        node.SetName(resultNodeName(inputNode, role))
        return node
    node = scene.AddNewNodeByClass(className, resultNodeName(inputNode, role))
    tagResultNode(node, inputNode, role)
    if created is not None:
        created.append(node)
    return node


def removeNodeAndDisplay(scene, node):
    if node is None or node.GetScene() is not scene:
        return
    if node.IsA("vtkMRMLDisplayableNode"):
        for i in reversed(range(node.GetNumberOfDisplayNodes())):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                scene.RemoveNode(display)
    if node.IsA("vtkMRMLStorableNode"):
        storage = node.GetStorageNode()
        if storage is not None:
            scene.RemoveNode(storage)
    scene.RemoveNode(node)


def removeResultNodes(scene, inputNode, roles=None) -> int:
    """Remove this input's result nodes (all roles, or only ``roles``). Returns how many."""
    nodes = [n for n in findResultNodes(scene, inputNode) if roles is None or n.GetAttribute(ATTR_ROLE) in roles]
    for node in nodes:
        removeNodeAndDisplay(scene, node)
    return len(nodes)
