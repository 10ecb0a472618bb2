"""What the panel installs, what it tells the user first, and that a second click cannot start a
second install."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CRADLAnomaly"))

from CRADLAnomalyLib import dependencies as D  # noqa: E402


def test_only_missing_packages_are_planned():
    assert D.missingPackages(lambda name: object()) == []
    assert D.missingPackages(lambda name: None if name == "torch" else object()) == ["torch"]


def test_torch_goes_through_the_pytorch_extension_and_the_prompt_says_what_and_how_big():
    plan = D.installPlan(["torch"], pyTorchExtension=True)
    assert [(s.package, s.route) for s in plan] == [("torch", "PyTorch extension")]
    text = D.confirmationText(plan)
    assert "PyTorch (torch>=2.0) via PyTorch extension" in text
    assert "200 MB" in text and "2.5 GB" in text and "come with Slicer" in text


def test_pip_fallback_asks_for_the_cpu_build_with_the_same_requirement():
    calls = []
    D.Installer().install(D.installPlan(["torch"], pyTorchExtension=False), calls.append)
    assert calls == [f"torch>=2.0 --index-url {D.TORCH_CPU_INDEX_URL}"]


def test_extension_route_gets_the_same_version_requirement():
    asked = []
    D.Installer().install(D.installPlan(["torch"], pyTorchExtension=True), pytest.fail,
                          lambda requirement: asked.append(requirement) or object())
    assert asked == [D.TORCH_VERSION_REQUIREMENT]
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        D.Installer().install(D.installPlan(["torch"], pyTorchExtension=True), pytest.fail, lambda r: None)


def test_a_second_install_while_one_runs_is_refused():
    """pip's log output processes Qt events, so a second click can arrive during an install."""
    installer = D.Installer()
    started = []

    def pipInstall(args):
        started.append(args)
        with pytest.raises(D.InstallInProgress):
            installer.install(D.installPlan(["torch"], pyTorchExtension=False), pipInstall)

    installer.install(D.installPlan(["torch"], pyTorchExtension=False), pipInstall)
    assert len(started) == 1 and not installer.busy


def test_brain_extraction_is_installed_after_torch_with_the_core_pin():
    missing = D.missingPackages(lambda name: None if name in ("torch", "deepbet") else object())
    assert missing == ["torch", "deepbet"]  # deepbet needs torch: pip must find it already there
    calls = []
    D.Installer().install(D.installPlan(missing, pyTorchExtension=True), calls.append, lambda r: object())
    assert calls == [D.DEEPBET_REQUIREMENT]
    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().split()
    assert D.DEEPBET_REQUIREMENT in requirements
    assert "brain extraction" in D.confirmationText(D.installPlan(missing, pyTorchExtension=True))


def test_every_pin_the_code_names_is_the_pin_in_requirements_txt():
    from cradl import pins

    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().split()
    named = [value for name, value in vars(pins).items() if name.isupper()]
    assert named and all(pin in requirements for pin in named), named
