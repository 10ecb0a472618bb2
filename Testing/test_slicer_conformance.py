"""Every Slicer-application name the module and its .ui use exists in every supported Slicer.

The application's API cannot run here, so its names are read from its sources once
(``slicer_api/build_name_lists.py`` -> ``slicer_api/names.json``: Slicer at each supported tag, the
CTK it pins and the PythonQt that CTK pins, with where each list came from). MRML and VTK names
are checked against the slicer-core wheel itself. Any name found in neither fails the test: this
is what would have caught ``qt.qRgb`` (PythonQt does not wrap it).
"""
from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CRADLAnomaly"
NAMES = json.loads((Path(__file__).resolve().parent / "slicer_api" / "names.json").read_text())
SOURCES = [MODULE / "CRADLAnomaly.py"] + sorted((MODULE / "CRADLAnomalyLib").glob("*.py"))
UI = MODULE / "Resources/UI/CRADLAnomaly.ui"
QOBJECT = "<QObject>"  # members only Qt's meta-object knows (Q_ENUM, properties, slots): not listed here


def _chain(node):
    """``a.b.c`` -> ["a", "b", "c"] (None when the chain does not start at a plain name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return [node.id] + parts if isinstance(node, ast.Name) else None


def usedChains(source: str):
    """Attribute chains rooted at qt, ctk, slicer or SampleData, and names imported from slicer."""
    tree = ast.parse(source)
    chains = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "_parent", None), ast.Attribute):
            chain = _chain(node)
            if chain and chain[0] in ("qt", "ctk", "slicer", "SampleData"):
                chains.add(tuple(chain))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slicer":
            for alias in node.names:
                chains.add(tuple(node.module.split(".") + [alias.name]))
        for child in ast.iter_child_nodes(node):
            child._parent = node
    # keep only the longest chains (a.b.c implies a.b)
    return {c for c in chains if not any(len(o) > len(c) and o[:len(c)] == c for o in chains)}


def _wheelHas(name: str, member: str | None = None) -> bool:
    import slicer
    import vtk

    cls = getattr(slicer, name, None) or getattr(vtk, name, None)
    return cls is not None and (member is None or hasattr(cls, member))


def _classMembers(table: dict, name: str, seen=None) -> set:
    """Members of a C++ class and its bases, across ctk, qMRML and the wrapped Qt classes."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    for group in ("ctk", "qMRML", "qt", "slicer_app_vtk"):
        if name in NAMES[group]:
            entry = NAMES[group][name]
            members = set(entry["names"])
            for base in entry["bases"] + (["QObject"] if group == "qt" and QOBJECT in entry["names"] else []):
                members |= _classMembers(table, base, seen)
            return members
    return set()


def problems(chains) -> list:
    """The names in ``chains`` that no supported Slicer offers (empty when all are known)."""
    checks = {"qt": _qtProblem, "ctk": _ctkProblem, "SampleData": _sampleDataProblem, "slicer": _slicerProblem}
    bad = []
    for chain in sorted(chains):
        check = checks.get(chain[0])
        problem = check(".".join(chain), list(chain[1:])) if check and len(chain) > 1 else None
        if problem:
            bad.append(problem)
    return bad


def _qtProblem(dotted: str, rest: list) -> str | None:
    if rest[0] not in NAMES["qt"]:
        return f"{dotted}: PythonQt has no qt.{rest[0]}"
    if len(rest) > 1:
        members = _classMembers(NAMES, rest[0])
        if rest[1] not in members and QOBJECT not in members:
            return f"{dotted}: qt.{rest[0]} has no {rest[1]}"
    return None


def _ctkProblem(dotted: str, rest: list) -> str | None:
    return None if rest[0] in NAMES["ctk"] else f"{dotted}: CTK has no {rest[0]}"


def _sampleDataProblem(dotted: str, rest: list) -> str | None:
    return None if rest[0] in NAMES["SampleData"] else f"{dotted}: the SampleData module has no {rest[0]}"


