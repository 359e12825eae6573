"""Dependency checks and installation logic of the Slicer module, with a stand-in ``slicer``, a stand-in
PyTorch extension and pip calls recorded instead of run: torch comes from the PyTorch extension, pip is
held to the torch it installed and torch is checked again afterwards, failures say what to do, and an
Intel Mac whose Slicer has numpy 2 is refused before anything is installed."""

import importlib.metadata
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "TextDiffSeg"))
from TextDiffSegHelpers import install, paths  # noqa: E402

REQUIREMENTS = REPO / "Resources" / "requirements.txt"
BUNDLED_WITH_SLICER = {"numpy", "simpleitk"}
# The command line's DICOM SEG output; in Slicer, Slicer's DICOM module exports segmentations, and
# pip must not replace the pydicom that Slicer's DICOM module itself uses.
COMMAND_LINE_ONLY = {"highdicom", "pydicom"}


def test_requirements_match_the_engines_dependencies():
    engine = {
        Requirement(line).name.lower(): Requirement(line)
        for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    listed = {requirement.name.lower(): requirement for requirement in install.loadRequirements(REQUIREMENTS)}
    assert str(engine.pop("torch").specifier) == str(Requirement(install.TORCH_REQUIREMENT).specifier)
    for name in BUNDLED_WITH_SLICER | COMMAND_LINE_ONLY:
        engine.pop(name)
        assert name not in listed, f"{name} is not for pip to install in Slicer"
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


INSTALLED_TORCH = "2.5.1+cu121"


@pytest.fixture
def versions(monkeypatch):
    """Installed versions as package metadata reports them: the real ones, unless the test sets one here."""
    fake = {}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake[name] if name in fake else real(name))
    return fake


@pytest.fixture
def newProcessTorch(monkeypatch, versions):
    """What a new PythonSlicer process finds: ``version`` (the installed torch's unless the test sets one) and,
    once asked, the ``python`` it was asked of."""
    process = {}

    def torchVersionInNewProcess(python):
        process["python"] = python
        return process["version"] if "version" in process else versions.get("torch")

    monkeypatch.setattr(paths, "pythonSlicer", lambda: "/Slicer/bin/PythonSlicer")
    monkeypatch.setattr(install, "torchVersionInNewProcess", torchVersionInNewProcess)
    return process


def _slicer(calls, version=(5, 12), testing=False):
    def pip_install(arguments):
        constraints = arguments[arguments.index("-c") + 1]
        requirements = [argument for argument in arguments if argument not in ("-c", constraints)]
        calls.append(("pip_install", Path(constraints).read_text(), requirements))

    util = SimpleNamespace(pip_install=pip_install)
    app = SimpleNamespace(majorVersion=version[0], minorVersion=version[1], testingEnabled=lambda: testing)
    return SimpleNamespace(app=app, util=util)


def _packaging(calls):
    def pip_ensure(requirements, constraints, **options):
        calls.append(("pip_ensure", Path(constraints).read_text(), requirements, options))

    return SimpleNamespace(pip_ensure=pip_ensure)


def _pyTorchUtils(calls, versions, failure=None):
    def installTorch(askConfirmation, torchVersionRequirement):
        calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        if failure is not None:
            raise failure
        versions["torch"] = INSTALLED_TORCH
        return SimpleNamespace(__version__=INSTALLED_TORCH)

    return SimpleNamespace(PyTorchUtilsLogic=lambda: SimpleNamespace(installTorch=installTorch))


def test_torch_comes_first_then_pip_ensure_held_to_that_torch(monkeypatch, versions, newProcessTorch):
    calls = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _pyTorchUtils(calls, versions))
    monkeypatch.setitem(sys.modules, "slicer.packaging", _packaging(calls))
    install.installRequirements([install.TORCH_REQUIREMENT, "monai>=1.4,<2"], _slicer(calls, (5, 12)))
    assert calls == [
        ("installTorch", False, str(Requirement(install.TORCH_REQUIREMENT).specifier)),
        ("pip_ensure", f"torch=={INSTALLED_TORCH}\n", [Requirement("monai>=1.4,<2")],
         {"prompt_install": False, "requester": "TextDiffSeg"}),
    ]
    assert newProcessTorch["python"] == "/Slicer/bin/PythonSlicer"  # torch checked again, in a new PythonSlicer


