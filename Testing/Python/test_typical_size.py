"""The training cases' structure volumes, and the warning for a result far outside them."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from TextDiffSegLib.datasets import PreparedCase
from TextDiffSegLib.families.base import Predictor
from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.terminology import get_structure
from TextDiffSegLib.typical_size import MARGIN, enlargement, read_volume_ranges, size_warning, training_volume_ranges
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


def test_enlargement_is_the_length_ratio_beyond_the_warning_margin():
    spleen, ranges = get_structure("spleen"), {"spleen": [60.0, 400.0]}
    assert enlargement(spleen, 400.0 * MARGIN, ranges) == 1.0  # a warning's margin of normal variation
    assert enlargement(spleen, 3200.0, ranges) == pytest.approx(2.0)  # 8 times the volume: twice the length
    assert enlargement(spleen, 1.0, ranges) == 1.0  # smaller: nothing to look for on a coarser grid
    assert enlargement(get_structure("liver"), 1e6, ranges) == 1.0  # no range known


# --- the second look at an enlarged structure ----------------------------------------------------

SCAN = Volume(np.zeros((10, 20, 20), np.int16), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))  # 0.001 ml a voxel


class SlicesFound(Predictor):
    """A family's predictor that finds ``found[(structure, in-plane spacing of the model grid)]`` = (the first so
    many whole z-slices, at this probability), and records the looks it was asked for."""

    def __init__(self, model, device, found: dict[tuple[str, float], tuple[int, float]]):
        super().__init__(model, device)
        self.found, self.looks = found, []

    def prepare(self, image, spacing):
        return round(spacing[0], 3), image.shape

    def condition(self, text, index):
        return self.config.structures[index]

    def sample(self, prepared, condition, seed, steps, scheduler, on_step):
        spacing, shape = prepared
        self.looks.append((condition, spacing))
        slices, probability = self.found[(condition, spacing)]
        found = np.zeros(shape, np.float32)
        found[:slices] = probability
        return found


def _segmenter(found) -> Segmenter:
    """A segmenter whose model grid is the scan's grid (1 mm), sampling what ``found`` says."""
    segmenter = Segmenter(UniversalModel(tiny_config(spacing=(1.0, 1.0, 1.0))), "tiny", torch.device("cpu"))
    segmenter.predictor = SlicesFound(segmenter.model, segmenter.device, found)
    return segmenter


@pytest.mark.parametrize("second_look_slices, kept_scale", [(7, 2.0), (3, 1.0)])
def test_a_structure_far_larger_than_the_training_cases_is_sampled_again_on_a_coarser_grid(
        second_look_slices, kept_scale):
    """The liver found first measures 4 slices of 400 voxels, 1.6 ml: beyond the 0.1-0.2 ml of its training
    record times the margin, and 2 times the largest in length, so it is sampled again on a grid of 2 mm in-plane;
    the second look is kept only where it finds more. The spleen, within its range, and the kidney, with
    none, are sampled once."""
    segmenter = _segmenter({("liver", 1.0): (4, 0.9), ("liver", 2.0): (second_look_slices, 0.9),
                            ("spleen", 1.0): (1, 0.6), ("kidney_left", 1.0): (1, 0.6)})
    segmenter.volume_ranges = {"liver": [0.1, 0.2], "spleen": [0.1, 1.0]}
    looks = segmenter.predictor.looks
    liver, spleen, kidney = segmenter.propose_many(SCAN, ["liver", "spleen", "left kidney"], num_proposals=1,
                                                   separate=False)
    assert looks == [("liver", 1.0), ("spleen", 1.0), ("kidney_left", 1.0), ("liver", 2.0)]
    assert liver.sampling_scale == kept_scale and liver.fused.sum() == 400 * max(4, second_look_slices)
    assert ("sampled a second time, on a grid 2.00 times coarser" in liver.warning) == (kept_scale > 1)
    assert spleen.sampling_scale == kidney.sampling_scale == 1.0 and spleen.warning is None

    looks.clear()
    segmenter.propose_many(SCAN, ["liver", "spleen", "left kidney"], num_proposals=1, separate=False, second_look=False)
    assert looks == [("liver", 1.0), ("spleen", 1.0), ("kidney_left", 1.0)]


def test_the_second_look_is_measured_after_and_separated_like_the_first():
    """The liver's first look (its first 4 slices, 1600 voxels) overlaps the more probable spleen's (the first 2),
    which leaves it 800 voxels, 0.8 ml. Against a largest training liver of 0.6 ml that is within the margin,
    no second look; against 0.4 ml it is twice the volume, so it is looked at again on a grid 2 ** (1/3)
    times coarser in-plane. That look (every slice, less probable than the spleen) is separated from the spleen too."""
    coarser = round(2 ** (1 / 3), 3)
    segmenter = _segmenter({("liver", 1.0): (4, 0.6), ("spleen", 1.0): (2, 0.9), ("liver", coarser): (10, 0.6)})
    looks = segmenter.predictor.looks
    segmenter.volume_ranges = {"liver": [0.1, 0.6]}
    liver, spleen = segmenter.propose_many(SCAN, ["liver", "spleen"], num_proposals=1)
    assert looks == [("liver", 1.0), ("spleen", 1.0)] and liver.fused.sum() == 800 and liver.sampling_scale == 1.0

    looks.clear()
    segmenter.volume_ranges = {"liver": [0.1, 0.4]}
    liver, spleen = segmenter.propose_many(SCAN, ["liver", "spleen"], num_proposals=1)
    assert looks == [("liver", 1.0), ("spleen", 1.0), ("liver", coarser)]
    assert liver.sampling_scale == pytest.approx(2 ** (1 / 3))
    assert liver.fused.sum() == SCAN.array.size - 800 and spleen.fused.sum() == 800
    assert not (liver.fused & spleen.fused).any()