def _slicerProblem(dotted: str, rest: list) -> str | None:
    head, member = rest[0], (rest[1] if len(rest) > 1 else None)
    listed = {"util": (NAMES["slicer.util"], "slicer.util has no {}"),
              "modules": (NAMES["slicer.modules"] + ["cradlanomaly"], "no Slicer module {}"),
              "parameterNodeWrapper": (NAMES["slicer.parameterNodeWrapper"],
                                       "slicer.parameterNodeWrapper has no {}")}
    if head in listed:
        names, message = listed[head]
        return f"{dotted}: {message.format(member)}" if member and member not in names else None
    if head in ("ScriptedLoadableModule", "app", "mrmlScene"):
        return _slicerApplicationProblem(dotted, head, member)
    if head.startswith("vtk"):
        return _slicerVtkProblem(dotted, head, member)
    if head.startswith(("qMRML", "qSlicer")):
        return None if head in NAMES["qMRML"] else f"{dotted}: Slicer has no widget class {head}"
    return None if head in NAMES["slicer"] else f"{dotted}: slicer has no {head}"


def _slicerApplicationProblem(dotted: str, head: str, member: str | None) -> str | None:
    """``slicer.mrmlScene.X`` against the wheel's vtkMRMLScene, ``slicer.app.X`` against qSlicerApplication."""
    if head == "mrmlScene" and member and not _wheelHas("vtkMRMLScene", member):
        return f"{dotted}: vtkMRMLScene has no {member}"
    if head == "app" and member:
        appMembers = _classMembers(NAMES, "qSlicerApplication")
        if member not in appMembers and QOBJECT not in appMembers:
            return f"{dotted}: qSlicerApplication has no {member}"
    return None


def _slicerVtkProblem(dotted: str, head: str, member: str | None) -> str | None:
    """An application-only VTK class against the application's headers (or the wheel), any other against the wheel."""
    if NAMES["slicer_app_vtk"].get(head) is not None:
        if member and member not in _classMembers(NAMES, head) and not _wheelHas(head, member):
            return f"{dotted}: {head} has no {member}"
        return None
    if not _wheelHas(head, member):
        return f"{dotted}: slicer-core has no {head}{'.' + member if member else ''}"
    return None


def uiWidgets() -> dict:
    tree = ET.parse(UI)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def test_name_lists_say_where_they_came_from():
    assert NAMES["supported_tags"] == ["v5.8.1", "v5.10.0"]
    for tag in NAMES["supported_tags"]:
        src = NAMES["sources"][tag]
        assert re.fullmatch(r"[0-9a-f]{40}", src["slicer"]["commit"])
        assert re.fullmatch(r"[0-9a-f]{40}", src["ctk"]["commit"]) and src["ctk"]["files"]
        assert src["pythonqt"]["ref"] and src["pythonqt"]["pinned_by_ctk"]
    # sanity: the lists are the real thing, not empty shells
    assert {"QImage", "QColor", "QTimer", "QPixmap"} <= set(NAMES["qt"])
    assert {"ctkPathLineEdit", "ctkSliderWidget", "ctkCollapsibleButton"} <= set(NAMES["ctk"])
    assert {"qMRMLNodeComboBox", "qMRMLTableView", "qMRMLWidget"} <= set(NAMES["qMRML"])
    assert {"loadUI", "childWidgetVariables", "pip_install", "getNodesByClass"} <= set(NAMES["slicer.util"])


