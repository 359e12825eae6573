"""Extension packaging: CMake lists every file and nothing missing, metadata agrees across the
CMakeLists.txt, the .s4ext and the catalog entry (valid against Slicer's schema), and the module
finds the engine and Resources/ both in a source checkout and where CMake installs them.
"""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "TextDiffSeg"
SCHEMA = REPO.parent / "shared" / "slicer" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
sys.path.insert(0, str(MODULE_DIR))
from TextDiffSegHelpers import paths  # noqa: E402


def _cmakeLists(path: Path) -> dict[str, list[str]]:
    """The ``set(NAME value...)`` lists of a CMakeLists.txt, with ``${MODULE_NAME}`` expanded."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    variables = {}
    for name, body in re.findall(r"set\((\w+)\s*(.*?)\)", text, re.S):
        values = re.findall(r'"[^"]*"|\S+', body)
        variables[name] = [v.strip('"') for v in values]
    for name, values in variables.items():
        variables[name] = [v.replace("${MODULE_NAME}", variables.get("MODULE_NAME", ["?"])[0]) for v in values]
    return variables


TOP = _cmakeLists(REPO / "CMakeLists.txt")
MODULE = _cmakeLists(MODULE_DIR / "CMakeLists.txt")


def _files(folder: Path, base: Path, pattern: str = "*") -> set[str]:
    """Files under ``folder`` (compiled Python left out), as paths relative to ``base``."""
    return {
        path.relative_to(base).as_posix()
        for path in folder.rglob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_every_listed_file_exists():
    for variable in ("ENGINE_PYTHON_SCRIPTS", "ENGINE_RESOURCES"):
        for name in TOP[variable]:
            assert (REPO / name).is_file(), f"CMakeLists.txt {variable} lists {name}, which does not exist"
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for name in MODULE.get(variable, []):
            assert (MODULE_DIR / name).is_file(), f"TextDiffSeg/CMakeLists.txt {variable} lists {name}, which does not exist"


def test_every_file_is_listed():
    assert _files(MODULE_DIR, MODULE_DIR, "*.py") == set(MODULE["MODULE_PYTHON_SCRIPTS"])
    assert MODULE.get("MODULE_PYTHON_RESOURCES", []) == []  # they are the repository's Resources/
    assert not (MODULE_DIR / "Resources").exists(), "module resources belong in the repository's Resources/"
    assert _files(REPO / "TextDiffSegLib", REPO, "*.py") == set(TOP["ENGINE_PYTHON_SCRIPTS"])
    assert _files(REPO / "Resources", REPO) == set(TOP["ENGINE_RESOURCES"])


def test_extension_metadata_is_complete_and_consistent():
    assert TOP["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert TOP["EXTENSION_DEPENDS"] == ["PyTorch"]
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert TOP[f"EXTENSION_{key}"] and TOP[f"EXTENSION_{key}"][0], key
    description = re.search(r'set\(EXTENSION_DESCRIPTION "(.*?)"\)\n', (REPO / "CMakeLists.txt").read_text(), re.S).group(1)

    s4ext = {}
    for line in (REPO / "TextDiffSeg.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value
    assert s4ext["category"] == "Segmentation" and s4ext["depends"] == "PyTorch"
    assert s4ext["homepage"] == TOP["EXTENSION_HOMEPAGE"][0]
    assert s4ext["iconurl"] == TOP["EXTENSION_ICONURL"][0]
    assert s4ext["screenshoturls"] == TOP["EXTENSION_SCREENSHOTURLS"][0]
    assert s4ext["description"] == description.replace('\\"', '"')
    # SlicerExtensionCPack.cmake passes the values unquoted: CMake would cut them at a ';' (issue 30, defect 1).
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "CATEGORY"):
        assert ";" not in TOP[f"EXTENSION_{key}"][0], key
    assert ";" not in s4ext["description"]
    assert s4ext["scmurl"].removesuffix(".git") == TOP["EXTENSION_HOMEPAGE"][0]

    # the icon and screenshot URLs point at files of this repository (on its main branch)
    for url in (TOP["EXTENSION_ICONURL"][0], TOP["EXTENSION_SCREENSHOTURLS"][0]):
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{url} names {relative}, which is not in the repository"
    icon = REPO / TOP["EXTENSION_ICONURL"][0].split("/main/", 1)[1]
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sitk.ReadImage(str(icon)).GetSize() == (128, 128)


def test_catalog_entry_is_valid_and_agrees_with_cmake():
    entry = json.loads((REPO / "TextDiffSeg.json").read_text())
    jsonschema.validate(entry, json.loads(SCHEMA.read_text()))
    assert entry["$schema"].endswith(SCHEMA.name + "#")
    assert entry["category"] == TOP["EXTENSION_CATEGORY"][0]
    assert entry["build_dependencies"] == TOP["EXTENSION_DEPENDS"]
    assert entry["scm_url"] == TOP["EXTENSION_HOMEPAGE"][0]


def test_catalog_schema_rejects_a_malformed_entry():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"$schema": "x", "category": "Segmentation"}, json.loads(SCHEMA.read_text()))


def test_source_checkout_layout_is_found():
    assert paths.engineRoot(MODULE_DIR) == REPO
    assert Path(paths.resourcePath(MODULE_DIR, "UI/TextDiffSeg.ui")).is_file()


CHECK_INSTALLED = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    class Blocked:  # Slicer's GUI and torch are not needed by the helpers or the engine's light parts
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"qt", "ctk", "torch"}:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocked())
    modules = Path(sys.argv[1])
    sys.path.insert(0, str(modules))  # Slicer puts the scripted module's folder on sys.path
    from TextDiffSegHelpers import gallery, install, mrml, paths, prompts, worker_client
    from TextDiffSegLib import registry, resources, terminology

    assert paths.engineRoot(modules) == modules, paths.engineRoot(modules)
    assert Path(paths.resourcePath(modules, "UI/TextDiffSeg.ui")).is_file()
    assert Path(paths.resourcePath(modules, "Icons/TextDiffSeg.png")).is_file()
    assert install.missingRequirements(paths.resourcePath(modules, "requirements.txt")) is not None
    assert resources.resources_dir() == modules / "Resources", resources.resources_dir()
    assert terminology.get_structure("liver").display_name == "liver"
    assert registry.default_model_name() in [info.name for info in registry.list_models()]
    assert Path(terminology.__file__).resolve().is_relative_to(modules.resolve()), terminology.__file__
    print("ok")
    """
)


def test_installed_layout_is_found_and_imports_without_qt_or_torch(tmp_path):
    """Lay the files out as the CMake lists install them and use them from there, away from the source."""
    modules = tmp_path / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    for name in MODULE["MODULE_PYTHON_SCRIPTS"]:
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODULE_DIR / name, modules / name)
    for name in TOP["ENGINE_PYTHON_SCRIPTS"] + TOP["ENGINE_RESOURCES"]:
        (modules / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, modules / name)
    script = tmp_path / "check.py"
    script.write_text(CHECK_INSTALLED)
    result = subprocess.run([sys.executable, str(script), str(modules)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