def test_older_slicer_uses_pip_install_held_to_the_installed_torch(versions, newProcessTorch):
    calls = []
    versions["torch"] = "2.2.2"
    install.installRequirements(["monai>=1.4,<2", "peft>=0.11,<1"], _slicer(calls, (5, 10)))
    assert calls == [("pip_install", "torch==2.2.2\n", ["monai>=1.4,<2", "peft>=0.11,<1"])]


@pytest.mark.parametrize("found, message", [
    ("2.9.0", "changed PyTorch 2.5.1+cu121: PyTorch 2.9.0 replaced it"),
    (None, "changed PyTorch 2.5.1+cu121: PyTorch no longer imports"),
])
def test_a_torch_that_pip_replaced_or_broke_is_explained(monkeypatch, versions, newProcessTorch, found, message):
    calls = []
    versions["torch"] = INSTALLED_TORCH
    newProcessTorch["version"] = found
    monkeypatch.setitem(sys.modules, "slicer.packaging", _packaging(calls))
    with pytest.raises(RuntimeError, match=re.escape(message)) as raised:
        install.installRequirements(["monai>=1.4,<2"], _slicer(calls))
    assert "uninstall PyTorch in the PyTorch Utils module" in str(raised.value)
    assert "'<3,>=2.2'" in str(raised.value)
    assert [call[0] for call in calls] == ["pip_ensure"]


def test_the_same_torch_with_another_spelling_of_its_version_passes(versions, newProcessTorch):
    versions["torch"] = "2.6"
    newProcessTorch["version"] = "2.6.0"
    install.installRequirements(["peft>=0.11,<1"], _slicer([], (5, 10)))


def test_nothing_is_installed_while_slicer_is_testing():
    calls = []
    with pytest.raises(RuntimeError, match="installs nothing while testing: monai"):
        install.installRequirements(["monai>=1.4,<2"], _slicer(calls, testing=True))
    assert calls == []


def test_a_missing_pytorch_extension_or_failed_torch_install_is_explained(monkeypatch, versions):
    calls = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails
    with pytest.raises(RuntimeError, match="Extensions Manager"):
        install.installRequirements([install.TORCH_REQUIREMENT], _slicer(calls))
    failure = subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "light_the_torch", "install", "torch>=2.2,<3"])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _pyTorchUtils(calls, versions, failure))
    with pytest.raises(RuntimeError, match=r"PyTorch could not be installed \(Command .* non-zero exit status 1\.\)") as raised:
        install.installRequirements([install.TORCH_REQUIREMENT, "monai>=1.4,<2"], _slicer(calls))
    assert "open the PyTorch Utils module, install PyTorch there with the version requirement '<3,>=2.2'" in str(
        raised.value)
    assert raised.value.__cause__ is failure
    assert [call[0] for call in calls] == ["installTorch"]  # and pip is not run


def _fakeTorch(folder: Path, body: str) -> str:
    """A folder holding a ``torch`` package made of ``body``, for ``PYTHONPATH``."""
    (folder / "torch").mkdir(parents=True)
    (folder / "torch" / "__init__.py").write_text(body)
    return str(folder)


def test_torch_version_is_read_in_a_new_process(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _fakeTorch(tmp_path / "good", "__version__ = '9.8.7+cu999'\n"))
    assert install.torchVersionInNewProcess(sys.executable) == "9.8.7+cu999"
    monkeypatch.setenv("PYTHONPATH", _fakeTorch(tmp_path / "broken", "raise ImportError('no libtorch_cuda.so')\n"))
    assert install.torchVersionInNewProcess(sys.executable) is None


@pytest.mark.parametrize("system, machine, numpy, refused", [
    ("Darwin", "x86_64", "2.2.6", True),   # Intel Mac, Slicer 5.10 or later
    ("Darwin", "x86_64", "1.26.4", False),  # Intel Mac, Slicer 5.8
    ("Darwin", "arm64", "2.2.6", False),
    ("Windows", "AMD64", "2.2.6", False),
    ("Linux", "x86_64", "2.2.6", False),
])
def test_intel_mac_with_numpy_2_is_refused_before_installing(monkeypatch, versions, system, machine, numpy, refused):
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    versions["numpy"] = numpy
    if not refused:
        install.checkPlatform()
        return
    calls = []
    with pytest.raises(RuntimeError, match=r"Intel Mac: .* needs numpy 1, and this Slicer comes with numpy 2\.2\.6\. "
                                           r"Use Slicer 5\.8"):
        install.installRequirements([install.TORCH_REQUIREMENT, "monai>=1.4,<2"], _slicer(calls))
    assert calls == []
