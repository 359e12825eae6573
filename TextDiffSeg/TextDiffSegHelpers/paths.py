"""Where the engine (``TextDiffSegLib``) and the shared ``Resources/`` folder are, seen from the module,
and where Slicer's own Python (``PythonSlicer``) is.

In an installed extension CMake copies both beside the module's ``TextDiffSeg.py``; in a source
checkout (Extension Wizard, "Select Extension") they sit one folder up, at the repository root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def engineRoot(moduleDir: str | os.PathLike) -> Path:
    """The folder holding ``TextDiffSegLib/`` and ``Resources/``: the module's folder or its parent."""
    moduleDir = Path(moduleDir).resolve()
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / "TextDiffSegLib" / "__init__.py").is_file() and (candidate / "Resources").is_dir():
            return candidate
    raise FileNotFoundError(
        f"TextDiffSeg's engine (TextDiffSegLib) and Resources were not found beside {moduleDir} or in its "
        "parent folder; reinstall the TextDiffSeg extension."
    )


def resourcePath(moduleDir: str | os.PathLike, relativePath: str) -> str:
    """The absolute path of a file in ``Resources/`` (for example ``"UI/TextDiffSeg.ui"``)."""
    return str(engineRoot(moduleDir) / "Resources" / relativePath)


def pythonSlicer() -> str:
    """PythonSlicer: Slicer's Python as a process of its own (Slicer puts it on the ``PATH``)."""
    python = shutil.which("PythonSlicer")
    if python is None:
        raise RuntimeError("PythonSlicer was not found beside Slicer; reinstall Slicer.")
    return python
