"""The bundled models: validated on cases they did not train on, and their cards' numbers reproduce."""

import json
from pathlib import Path

import pytest
from conftest import markdown_rows

from TextDiffSegLib.datasets import read_dataset
from TextDiffSegLib.metrics import dice
from TextDiffSegLib.model_card import render_card
from TextDiffSegLib.modelio import read_config
from TextDiffSegLib.registry import list_models, resolve_model
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import read_volume

BUNDLED = [info.name for info in list_models() if info.path]


@pytest.fixture(scope="module", params=BUNDLED)
def bundled(request):
    folder = resolve_model(request.param)
    return folder, json.loads((folder / "training.json").read_text()), json.loads((folder / "evaluation.json").read_text())


def test_bundled_models_were_validated_on_cases_they_did_not_train_on(bundled):
    _, training, evaluation = bundled
    assert set(training["split"]["validation"]).isdisjoint(training["split"]["training"])
    assert set(evaluation["cases"]) == set(training["split"]["validation"])


def test_the_bundled_card_is_rendered_from_its_training_record_and_report(bundled):
    """The card a user reads states the scores, and how they were measured, of the report beside it."""
    folder, training, evaluation = bundled
    assert (folder / "README.md").read_text() == render_card(read_config(folder), training, evaluation)


def test_the_bundled_card_states_each_validation_cases_dice(bundled):
    folder, _, evaluation = bundled
    rows = markdown_rows((folder / "README.md").read_text())
    structures = list(evaluation["structures"])
    for row in evaluation["rows"]:
        assert rows[row["case"]][structures.index(row["structure"])] == f"{row['dice']:.3f}"


@pytest.mark.realdata
def test_the_model_card_score_of_a_validation_case_reproduces(bundled, shared_data):
    """Segmenting the first validation case as the evaluation did (all its structures in one call)
    gives the liver its recorded Dice."""
    folder, training, evaluation = bundled
    dataset = read_dataset(shared_data / Path(evaluation["data"]).parent.name / "dataset.json")
    case = next(c for c in dataset.cases if c.id == training["split"]["validation"][0])
    recorded = next(row for row in evaluation["rows"] if row["case"] == case.id and row["structure"] == "liver")
    liver = next(value for value, name in dataset.labels.items() if name == "liver")
    structures = list(evaluation["structures"])
    results = Segmenter.from_pretrained(folder).propose_many(
        read_volume(case.image), structures, num_proposals=evaluation["num_proposals"], seed=evaluation["seed"],
        steps=evaluation["steps"], fusion=evaluation["fusion"], largest_component=evaluation["largest_component"],
        separate=evaluation["separate"])
    measured = dice(results[structures.index("liver")].fused, read_volume(case.label).array == liver)
    assert measured == pytest.approx(recorded["dice"], abs=0.02)
    assert measured > 0.2  # far above chance: the liver is found, on the right grid
