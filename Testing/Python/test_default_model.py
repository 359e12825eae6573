"""The bundled default model on real scans it was not trained on (its validation cases)."""

import json

import pytest

from TextDiffSegLib.metrics import dice
from TextDiffSegLib.registry import resolve_model
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import read_volume

LIVER, KIDNEY_LEFT = 6, 3  # BTCV label values


@pytest.fixture(scope="module")
def default_segmenter():
    return Segmenter.from_pretrained(None, device="cpu")


def test_default_model_was_validated_on_cases_it_did_not_train_on():
    record = json.loads((resolve_model(None) / "training.json").read_text())
    assert set(record["split"]["validation"]).isdisjoint(record["split"]["training"])


@pytest.mark.realdata
def test_default_model_segments_a_validation_case(default_segmenter, shared_data):
    record = json.loads((resolve_model(None) / "training.json").read_text())
    case = record["split"]["validation"][0]
    image = read_volume(shared_data / "btcv/imagesTr" / f"{case}.nii.gz")
    labels = read_volume(shared_data / "btcv/labelsTr" / f"{case}.nii.gz").array
    liver, kidney = default_segmenter.propose_many(image, ["liver", "left kidney"], num_proposals=2, seed=0)
    assert dice(liver.fused, labels == LIVER) > 0.85
    assert dice(kidney.fused, labels == KIDNEY_LEFT) > 0.7
