"""Which Python packages the engine still needs in Slicer's Python, and installing them.

torch comes first, through the PyTorch extension (``PyTorchUtils``), which picks the build for the
computer's GPU and driver; its installer then imports torch into Slicer's process (TextDiffSeg itself
only uses torch in its worker process). The rest of ``Resources/requirements.txt`` is installed with
pip under a constraint that pins the installed torch, as SlicerTotalSegmentator keeps torch out of
its pip installs: pip then picks releases that work with that torch (an older monai rather than one
that needs a newer torch) instead of replacing it with a build from the package index, which on
Windows is a CPU-only one. A new Python process must still import the same torch afterwards. Slicer's
own numpy and SimpleITK are not listed in requirements.txt, so pip never replaces them. The checks
read package metadata only: nothing is imported here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from TextDiffSegHelpers import paths

#: torch as the engine needs it; kept out of requirements.txt so that pip never installs it.
TORCH_REQUIREMENT = "torch>=2.2,<3"


def loadRequirements(path: str | os.PathLike) -> list[Requirement]:
    """The requirements in a requirements.txt (comments, blank lines and pip options skipped)."""
    with open(path, encoding="utf-8") as file:
        lines = (line.split("#", 1)[0].strip() for line in file)
        return [Requirement(line) for line in lines if line and not line.startswith("-")]


def isSatisfied(requirement: Requirement) -> bool:
    """Whether an installed distribution satisfies the requirement (or its marker excludes this Python)."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    try:
        installed = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(installed, prereleases=True)


def missingRequirements(requirementsPath: str | os.PathLike) -> list[str]:
    """The requirements to install, torch first when it is missing."""
    requirements = [Requirement(TORCH_REQUIREMENT)] + loadRequirements(requirementsPath)
    return [str(requirement) for requirement in requirements if not isSatisfied(requirement)]


def checkPlatform() -> None:
    """Raise ``RuntimeError``, saying what to do, where no PyTorch works with this Slicer's numpy.

    PyTorch's last release for Intel Macs (2.2) was built for numpy 1, and Slicer 5.10 and later come
    with numpy 2: the worker would fail as soon as it hands an image to torch.
    """
    if platform.system() != "Darwin" or platform.machine() != "x86_64":
        return
    numpy = importlib.metadata.version("numpy")
    if Version(numpy).major >= 2:
        raise RuntimeError(
            f"TextDiffSeg cannot run in this Slicer on an Intel Mac: the last PyTorch for Intel Macs (2.2) needs "
            f"numpy 1, and this Slicer comes with numpy {numpy}. Use Slicer 5.8 (it comes with numpy 1.26) on this "
            "Mac, or a Mac with Apple silicon, Windows or Linux; or run the textdiffseg command line in a Python "
            "environment with numpy<2 and torch 2.2."
        )


def installRequirements(missing: list[str], slicer) -> None:
    """Install ``missing`` (from ``missingRequirements``) into Slicer's Python, after the user agreed.

    ``slicer`` is the ``slicer`` module. Nothing is installed while Slicer runs its tests. Raises
    ``RuntimeError`` with a message for the user when something cannot be installed.
    """
    if not missing:
        return
    checkPlatform()
    if slicer.app.testingEnabled():
        raise RuntimeError(
            "TextDiffSeg's Python packages are not installed, and Slicer installs nothing while testing: "
            + ", ".join(missing)
        )
    torch = [requirement for requirement in missing if Requirement(requirement).name == "torch"]
    others = [requirement for requirement in missing if requirement not in torch]
    if torch:
        installTorch(str(Requirement(torch[0]).specifier))
    if not others:
        return
    torchVersion = importlib.metadata.version("torch")
    with tempfile.TemporaryDirectory(prefix="TextDiffSeg-") as folder:
        constraints = Path(folder) / "keep-torch.txt"
        constraints.write_text(f"torch=={torchVersion}\n", encoding="utf-8")
        if (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):
            packaging = importlib.import_module("slicer.packaging")
            # Requirement objects: what every release of pip_ensure accepts (later ones take strings too).
            packaging.pip_ensure([Requirement(r) for r in others], constraints=str(constraints), prompt_install=False,
                                 requester="TextDiffSeg")
        else:
            slicer.util.pip_install(["-c", str(constraints), *others])
    checkTorchUnchanged(torchVersion, paths.pythonSlicer())


def installTorch(versionRequirement: str) -> None:
    """Install torch through the PyTorch extension; ``RuntimeError`` saying what to do when that fails."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(
            "TextDiffSeg needs the PyTorch extension: install it with the Extensions Manager, restart Slicer "
            "and try again."
        ) from None
    try:
        # Without confirmation it returns torch or raises: light-the-torch's pip, or importing torch, failed.
        PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=versionRequirement)
    except Exception as error:
        raise RuntimeError(
            f"PyTorch could not be installed ({error}). Restart Slicer, open the PyTorch Utils module, install "
            f"PyTorch there with the version requirement '{versionRequirement}' (uninstall it first if it is "
            "listed as installed), restart Slicer and try again."
        ) from error


def torchVersionInNewProcess(python: str) -> str | None:
    """The torch version a new ``python`` process imports; None when it cannot import torch."""
    result = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
        creationflags=subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def checkTorchUnchanged(version: str, python: str) -> None:
    """Raise ``RuntimeError``, saying what to do, unless a new ``python`` process imports torch ``version``."""
    found = torchVersionInNewProcess(python)
    if found is not None and Version(found) == Version(version):
        return
    now = "PyTorch no longer imports" if found is None else f"PyTorch {found} replaced it"
    raise RuntimeError(
        f"Installing TextDiffSeg's Python packages changed PyTorch {version}: {now}. Restart Slicer, uninstall "
        f"PyTorch in the PyTorch Utils module, restart Slicer, install PyTorch there with the version requirement "
        f"'{Requirement(TORCH_REQUIREMENT).specifier}', restart Slicer and try again."
    )
