"""Build ``names.json``: the names the Slicer application offers to Python, read from the real sources
of every supported Slicer version. Run once per supported version change; the test only reads the
JSON. Names only (no code), each list with the repository, commit and files it came from.

    python Testing/slicer_api/build_name_lists.py --slicer SLICER_GIT --ctk CTK_GIT \
        --pythonqt COMMONTK_PYTHONQT_GIT --pythonqt-upstream MEVISLAB_PYTHONQT_GIT

Each argument is a git directory (a clone or a bare mirror). Which CTK and PythonQt a Slicer tag
uses is read from the tag itself (SuperBuild/External_CTK.cmake, then CTK's
CMakeExternals/PythonQt.cmake); a PythonQt commit missing from the commontk clone is replaced by
the upstream (MeVisLab) release it was patched from, and the JSON says so.

A name is kept when it exists in every supported version (the intersection), since the module must
run on all of them.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from pathlib import Path

SUPPORTED_TAGS = ("v5.8.1", "v5.10.0")
OUT = Path(__file__).resolve().parent / "names.json"


def git(repo, *args) -> str:
    return subprocess.run(["git", "--git-dir", str(repo), *args], check=True, capture_output=True,
                          text=True, errors="replace").stdout


def has(repo, commit) -> bool:
    return subprocess.run(["git", "--git-dir", str(repo), "cat-file", "-e", commit + "^{commit}"],
                          capture_output=True).returncode == 0


def files(repo, ref, prefix, suffix) -> list:
    return [p for p in git(repo, "ls-tree", "-r", "--name-only", ref, prefix).split("\n")
            if p.endswith(suffix)]


def show(repo, ref, path) -> str:
    return git(repo, "show", f"{ref}:{path}")


def python_top_names(source: str) -> set:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    return {n for n in names if not n.startswith("_")}


# ------------------------------------------------------------------ C++ headers: classes and members
CLASS_RE = re.compile(r"^class\s+(?:\w+_EXPORT\s+)?(\w+)\s*(?::\s*([^{;]+))?\{", re.M)
PROPERTY_RE = re.compile(r"Q_PROPERTY\(\s*[\w:<>*& ]+?[\s*&]+(\w+)\s+(?:READ|MEMBER)")
METHOD_RE = re.compile(r"(?:^|[\s*&:])(~?\w+)\s*\([^;{}]*\)\s*(?:const)?\s*(?:override|final)?"
                       r"\s*(?:=\s*0)?\s*[;{]", re.M)
ENUM_RE = re.compile(r"\benum\s+(?:class\s+)?(\w*)\s*(?::\s*\w+\s*)?\{([^}]*)\}", re.S)
KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof", "Q_DECLARE_PRIVATE", "Q_OBJECT", "Q_ENUM",
            "Q_ENUMS", "Q_FLAGS", "Q_FLAG", "Q_DISABLE_COPY", "Q_DECLARE_PUBLIC", "Q_PROPERTY", "Q_INVOKABLE",
            "QT_VERSION_CHECK", "vtkTypeMacro", "Q_DECLARE_FLAGS", "Q_D", "Q_Q", "QTimer", "defined"}


def header_classes(text: str) -> dict:
    """{class: {"bases": [...], "names": [...]}} for classes declared in a C++ header."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    out = {}
    starts = [(m.start(), m.group(1), m.group(2) or "") for m in CLASS_RE.finditer(text)]
    for n, (start, name, bases) in enumerate(starts):
        body = text[start:starts[n + 1][0] if n + 1 < len(starts) else len(text)]
        names = set(PROPERTY_RE.findall(body))
        names |= {m for m in METHOD_RE.findall(body) if m not in KEYWORDS and not m.startswith("~")}
        for enumName, values in ENUM_RE.findall(body):
            if enumName:
                names.add(enumName)
            names |= {v.split("=")[0].strip() for v in values.split(",") if v.split("=")[0].strip()}
        for m in re.finditer(r"vtkGetMacro\((\w+)|vtkSetMacro\((\w+)|vtkBooleanMacro\((\w+)|vtkGet\w*Macro\((\w+)|"
                             r"vtkSet\w*Macro\((\w+)", body):
            prop = next(g for g in m.groups() if g)
            names |= {"Get" + prop, "Set" + prop, prop + "On", prop + "Off"}
        baseNames = [b.split()[-1].split("<")[0] for b in bases.split(",") if b.strip()]
        out[name] = {"bases": baseNames, "names": sorted(n for n in names if re.match(r"^\w+$", n))}
    return out


def merge(into: dict, new: dict):
    for k, v in new.items():
        if k in into:
            into[k]["bases"] = sorted(set(into[k]["bases"]) | set(v["bases"]))
            into[k]["names"] = sorted(set(into[k]["names"]) | set(v["names"]))
        else:
            into[k] = v


