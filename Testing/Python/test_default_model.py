"""The bundled default model: validated on cases it did not train on, and its card's numbers reproduce."""

import json

import pytest

from TextDiffSegLib.metrics import dice
from TextDiffSegLib.registry import resolve_model
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import read_volume

LIVER = 6  # BTCV label value


@pytest.fixture(scope="module")
def bundled():
    folder = resolve_model(None)
    return folder, json.loads((folder / "training.json").read_text()), json.loads((folder / "evaluation.json").read_text())


def test_default_model_was_validated_on_cases_it_did_not_train_on(bundled):
    _, training, evaluation = bundled
    assert set(training["split"]["validation"]).isdisjoint(training["split"]["training"])
    assert set(evaluation["cases"]) == set(training["split"]["validation"])


@pytest.mark.realdata
def test_the_model_card_score_of_a_validation_case_reproduces(bundled, shared_data):
    """Segmenting the liver of the first validation case as the evaluation did gives its recorded Dice."""
    folder, training, evaluation = bundled
    case = training["split"]["validation"][0]
    recorded = next(row for row in evaluation["rows"] if row["case"] == case and row["structure"] == "liver")
    image = read_volume(shared_data / "btcv/imagesTr" / f"{case}.nii.gz")
    labels = read_volume(shared_data / "btcv/labelsTr" / f"{case}.nii.gz").array
    result = Segmenter.from_pretrained(folder).propose(
        image, "liver", num_proposals=evaluation["num_proposals"], seed=evaluation["seed"], steps=evaluation["steps"],
        fusion=evaluation["fusion"], largest_component=evaluation["largest_component"])
    measured = dice(result.fused, labels == LIVER)
    assert measured == pytest.approx(recorded["dice"], abs=0.02)
    assert measured > 0.2  # far above chance: the liver is found, on the right grid
