"""The model registry: which models exist, what they segment, and where their files are.

Pure JSON, no torch, so Slicer's GUI can list models cheaply. Bundled models live in
``Resources/Models/<folder>``; others download once into a cache folder, checked by sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelError, SettingsError
from .resources import resources_dir

REGISTRY_NAME = "registry.json"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    structures: tuple[str, ...]
    modality: str
    size_bytes: int
    sha256: str  # of the downloaded archive (or, for a bundled model, of its weights file)
    description: str = ""
    url: str | None = None  # a .tar.gz holding the model folder; None for bundled models
    path: str | None = None  # bundled: folder name under Resources/Models


def _registry_file() -> Path:
    return resources_dir() / "Models" / REGISTRY_NAME


def list_models() -> list[ModelInfo]:
    """Every registered model, the default first."""
    entries = json.loads(_registry_file().read_text())["models"]
    return [ModelInfo(**{**entry, "structures": tuple(entry["structures"])}) for entry in entries]


def default_model_name() -> str:
    return json.loads(_registry_file().read_text())["default"]


def model_names(text: str | None) -> list[str | None]:
    """The models ``--model`` names: ``a,b,c`` for an ensemble, one name or folder, or None (the default
    model). A folder whose name holds a comma is one model."""
    if text is None or Path(text).expanduser().is_dir():
        return [text]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise SettingsError(f"--model {text!r} names no model: give a model name or folder, or several as a,b,c")
    return names


def model_request(text: str) -> str | list[str] | None:
    """What a ``--model`` text asks a ``Segmenter`` or the worker for: None (the default model), one model,
    or a list of them (an ensemble)."""
    names = model_names(text or None)
    return names if len(names) > 1 else names[0]


def cache_dir() -> Path:
    """Where downloaded models go: ``$TEXTDIFFSEG_CACHE`` or ``~/.cache/textdiffseg``."""
    return Path(os.environ.get("TEXTDIFFSEG_CACHE", Path.home() / ".cache" / "textdiffseg")).expanduser()


def get_model_info(name: str) -> ModelInfo:
    models = {info.name: info for info in list_models()}
    if name not in models:
        raise ModelError(f"unknown model '{name}'; registered models: {', '.join(models)}. "
                         "Give a model folder path instead, or run `textdiffseg models`.")
    return models[name]


def resolve_model(name_or_dir: str | os.PathLike | None, download: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """The local folder of a model: a folder path as is, a bundled model, or a cached download."""
    if name_or_dir is None:
        name_or_dir = default_model_name()
    candidate = Path(name_or_dir).expanduser()
    if candidate.is_dir():
        return candidate
    if os.sep in str(name_or_dir) or candidate.suffix:
        raise ModelError(f"model folder {candidate} does not exist")
    info = get_model_info(str(name_or_dir))
    if info.path is not None:
        return resources_dir() / "Models" / info.path
    folder = cache_dir() / info.name
    if (folder / "config.json").is_file():
        return folder
    if not download:
        raise ModelError(f"model '{info.name}' is not downloaded yet; it will be fetched from {info.url} on first use")
    return download_model(info, folder, progress)


def download_model(info: ModelInfo, folder: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Download ``info.url`` (a .tar.gz of the model folder), check its sha256, unpack into ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as temp:
        archive = Path(temp) / "model.tar.gz"
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(info.url) as response, archive.open("wb") as out:
                total = int(response.headers.get("Content-Length") or info.size_bytes or 0)
                done = 0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except OSError as error:
            raise ModelError(f"could not download model '{info.name}' from {info.url}: {error}. "
                             "Without internet, download it elsewhere and choose its folder instead.") from None
        if digest.hexdigest() != info.sha256:
            raise ModelError(f"download of model '{info.name}' is corrupt (sha256 {digest.hexdigest()} "
                             f"instead of {info.sha256}); try again")
        unpacked = Path(temp) / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        configs = list(unpacked.rglob("config.json"))
        if len(configs) != 1:
            raise ModelError(f"the archive of model '{info.name}' does not hold one model folder")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(configs[0].parent), folder)
    return folder
