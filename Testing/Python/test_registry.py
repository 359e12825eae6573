"""The model registry: listing without torch, resolving names and folders, checked downloads."""

import hashlib
import subprocess
import sys
import tarfile

import pytest

from TextDiffSegLib.errors import ModelError, SettingsError
from TextDiffSegLib.modelio import load_model
from TextDiffSegLib.registry import (ModelInfo, default_model_name, download_model, list_models, model_names, model_request,
                                     resolve_model)


def test_registry_lists_the_default_model_first():
    models = list_models()
    assert models[0].name == default_model_name() == "universal-btcv"
    assert models[0].family == "universal" and models[0].modality == "CT" and models[0].path


def test_listing_models_does_not_import_torch():
    code = "import sys; from TextDiffSegLib.registry import list_models; list_models(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_model_names_split_at_commas_unless_a_folder_is_named(tmp_path):
    assert model_names("a, b,c") == ["a", "b", "c"]
    assert model_names("universal-btcv") == ["universal-btcv"] and model_names(None) == [None]
    folder = tmp_path / "model,v2"
    folder.mkdir()
    assert model_names(str(folder)) == [str(folder)]
    with pytest.raises(SettingsError, match="names no model"):
        model_names(" , ")


def test_a_model_text_asks_for_the_default_model_one_model_or_an_ensemble():
    """As the Slicer module passes its ``model`` parameter (``a,b`` when several models are ticked) to the worker."""
    assert model_request("") is None
    assert model_request("universal-btcv") == "universal-btcv"
    assert model_request("universal-btcv, textdiffseg3d-btcv") == ["universal-btcv", "textdiffseg3d-btcv"]


def test_a_folder_resolves_to_itself(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("name, message", [("no-such-model", "unknown model 'no-such-model'"),
                                           ("/no/such/folder", "does not exist")])
def test_unknown_models_are_refused(name, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(name)


def _archive(model_dir, tmp_path):
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname="tiny")
    data = archive.read_bytes()
    return archive, hashlib.sha256(data).hexdigest(), len(data)


def test_download_checks_the_checksum_and_unpacks_a_loadable_model(tiny_model_dir, tmp_path):
    archive, sha256, size = _archive(tiny_model_dir, tmp_path)
    info = ModelInfo("tiny", "universal", ("liver",), "CT", size, sha256, url=archive.as_uri())
    seen = []
    folder = download_model(info, tmp_path / "cache" / "tiny", progress=lambda done, total: seen.append((done, total)))
    assert load_model(folder).config.name == "tiny"
    assert seen[-1] == (size, size)


def test_corrupt_download_is_refused_and_leaves_nothing(tiny_model_dir, tmp_path):
    archive, _, size = _archive(tiny_model_dir, tmp_path)
    info = ModelInfo("tiny", "universal", ("liver",), "CT", size, "0" * 64, url=archive.as_uri())
    with pytest.raises(ModelError, match="corrupt"):
        download_model(info, tmp_path / "cache" / "tiny")
    assert not (tmp_path / "cache" / "tiny").exists()
    assert list((tmp_path / "cache").iterdir()) == []
