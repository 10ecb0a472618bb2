"""The extension tree follows Slicer's conventions and is consistent with its CMake lists."""
from __future__ import annotations

import ast
import sys
import fnmatch
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "CRADLAnomaly"
MODEL = "Resources/Models/cradl_default.cradl"
# Module files that CMake must install: code, UI, icons, models, colour tables.
MODULE_PATTERNS = ("*.py", "Resources/UI/*.ui", "Resources/Icons/*", "Resources/Models/*.cradl",
                   "Resources/ColorTables/*")


def _cmake(path: Path) -> str:
    return re.sub(r"(^|\s)#[^\n]*", r"\1", path.read_text(encoding="utf-8"))


def _set_lists(text: str) -> dict[str, list[str]]:
    return {m.group(1): m.group(2).split() for m in re.finditer(r"set\(\s*(\w+)\s+([^)]*)\)", text)}


def _module_lists():
    text = _cmake(MODULE / "CMakeLists.txt")
    sets = _set_lists(text)
    name = sets["MODULE_NAME"][0]

    def expand(items):
        items = [i.replace("${MODULE_NAME}", name) for i in items]
        return [i for i in items if not i.startswith("${")]

    scripts = expand(sets["MODULE_PYTHON_SCRIPTS"])
    resources = expand(sets["MODULE_PYTHON_RESOURCES"])
    globs = []
    for m in re.finditer(r"file\(\s*GLOB_RECURSE\s+(\w+)([^)]*)\)", text):
        patterns = [p.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "") for p in m.group(2).split()
                    if p.startswith("${CMAKE_CURRENT_SOURCE_DIR}/")]
        assert f"${{{m.group(1)}}}" in text, f"glob {m.group(1)} is never used"
        globs += patterns
    return name, text, scripts, resources, globs


def _matches_glob(rel: str, pattern: str) -> bool:
    # GLOB_RECURSE "dir/*.py" matches files at any depth below dir.
    directory, _, leaf = pattern.rpartition("/")
    return rel.startswith(directory + "/") and fnmatch.fnmatch(rel.rpartition("/")[2], leaf)


def test_top_level_cmake_has_extension_metadata():
    text = _cmake(ROOT / "CMakeLists.txt")
    sets = {k: " ".join(v) for k, v in _set_lists(text).items()}
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert sets.get(key), key
    assert sets["EXTENSION_ICONURL"].strip('"').endswith("CRADL.png")
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    assert "include(${Slicer_EXTENSION_GENERATE_CONFIG})" in text and "include(${Slicer_EXTENSION_CPACK})" in text
    for sub in re.findall(r"add_subdirectory\((\w+)\)", text):
        assert (ROOT / sub / "CMakeLists.txt").is_file(), sub
    assert "CRADLAnomaly" in re.findall(r"add_subdirectory\((\w+)\)", text)
    screenshot = sets["EXTENSION_SCREENSHOTURLS"].strip('"').split("/main/")[-1]
    assert (ROOT / screenshot).is_file(), screenshot


def test_every_listed_file_exists():
    name, text, scripts, resources, globs = _module_lists()
    assert name == "CRADLAnomaly"
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert f"{name}.py" in scripts and f"Resources/UI/{name}.ui" in resources
    assert f"Resources/Icons/{name}.png" in resources and MODEL in resources
    for rel in scripts + resources:
        if rel == MODEL and not (MODULE / rel).exists():
            continue  # the bundled model is produced by training; its presence is the core's test
        assert (MODULE / rel).is_file(), f"{rel} is listed in CMakeLists.txt but missing"
    assert globs == ["cradl/*.py"]
    assert list((MODULE / "cradl").glob("*.py")), "the glob must match the core package"


def test_every_module_file_is_listed():
    _, _, scripts, resources, globs = _module_lists()
    listed = set(scripts) | set(resources)
    unlisted = []
    for path in MODULE.rglob("*"):
        rel = path.relative_to(MODULE).as_posix()
        if not path.is_file() or "__pycache__" in rel or rel == "CMakeLists.txt":
            continue
        if not any(fnmatch.fnmatch(rel, p) for p in MODULE_PATTERNS):
            continue
        if rel in listed or any(_matches_glob(rel, g) for g in globs):
            continue
        unlisted.append(rel)
    assert not unlisted, f"module files not listed in CRADLAnomaly/CMakeLists.txt: {unlisted}"


