"""scripts/structure_statistics.py: each case's structure volumes and intensities, split as the model's."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, markdown_rows

from TextDiffSegLib.registry import resolve_model
from TextDiffSegLib.volume import read_volume

pytestmark = pytest.mark.realdata


def test_each_case_row_holds_its_spleen_volume_and_the_models_split(shared_data):
    dataset = shared_data / "chaos_t2" / "dataset.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts/structure_statistics.py"), str(dataset), "spleen",
                           "--model", "universal-chaos-t2-lora"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = markdown_rows(done.stdout)
    split = json.loads((resolve_model("universal-chaos-t2-lora") / "training.json").read_text())["split"]
    cases = split["training"] + split["validation"]
    assert set(rows) == {*cases, "training range"}
    assert all(rows[case][0] == "validation" for case in split["validation"])

    case = split["validation"][0]
    label = read_volume(shared_data / "chaos_t2" / "labelsTr" / f"{case}.nii.gz")
    spleen = label.array == 4
    assert float(rows[case][1]) == pytest.approx(spleen.sum() * np.prod(label.spacing) / 1000, abs=0.5)
    volumes = [float(rows[c][1]) for c in split["training"]]
    assert rows["training range"][1] == f"{min(volumes):.0f} to {max(volumes):.0f}"


@pytest.mark.parametrize("arguments, message", [
    (["pancreas"], "has no labels for pancreas; it labels liver, kidney_right, kidney_left, spleen"),
    (["gallblader"], "gallbladder"),  # a misspelt structure: the nearest known names
    (["spleen", "--model", "no-such-model"], "no-such-model"),
])
def test_bad_arguments_get_a_one_line_error(shared_data, arguments, message):
    done = subprocess.run([sys.executable, str(REPO / "scripts/structure_statistics.py"),
                           str(shared_data / "chaos_t2" / "dataset.json"), *arguments], capture_output=True, text=True)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
