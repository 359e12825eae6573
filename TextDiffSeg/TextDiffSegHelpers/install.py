"""Which Python packages the engine still needs in Slicer's Python, and installing them.

torch comes first, through the PyTorch extension (``PyTorchUtils``), which picks the build for the
computer's GPU and driver; pip then sees torch satisfied and leaves it alone while it installs the
rest of ``Resources/requirements.txt``. Slicer's own numpy and SimpleITK are not listed there, so
pip never replaces them. Checks read package metadata only: nothing is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

from packaging.requirements import Requirement

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


def installRequirements(missing: list[str], slicer) -> None:
    """Install ``missing`` (from ``missingRequirements``) into Slicer's Python, after the user agreed.

    ``slicer`` is the ``slicer`` module. Nothing is installed while Slicer runs its tests. Raises
    ``RuntimeError`` with a message for the user when something cannot be installed.
    """
    if not missing:
        return
    if slicer.app.testingEnabled():
        raise RuntimeError(
            "TextDiffSeg's Python packages are not installed, and Slicer installs nothing while testing: "
            + ", ".join(missing)
        )
    torch = [requirement for requirement in missing if Requirement(requirement).name == "torch"]
    others = [requirement for requirement in missing if requirement not in torch]
    if torch:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                "TextDiffSeg needs the PyTorch extension: install it with the Extensions Manager, restart Slicer "
                "and try again."
            ) from None
        version = str(Requirement(torch[0]).specifier)
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=version) is None:
            raise RuntimeError(
                "PyTorch could not be installed. Open the PyTorch Utils module to install it, then try again."
            )
    if not others:
        return
    if (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):
        packaging = importlib.import_module("slicer.packaging")
        # Requirement objects: what every release of pip_ensure accepts (later ones take strings too).
        packaging.pip_ensure([Requirement(r) for r in others], prompt_install=False, requester="TextDiffSeg")
    else:
        slicer.util.pip_install(others)