def test_icon_is_128_square_png():
    from PIL import Image

    for path in (ROOT / "CRADL.png", MODULE / "Resources/Icons/CRADLAnomaly.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128)


def _module_ast():
    return ast.parse((MODULE / "CRADLAnomaly.py").read_text(encoding="utf-8"))


def test_module_script_follows_the_scripted_module_template():
    tree = _module_ast()
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["CRADLAnomaly"] == ["ScriptedLoadableModule"]
    assert classes["CRADLAnomalyWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["CRADLAnomalyLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["CRADLAnomalyTest"] == ["ScriptedLoadableModuleTest"]
    source = (MODULE / "CRADLAnomaly.py").read_text(encoding="utf-8")
    assert "2301.02126" in source and "self.parent.acknowledgementText" in source
    assert "processFiles" in source and "def process(" in source
    assert 'resourcePath("UI/CRADLAnomaly.ui")' in source


def test_ui_file_is_valid_and_has_every_widget_the_module_uses():
    tree = ET.parse(MODULE / "Resources/UI/CRADLAnomaly.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "CRADLAnomaly.py").read_text(encoding="utf-8")))
    assert used, "the widget binds its controls through self.ui"
    missing = used - names
    assert not missing, f"widgets used in CRADLAnomaly.py but absent from the .ui: {sorted(missing)}"
    classes = {w.get("class") for w in tree.iter("widget")}
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    assert {c for c in classes if c.startswith(("ctk", "qMRML"))} <= declared
    receivers = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrmlWidgets = {w.get("name") for w in tree.iter("widget")
                   if w.get("class", "").startswith("qMRML")} - {"CRADLAnomaly"}
    assert mrmlWidgets <= receivers, "every MRML widget must get the scene"


def test_scene_bridge_has_no_qt_and_no_application_globals():
    for path in (MODULE / "CRADLAnomalyLib").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                mods = []
            for mod in mods:
                assert mod.split(".")[0] not in {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule"}, \
                    f"{path.name} imports {mod}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in {"mrmlScene", "app", "modules"}, f"{path.name} uses slicer.{node.attr}"


@pytest.mark.parametrize("rel", ["CRADLAnomalyLib/__init__.py", "CRADLAnomalyLib/render.py"])
def test_bridge_modules_are_listed_explicitly(rel):
    _, _, scripts, _, _ = _module_lists()
    assert rel in scripts


# ------------------------------------------------------------------------------------------ supported Slicer
SLICER_PYTHON = {"5.8": (3, 9), "5.10": (3, 12)}  # Slicer_REQUIRED_PYTHON_VERSION at v5.8.1 and v5.10.0


def _shipped_python_files():
    return [p for p in MODULE.rglob("*.py") if "egg-info" not in str(p) and "__pycache__" not in str(p)]


@pytest.mark.parametrize("version", sorted(SLICER_PYTHON))
def test_module_bridge_and_core_parse_on_each_supported_slicers_python(version):
    for path in _shipped_python_files():
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=SLICER_PYTHON[version])


def test_new_style_annotations_are_never_evaluated_on_python_3_9():
    """``X | None`` in an annotation is a TypeError on Python 3.9 unless annotations stay strings."""
    for path in _shipped_python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                     any(a.name == "annotations" for a in n.names) for n in tree.body)
        for node in ast.walk(tree):
            annotations = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation] + \
                              ([node.returns] if node.returns else [])
            elif isinstance(node, ast.AnnAssign):
                annotations = [node.annotation]
            for annotation in annotations:
                if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                    assert future, f"{path.relative_to(ROOT)}:{node.lineno} needs 'from __future__ import annotations'"
    # The parameter node's annotations are evaluated (typing.get_type_hints): no | there at all.
    source = (MODULE / "CRADLAnomaly.py").read_text(encoding="utf-8")
    assert "from __future__ import annotations" not in source


def test_core_needs_stay_within_what_the_oldest_supported_slicer_ships():
    sys.path.insert(0, str(MODULE))
    from CRADLAnomalyLib import dependencies as D

    def v(text):
        return tuple(int(p) for p in text.split(".")[:2])

    assert D.SUPPORTED_SLICER == "5.8"
    for shipped in D.SLICER_SHIPS.values():
        for package in ("numpy", "scipy", "SimpleITK"):
            assert v(shipped[package]) >= v(D.CORE_MINIMUM[package]), (package, shipped)
    # One torch requirement for both install routes, and no exact pin that pulls a CUDA build.
    assert D.TORCH_REQUIREMENT == "torch" + D.TORCH_VERSION_REQUIREMENT and "==" not in D.TORCH_REQUIREMENT


def test_extension_depends_on_pytorch_and_ships_a_license():
    sets = {k: " ".join(v) for k, v in _set_lists(_cmake(ROOT / "CMakeLists.txt")).items()}
    assert sets["EXTENSION_DEPENDS"] == "PyTorch"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_module_never_calls_qrgb_and_saves_model_path_history():
    source = (MODULE / "CRADLAnomaly.py").read_text(encoding="utf-8")
    assert "qt.qRgb" not in source
    tree = ET.parse(MODULE / "Resources/UI/CRADLAnomaly.ui")
    keyed = [w.get("name") for w in tree.iter("widget") if w.get("class") == "ctkPathLineEdit"
             and any(p.get("name") == "settingKey" for p in w.findall("property"))]
    for name in keyed:
        assert f"self.ui.{name}.addCurrentPathToHistory()" in source, name


def test_parameter_node_names_match_the_ui():
    """connectGui binds each parameter to the widget whose SlicerParameterName names it."""
    tree = ast.parse((MODULE / "CRADLAnomaly.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CRADLAnomalyParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in wrapper.decorator_list)
    params = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    ui = ET.parse(MODULE / "Resources/UI/CRADLAnomaly.ui")
    bound = {p.findtext("string") for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= params
    assert params - bound == {"modelPath"}  # bound by hand: empty = the bundled model


def test_bridge_imports_without_torch():
    """The panel opens before PyTorch is installed: the bridge must not import it."""
    import subprocess

    code = ("import sys; sys.path.insert(0, %r); import CRADLAnomalyLib; "
            "assert 'torch' not in sys.modules, 'torch imported'" % str(MODULE))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