def test_the_check_catches_a_name_slicer_does_not_have():
    """The bug of issue 10, item 1: PythonQt wraps QColor but not the free function qRgb."""
    bad = problems(usedChains("image.setPixel(0, 0, qt.qRgb(1, 2, 3))"))
    assert bad == ["qt.qRgb: PythonQt has no qt.qRgb"]
    assert problems(usedChains("qt.QColor(1, 2, 3).rgb()")) == []
    assert problems(usedChains("slicer.util.noSuchHelper()")) == [
        "slicer.util.noSuchHelper: slicer.util has no noSuchHelper"]
    assert problems(usedChains("ctk.ctkNoSuchWidget()"))
    assert problems(usedChains("slicer.vtkMRMLTableNode.SetUseColumnTitleAsColumnHeaderX"))
    assert problems(usedChains("qt.QImage.Format_NoSuchFormat"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_every_application_name_the_module_uses_exists_in_every_supported_slicer(path):
    assert problems(usedChains(path.read_text())) == []


def test_every_widget_class_in_the_ui_exists():
    known = set(NAMES["qt"]) | set(NAMES["ctk"]) | set(NAMES["qMRML"])
    assert {cls for cls in uiWidgets().values()} - known == set()


def test_every_ctk_and_mrml_widget_member_the_module_uses_exists():
    """``self.ui.<widget>.<member>`` for the CTK and qMRML widgets (their own and their bases'
    members from the headers; members Qt's meta-object alone provides cannot be listed here)."""
    widgets = uiWidgets()
    tree = ast.parse((MODULE / "CRADLAnomaly.py").read_text())
    bad = []
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) else None
        if not chain or chain[:2] != ["self", "ui"] or len(chain) < 4:
            continue
        widget, member = chain[2], chain[3]
        cls = widgets.get(widget)
        if cls is None or not cls.startswith(("ctk", "qMRML")):
            continue
        members = _classMembers(NAMES, cls)
        if member not in members and QOBJECT not in members:
            bad.append(f"self.ui.{widget}.{member} ({cls})")
    assert bad == []


def test_signals_the_module_connects_exist():
    """connect("signal(args)") on the .ui's CTK/qMRML widgets names a signal those classes declare."""
    widgets = uiWidgets()
    source = (MODULE / "CRADLAnomaly.py").read_text()
    bad = []
    for widget, signal in re.findall(r"self\.ui\.(\w+)\.connect\(\"(\w+)\(", source):
        cls = widgets[widget]
        if cls.startswith(("ctk", "qMRML")) and signal not in _classMembers(NAMES, cls) \
                and QOBJECT not in _classMembers(NAMES, cls):
            bad.append(f"{widget}.{signal} ({cls})")
    assert bad == []
    for signal in re.findall(r"plotView\.(?:dis)?connect\(\"(\w+)\(", source):
        assert signal in _classMembers(NAMES, "qMRMLPlotView"), signal


def test_mrml_node_classes_named_in_strings_exist_in_slicer_core():
    """Class names passed as strings (AddNewNodeByClass, GetNodesByClass, IsA, nodeTypes)."""
    import slicer

    names = set()
    for path in SOURCES:
        names |= set(re.findall(r"\"(vtkMRML\w+Node)\"", path.read_text()))  # class names, not node IDs
    names |= set(re.findall(r"<string>(vtkMRML\w+Node)</string>", UI.read_text()))
    scene = slicer.vtkMRMLScene()
    appOnly = {"vtkMRMLColorLegendDisplayNode"}  # checked at run time with IsNodeClassRegistered
    missing = {n for n in names - appOnly if not hasattr(slicer, n)}
    assert missing == set()
    assert scene.IsNodeClassRegistered("vtkMRMLScalarVolumeNode")


def test_bridge_vtk_methods_exist_in_slicer_core():
    """Every CamelCase method the bridge calls exists on some slicer-core MRML or VTK class."""
    import slicer
    import vtk

    known = set()
    for module in (slicer, vtk):
        for name in dir(module):
            if name.startswith("vtk"):
                known |= set(dir(getattr(module, name)))
    for entry in NAMES["slicer_app_vtk"].values():
        known |= set(entry["names"])
    bad = set()
    for path in sorted((MODULE / "CRADLAnomalyLib").glob("*.py")):
        tree = ast.parse(path.read_text())
        otherModules = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                        if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} - {"slicer", "vtk"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and not (isinstance(node.func.value, ast.Name) and node.func.value.id in otherModules):
                name = node.func.attr
                if re.match(r"^[A-Z][a-z]+[A-Z]\w*$|^(Get|Set|Add|Remove|Is)\w+$", name) and name not in known:
                    sitkDir = dir(sys.modules["SimpleITK"] if "SimpleITK" in sys.modules else object)
                    if not name.startswith(("Get", "Set")) or name not in sitkDir:
                        bad.add(f"{path.name}: {name}")
    import SimpleITK

    sitkNames = set()
    for name in dir(SimpleITK):
        sitkNames.add(name)
        sitkNames |= set(dir(getattr(SimpleITK, name)))
    assert {b for b in bad if b.split(": ")[1] not in sitkNames} == set()
