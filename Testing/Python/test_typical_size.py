"""The training cases' structure volumes, and the warning for a result far outside them."""

import json

import numpy as np

from TextDiffSegLib.datasets import PreparedCase
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.terminology import get_structure
from TextDiffSegLib.typical_size import MARGIN, read_volume_ranges, size_warning, training_volume_ranges
from TextDiffSegLib.volume import Volume


def test_ranges_are_the_smallest_and_largest_volume_of_the_cases_that_contain_the_structure():
    """On a 2 x 2 x 5 mm grid a voxel is 0.02 ml: 100 and 300 liver voxels are 2 and 6 ml; the spleen is
    in one case only, and the kidney in none, so it has no range."""
    first, second = np.zeros((10, 10, 10), dtype=np.uint8), np.zeros((10, 10, 10), dtype=np.uint8)
    first[:1] = 1  # 100 liver voxels
    second[:3] = 1  # 300 liver voxels
    second[5, :5, :5] = 2  # 25 spleen voxels
    structures = ("liver", "spleen", "kidney_left")
    cases = [PreparedCase(name, np.zeros_like(label), label, structures) for name, label in (("a", first), ("b", second))]
    ranges = training_volume_ranges(cases, structures, (2.0, 2.0, 5.0))
    assert ranges == {"liver": [2.0, 6.0], "spleen": [0.5, 0.5]}


def test_only_a_volume_beyond_the_margin_gets_a_warning():
    spleen, ranges = get_structure("spleen"), {"spleen": [60.0, 420.0]}
    assert size_warning(spleen, 60.0 / MARGIN + 1, ranges) is None
    assert size_warning(spleen, 420.0 * MARGIN - 1, ranges) is None
    larger = size_warning(spleen, 1650.0, ranges)
    assert larger.startswith("the spleen found measures 1650 ml, far outside the 60-420 ml of the model's training cases")
    assert "larger than any the model was trained on" in larger and larger.endswith("check it slice by slice")
    smaller = size_warning(spleen, 10.0, ranges)
    assert "10 ml" in smaller and "show only part of it" in smaller
    assert size_warning(get_structure("liver"), 10.0, ranges) is None  # no range known: nothing to say


def test_the_segmenter_warns_of_a_result_outside_its_training_record(size_checked_model_dir, tiny_model_dir):
    assert read_volume_ranges(size_checked_model_dir) == {"liver": [1e6, 2e6]}
    assert read_volume_ranges(tiny_model_dir) == {}  # no training record
    scan = Volume(np.random.default_rng(0).normal(0, 100, (12, 40, 40)).astype(np.float32), spacing=(6.0, 6.0, 9.0),
                  origin=(0.0, 0.0, 0.0))
    liver, kidney = Segmenter.from_pretrained(size_checked_model_dir).propose_many(scan, ["liver", "left kidney"],
                                                                                num_proposals=2)
    assert liver.warning.startswith("the liver found measures") and "far outside the 1000000-2000000 ml" in liver.warning
    assert kidney.warning is None
    assert all(r.warning is None for r in Segmenter.from_pretrained(tiny_model_dir).propose_many(scan, ["liver"], 2))


def test_a_record_without_ranges_means_no_warnings(tmp_path):
    (tmp_path / "training.json").write_text(json.dumps({"settings": {}, "split": {}}))
    assert read_volume_ranges(tmp_path) == {}


def test_an_empty_result_is_below_any_range():
    assert "measures 0 ml" in size_warning(get_structure("liver"), 0.0, {"liver": [1000.0, 2500.0]})
