"""What the core needs beyond Slicer, how it is installed, and what the user is told first.

No Qt and no Slicer application here: the panel passes in the functions that install
(``slicer.util.pip_install`` and the PyTorch extension's ``installTorch``), so the plan, the
wording and the guard against a second install are tested outside Slicer.

Supported Slicer versions and what they ship (read from each tag's SuperBuild: Python from
``CMakeLists.txt`` ``Slicer_REQUIRED_PYTHON_VERSION``, numpy and scipy from
``SuperBuild/External_python-numpy.cmake`` / ``External_python-scipy.cmake``, SimpleITK from the
``Slicer/SimpleITK`` tag in ``SuperBuild/External_SimpleITK.cmake``). The core's needs must stay
within the oldest of them; only PyTorch is installed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from cradl.pins import DEEPBET

SUPPORTED_SLICER = "5.8"  # and later
SLICER_SHIPS = {
    "5.8.1": {"python": "3.9.10", "numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.3.1"},
    "5.10.0": {"python": "3.12.10", "numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2"},
}
# Oldest versions the core runs with: what the oldest supported Slicer ships.
CORE_MINIMUM = {"numpy": "1.26", "scipy": "1.13", "SimpleITK": "2.3", "torch": "2.0"}

# One torch requirement for both install routes. The PyTorch extension (PyTorchUtils, declared in
# EXTENSION_DEPENDS) picks the CPU or CUDA build that fits the computer; the pip fallback (an
# extension built without it) asks PyTorch's CPU index, since PyPI's Linux torch is the CUDA build.
TORCH_VERSION_REQUIREMENT = ">=2.0"
TORCH_REQUIREMENT = "torch" + TORCH_VERSION_REQUIREMENT
TORCH_CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"

# Brain extraction for heads with skull (the core's cradl.brain): deepbet, pinned in cradl.pins.
# It needs torch, so it is installed after it (pip then finds torch satisfied and leaves it alone).
DEEPBET_REQUIREMENT = DEEPBET
DEEPBET_DOWNLOAD_MB = 35  # the wheel (10 MB, network weights inside) and pandas, fill_voids, cc3d

# Approximate download sizes, for the prompt (PyTorch 2.x wheels, 2024-2025).
TORCH_CPU_DOWNLOAD_MB = 200
TORCH_CUDA_DOWNLOAD_MB = 2500


@dataclass(frozen=True)
class Step:
    package: str       # import name
    requirement: str   # what is asked for
    route: str         # "PyTorch extension" or "pip"
    size: str          # approximate download, in words


def missingPackages(findSpec=importlib.util.find_spec) -> list:
    """Import names of the core's packages that are not importable (torch and deepbet; numpy, scipy and
    SimpleITK come with Slicer but are checked too), in install order."""
    return [name for name in ("torch", "deepbet", "numpy", "scipy", "SimpleITK") if findSpec(name) is None]


def installPlan(missing, pyTorchExtension: bool) -> list:
    """The install steps for ``missing`` packages, in order."""
    steps = []
    for name in missing:
        if name == "torch":
            if pyTorchExtension:
                size = (f"about {TORCH_CPU_DOWNLOAD_MB} MB for the CPU build, up to about "
                        f"{TORCH_CUDA_DOWNLOAD_MB / 1000:.1f} GB when the CUDA build is chosen for an NVIDIA GPU")
                steps.append(Step("torch", TORCH_REQUIREMENT, "PyTorch extension", size))
            else:
                steps.append(Step("torch", TORCH_REQUIREMENT, "pip (CPU build)", f"about {TORCH_CPU_DOWNLOAD_MB} MB"))
        elif name == "deepbet":
            steps.append(Step("deepbet", DEEPBET_REQUIREMENT, "pip", f"about {DEEPBET_DOWNLOAD_MB} MB "
                              "(brain extraction for scans with skull)"))
        else:
            minimum = CORE_MINIMUM.get(name)
            steps.append(Step(name, f"{name}>={minimum}" if minimum else name, "pip", "a few tens of MB"))
    return steps


def confirmationText(plan) -> str:
    """The question asked before anything is installed: what, through which route, how big."""
    lines = ["CRADL Anomaly needs Python packages that are not installed yet:", ""]
    for step in plan:
        label = "PyTorch" if step.package == "torch" else step.package
        lines.append(f"  \u2022 {label} ({step.requirement}) via {step.route}: {step.size} to download")
    lines += ["", "numpy, scipy and SimpleITK come with Slicer and are not changed.",
              "The download can take several minutes; Slicer may need a restart afterwards.",
              "", "Install now?"]
    return "\n".join(lines)


class InstallInProgress(RuntimeError):
    pass


class Installer:
    """Runs an install plan once at a time: a second request while one runs (pip's log output
    processes events, so a second click can arrive) is refused instead of starting a second pip."""

    def __init__(self):
        self.busy = False

    def install(self, plan, pipInstall, installTorchWithExtension=None) -> None:
        """``pipInstall(argumentString)`` and ``installTorchWithExtension(versionRequirement)``
        (returns the torch module or None) do the work; raises on failure."""
        if self.busy:
            raise InstallInProgress("The Python packages are already being installed.")
        self.busy = True
        try:
            for step in plan:
                if step.package == "torch" and step.route == "PyTorch extension":
                    if installTorchWithExtension(TORCH_VERSION_REQUIREMENT) is None:
                        raise RuntimeError("PyTorch could not be installed by the PyTorch extension.")
                elif step.package == "torch":
                    pipInstall(f"{step.requirement} --index-url {TORCH_CPU_INDEX_URL}")
                else:
                    pipInstall(step.requirement)
        finally:
            self.busy = False
