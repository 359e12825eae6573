"""Where the bundled resources (terminology, models, icons) live.

In a source checkout and in an installed Slicer extension, ``Resources/`` sits beside the
``TextDiffSegLib`` package; in a pip-installed wheel it is packaged inside it.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    """The folder holding ``Terminology/``, ``Models/``, ``Icons/`` and ``UI/``."""
    for candidate in (_PACKAGE_DIR / "Resources", _PACKAGE_DIR.parent / "Resources"):
        if (candidate / "Terminology").is_dir():
            return candidate
    raise FileNotFoundError(f"TextDiffSeg resources were not found beside {_PACKAGE_DIR}; reinstall the package.")