def classes_from_headers(repo, ref, prefixes, pattern) -> tuple[dict, list]:
    out, paths = {}, []
    for prefix in prefixes:
        for path in files(repo, ref, prefix, ".h"):
            if not re.search(pattern, Path(path).stem):
                continue
            paths.append(path)
            merge(out, {k: v for k, v in header_classes(show(repo, ref, path)).items() if re.match(pattern, k)})
    return out, paths


def intersect_classes(per_version: list) -> dict:
    common = set.intersection(*[set(c) for c in per_version])
    return {k: {"bases": sorted(set.intersection(*[set(c[k]["bases"]) for c in per_version])),
                "names": sorted(set.intersection(*[set(c[k]["names"]) for c in per_version]))}
            for k in sorted(common)}


# ------------------------------------------------------------------ PythonQt: the `qt` module
REGISTER_RE = re.compile(r"registerClass\(&(\w+)::staticMetaObject,\s*\"(\w+)\""
                         r"|registerCPPClass\(\"(\w+)\",\s*\"\w*\",\s*\"(\w+)\"")


def pythonqt_names(repo, ref, generated) -> tuple[dict, list]:
    """{class: members} of the classes PythonQt puts in the `qt` module (wrapper methods, enum
    values, and properties implied by getters such as isEnabled -> enabled)."""
    classes, wrappers, paths, qobjects = {}, {}, [], {"QObject"}
    for path in files(repo, ref, generated, ".cpp") + files(repo, ref, "src", ".cpp"):
        text = show(repo, ref, path)
        for m in REGISTER_RE.finditer(text):
            classes.setdefault(m.group(1) or m.group(3), set())
            if m.group(1):
                qobjects.add(m.group(1))
        if "register" in text:
            paths.append(path)
    for path in files(repo, ref, generated, ".h") + files(repo, ref, "src", ".h"):
        text = show(repo, ref, path)
        for m in re.finditer(r"class\s+PythonQt(?:Wrapper|Shell|PublicPromoter)_(\w+)\s*:[^{]*\{", text):
            depth, end = 1, m.end()
            while depth and end < len(text):
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            body = text[m.end():end]
            names = set()
            for method in re.findall(r"\b(\w+)\(", body):
                method = re.sub(r"^(py_q_|static_\w+?_|promoted_|new_|delete_)", "", method)
                names.add(method)
                if method.startswith("is") and method[2:3].isupper():
                    names.add(method[2].lower() + method[3:])
            for enumName, values in ENUM_RE.findall(body):
                names.add(enumName)
                names |= {v.split("=")[0].strip() for v in values.split(",") if v.split("=")[0].strip()}
            wrappers.setdefault(m.group(1), set()).update(n for n in names if re.match(r"^\w+$", n))
        paths.append(path) if "PythonQtWrapper_" in text else None
    std = show(repo, ref, "src/PythonQtStdDecorators.h")
    qobject = {m for m in re.findall(r"\b(\w+)\(QObject\*", std)}
    common = {"connect", "disconnect", "blockSignals", "setProperty", "property", "objectName", "parent", "children",
              "findChild", "findChildren"}
    classes.setdefault("QObject", set()).update(qobject | common & (qobject | {"connect", "disconnect"}))
    classes.setdefault("Qt", set())
    for name in classes:
        classes[name] |= wrappers.get(name, set())
    # QObject-based classes also expose their Q_ENUMs, properties and slots through Qt's meta-object,
    # which these sources do not list: marked so, and only their wrapper members are known here.
    return {k: sorted(v | ({"<QObject>"} if k in qobjects else set())) for k, v in classes.items()}, sorted(set(paths))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slicer", required=True)
    parser.add_argument("--ctk", required=True)
    parser.add_argument("--pythonqt", required=True)
    parser.add_argument("--pythonqt-upstream", required=True)
    args = parser.parse_args()
    S, C, P, PU = args.slicer, args.ctk, args.pythonqt, args.pythonqt_upstream

    sources, per = {}, {k: [] for k in ("util", "top", "modules", "pnw", "sampledata", "qt", "ctk", "qmrml", "app")}
    for tag in SUPPORTED_TAGS:
        commit = git(S, "rev-list", "-n1", tag).strip()
        ctkCommit = re.search(r'Slicer_\$\{proj\}_GIT_TAG\s*"(\w+)"',
                              show(S, tag, "SuperBuild/External_CTK.cmake")).group(1)
        pq = re.search(r"set\(revision_tag (\w+)\)\s*#\s*(\S+)", show(C, ctkCommit, "CMakeExternals/PythonQt.cmake"))
        pqCommit, pqLabel = pq.group(1), pq.group(2)
        if has(P, pqCommit):
            pqRepo, pqRef, pqName = P, pqCommit, "commontk/PythonQt"
        else:  # commontk's patch branch of an upstream release: read the release it patches
            release = "v" + re.search(r"v(\d+\.\d+\.\d+)", pqLabel).group(1)
            pqRepo, pqRef, pqName = PU, release, "MeVisLab/pythonqt"
        topLevel = git(pqRepo, "ls-tree", "--name-only", pqRef)
        generated = "generated_cpp_515" if "generated_cpp_515" in topLevel else "generated_cpp_511"
        sources[tag] = {
            "slicer": {"repo": "Slicer/Slicer", "tag": tag, "commit": commit},
            "ctk": {"repo": "commontk/CTK", "commit": ctkCommit, "pinned_by": "SuperBuild/External_CTK.cmake"},
            "pythonqt": {"repo": pqName, "ref": pqRef, "pinned_by_ctk": f"{pqCommit} ({pqLabel})",
                         "wrappers": generated, "note": "" if pqRepo is P else
                         "the pinned commontk commit is not in the clone; names read from the upstream release it "
                         "patches"},
        }
        per["util"].append(python_top_names(show(S, tag, "Base/Python/slicer/util.py")))
        init = show(S, tag, "Base/Python/slicer/__init__.py")
        top = set(re.findall(r"\.\. py:attribute:: (\w+)", init))
        top |= {Path(p).stem for p in files(S, tag, "Base/Python/slicer", ".py") if p.count("/") == 3}
        top |= {Path(p).parent.name for p in files(S, tag, "Base/Python/slicer", "__init__.py") if p.count("/") == 4}
        per["top"].append({n for n in top if not n.startswith("_")} | {"modules", "moduleNames", "app", "mrmlScene"})
        modules = set()
        for kind in ("Loadable", "Scripted", "CLI"):
            modules |= {p.split("/")[2].lower() for p in files(S, tag, f"Modules/{kind}", "CMakeLists.txt")
                        if p.count("/") == 3}
        per["modules"].append(modules)
        pnw = set()
        for path in files(S, tag, "Base/Python/slicer/parameterNodeWrapper", ".py"):
            pnw |= python_top_names(show(S, tag, path))
        per["pnw"].append(pnw)
        per["sampledata"].append(python_top_names(show(S, tag, "Modules/Scripted/SampleData/SampleData.py")))
        qtClasses, qtPaths = pythonqt_names(pqRepo, pqRef, generated)
        sources[tag]["pythonqt"]["files"] = len(qtPaths)
        per["qt"].append({k: {"bases": [], "names": v} for k, v in qtClasses.items()})
        ctkClasses, ctkPaths = classes_from_headers(C, ctkCommit, ["Libs/Core", "Libs/Widgets",
                                                                  "Libs/Visualization/VTK/Widgets",
                                                                  "Libs/Scripting/Python/Widgets"], r"^ctk\w+")
        sources[tag]["ctk"]["files"] = ctkPaths
        per["ctk"].append(ctkClasses)
        qmrml, qmrmlPaths = classes_from_headers(S, tag, ["Libs/MRML/Widgets", "Base/QTGUI", "Base/QTCore"],
                                                 r"^q(MRML|Slicer)\w+")
        sources[tag]["slicer"]["widget_headers"] = qmrmlPaths
        per["qmrml"].append(qmrml)
        app, appPaths = classes_from_headers(S, tag, ["Modules/Loadable/Colors/Logic",
                                                      "Modules/Loadable/Segmentations/Logic",
                                                      "Modules/Loadable/Plots/Logic", "Libs/vtkSegmentationCore"],
                                             r"^vtk(Slicer\w+Logic|Segmentation\w*|Segment)$")
        sources[tag]["slicer"]["logic_headers"] = appPaths
        per["app"].append(app)

    data = {
        "about": "Names the Slicer application offers to Python, in every supported version (intersection). "
                 "Built by Testing/slicer_api/build_name_lists.py from the sources listed under 'sources'.",
        "supported_tags": list(SUPPORTED_TAGS),
        "sources": sources,
        "slicer": sorted(set.intersection(*per["top"])),
        "slicer.util": sorted(set.intersection(*per["util"])),
        "slicer.modules": sorted(set.intersection(*per["modules"])),
        "slicer.parameterNodeWrapper": sorted(set.intersection(*per["pnw"])),
        "SampleData": sorted(set.intersection(*per["sampledata"])),
        "qt": intersect_classes(per["qt"]),
        "ctk": intersect_classes(per["ctk"]),
        "qMRML": intersect_classes(per["qmrml"]),
        "slicer_app_vtk": intersect_classes(per["app"]),
    }
    OUT.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
