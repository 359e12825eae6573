"""Dependency checks and installation logic of the Slicer module, with a stand-in ``slicer``."""

import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "TextDiffSeg"))
from TextDiffSegHelpers import install  # noqa: E402

REQUIREMENTS = REPO / "Resources" / "requirements.txt"
BUNDLED_WITH_SLICER = {"numpy", "simpleitk"}


def test_requirements_match_the_engines_dependencies():
    engine = {
        Requirement(line).name.lower(): Requirement(line)
        for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    listed = {requirement.name.lower(): requirement for requirement in install.loadRequirements(REQUIREMENTS)}
    assert str(engine.pop("torch").specifier) == str(Requirement(install.TORCH_REQUIREMENT).specifier)
    for name in BUNDLED_WITH_SLICER:
        engine.pop(name)
        assert name not in listed, f"{name} comes with Slicer; pip must not replace it"
    assert "torch" not in listed, "torch comes from the PyTorch extension"
    for name, requirement in engine.items():
        assert name in listed, f"{name} is missing from Resources/requirements.txt"
        assert listed[name].specifier == requirement.specifier, name
    assert set(listed) - set(engine) == {"psutil"}  # the worker client's own need


def test_missing_requirements_are_found_from_metadata(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# comment\n\nnumpy>=1.0  # installed\n--index-url https://example.org\n"
        "textdiffseg-no-such-package>=1\nnumpy>=999\n"
        "textdiffseg-other-platform>=1; sys_platform == 'no-such-platform'\n"
    )
    assert install.missingRequirements(requirements) == ["textdiffseg-no-such-package>=1", "numpy>=999"]


def _slicer(version=(5, 12), testing=False):
    calls = []
    util = SimpleNamespace(pip_install=lambda requirements: calls.append(("pip_install", requirements)))
    app = SimpleNamespace(majorVersion=version[0], minorVersion=version[1], testingEnabled=lambda: testing)
    return SimpleNamespace(app=app, util=util), calls


def _pyTorchUtils(calls, succeeds=True):
    def installTorch(askConfirmation, torchVersionRequirement):
        calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        return object() if succeeds else None

    return SimpleNamespace(PyTorchUtilsLogic=lambda: SimpleNamespace(installTorch=installTorch))


def test_torch_comes_first_from_the_pytorch_extension_then_pip_ensure(monkeypatch):
    slicer, calls = _slicer((5, 12))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _pyTorchUtils(calls))
    monkeypatch.setitem(sys.modules, "slicer.packaging", SimpleNamespace(
        pip_ensure=lambda requirements, **options: calls.append(("pip_ensure", requirements, options))))
    install.installRequirements([install.TORCH_REQUIREMENT, "diffusers>=0.30,<1"], slicer)
    assert calls == [
        ("installTorch", False, str(Requirement(install.TORCH_REQUIREMENT).specifier)),
        ("pip_ensure", [Requirement("diffusers>=0.30,<1")], {"prompt_install": False, "requester": "TextDiffSeg"}),
    ]


def test_older_slicer_uses_pip_install():
    slicer, calls = _slicer((5, 10))
    install.installRequirements(["monai>=1.4,<2", "peft>=0.11,<1"], slicer)
    assert calls == [("pip_install", ["monai>=1.4,<2", "peft>=0.11,<1"])]


def test_nothing_is_installed_while_slicer_is_testing():
    slicer, calls = _slicer(testing=True)
    with pytest.raises(RuntimeError, match="installs nothing while testing: monai"):
        install.installRequirements(["monai>=1.4,<2"], slicer)
    assert calls == []


def test_a_missing_pytorch_extension_or_failed_torch_install_is_explained(monkeypatch):
    slicer, calls = _slicer()
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails
    with pytest.raises(RuntimeError, match="Extensions Manager"):
        install.installRequirements([install.TORCH_REQUIREMENT], slicer)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _pyTorchUtils(calls, succeeds=False))
    with pytest.raises(RuntimeError, match="PyTorch could not be installed"):
        install.installRequirements([install.TORCH_REQUIREMENT, "monai>=1.4,<2"], slicer)
    assert [call[0] for call in calls] == ["installTorch"]
