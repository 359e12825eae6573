"""Several models asked together (``ensemble.Ensemble``, ``textdiffseg segment --model a,b``).

Tiny random models of two families, the universal one (its masks cover the scan) and a ProGiDiff one
(its masks cover part of it), from ``test_family_conformance``. Each model must sample in the ensemble
exactly what it samples alone; the ensemble's set must be the fusion of all those proposals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import slicerio
import torch
from conftest import TINY_STRUCTURES, rotation
from test_cli import assert_same_geometry, ijk_to_lps, run
from test_family_conformance import SCAN, TINY_FAMILIES, dataset, tiny_model  # noqa: F401 - dataset: a fixture

from TextDiffSegLib.ensemble import Ensemble
from TextDiffSegLib.evaluation import cross_validated_weighting, evaluate, model_report, weight_candidates
from TextDiffSegLib.errors import DataError, EnsembleWarning, PromptError, SettingsError
from TextDiffSegLib.families import FAMILIES
from TextDiffSegLib.fusion import agreement_scores, fuse, uncertainty_map
from TextDiffSegLib.model_card import render_card
from TextDiffSegLib.modelio import read_config, save_model
from TextDiffSegLib.registry import resolve_model
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.volume import Volume, read_volume, write_volume
from TextDiffSegLib.worker import Worker

FAST = dict(num_proposals=2, seed=3, steps=2)
#: The scan on an oblique grid of its own (neither model's spacing), to keep the geometry honest.
OBLIQUE = Volume(SCAN.array, spacing=(5.0, 5.5, 8.0), origin=(-80.0, 20.5, 100.0),
                 direction=tuple(rotation("z", 20).ravel()))


def progidiff(structures=TINY_STRUCTURES) -> torch.nn.Module:
    """The tiny ProGiDiff model, knowing ``structures``."""
    torch.manual_seed(0)
    return FAMILIES["progidiff"].model(TINY_FAMILIES["progidiff"][0](structures=structures)).eval()


@pytest.fixture(scope="module")
def universal_model() -> Segmenter:
    return Segmenter(tiny_model("universal"), "tiny", torch.device("cpu"))


@pytest.fixture(scope="module")
def progidiff_model() -> Segmenter:
    return Segmenter(progidiff(), "tiny-progidiff", torch.device("cpu"))


@pytest.fixture(scope="module")
def liver_only(universal_model) -> Segmenter:
    """A ProGiDiff model that knows the liver and spleen, not the kidneys."""
    return Segmenter(progidiff(("liver", "spleen")), "tiny-progidiff", torch.device("cpu"))


@pytest.fixture(scope="module")
def liver(universal_model, progidiff_model):
    """The liver sampled by the ensemble (with its progress events), and by each model alone."""
    events = []
    together = Ensemble([universal_model, progidiff_model]).propose(
        OBLIQUE, "liver", **FAST, largest_component=False, callback=events.append)
    alone = [model.propose(OBLIQUE, "liver", **FAST, largest_component=False)
             for model in (universal_model, progidiff_model)]
    return together, alone, events


def test_each_proposal_is_labelled_with_its_model_and_seed(liver):
    together, alone, _ = liver
    assert together.models == ["tiny", "tiny", "tiny-progidiff", "tiny-progidiff"]
    assert together.seeds == [3, 4, 3, 4]
    assert together.model == "tiny,tiny-progidiff"
    for mask, expected in zip(together.proposals, alone[0].proposals + alone[1].proposals):
        np.testing.assert_array_equal(mask, expected)  # each model samples in the ensemble what it samples alone
    assert alone[0].models == ["tiny", "tiny"] and alone[0].model == "tiny"  # one model's set names it too


def test_the_fusion_and_the_uncertainty_are_of_all_proposals_of_all_models(liver):
    together, alone, _ = liver
    np.testing.assert_allclose(together.mean_probability, (alone[0].mean_probability + alone[1].mean_probability) / 2,
                               atol=1e-6)
    np.testing.assert_array_equal(together.fused, fuse([together.mean_probability]))
    np.testing.assert_array_equal(together.uncertainty, uncertainty_map([together.mean_probability]))
    assert together.scores == agreement_scores(together.proposals)
    assert not any(np.array_equal(together.fused, model.fused) for model in alone)  # neither model's alone


@pytest.mark.parametrize("fusion", ["majority", "staple"])
def test_majority_and_staple_fuse_every_proposal(fusion, universal_model, progidiff_model):
    together = Ensemble([universal_model, progidiff_model]).propose(OBLIQUE, "liver", **FAST, fusion=fusion,
                                                                     largest_component=False)
    np.testing.assert_array_equal(together.fused, fuse(together.proposals, fusion))
    assert together.fusion == fusion


def test_progress_runs_once_from_start_to_end_over_the_models(liver):
    *_, events = liver
    fractions = [event["fraction"] for event in events]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert [event["stage"] for event in events].count("done") == 1 and events[-1]["stage"] == "done"
    assert any(event["message"].startswith("tiny: ") for event in events)
    assert any(event["message"].startswith("tiny-progidiff: ") for event in events)
    halfway = [event["fraction"] for event in events if event["message"].startswith("tiny-progidiff: ")]
    assert min(halfway) == 0.5  # each model has its share of the run


def test_a_structure_one_model_does_not_know_is_asked_of_the_other_only(universal_model, liver_only, monkeypatch):
    asked = []
    propose_many = Segmenter.propose_many

    def recording(segmenter, volume, prompts, *args, **kwargs):
        asked.append((segmenter.name, list(prompts)))
        return propose_many(segmenter, volume, prompts, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "propose_many", recording)
    with pytest.warns(EnsembleWarning, match="^left kidney is asked only of tiny: tiny-progidiff cannot segment it$"):
        liver, kidney = Ensemble([universal_model, liver_only]).propose_many(OBLIQUE, ["liver", "L kidney"], **FAST)
    assert asked == [("tiny", ["liver", "L kidney"]), ("tiny-progidiff", ["liver"])]
    assert liver.models == ["tiny", "tiny", "tiny-progidiff", "tiny-progidiff"]
    assert kidney.models == ["tiny", "tiny"] and kidney.model == "tiny"
    alone = propose_many(universal_model, OBLIQUE, ["L kidney"], **FAST)[0]
    np.testing.assert_array_equal(kidney.mean_probability, alone.mean_probability)  # one model's mean, unchanged


def test_a_structure_no_model_knows_is_refused_before_sampling(universal_model, liver_only):
    with pytest.raises(PromptError, match="none of the models tiny, tiny-progidiff can segment 'aorta'.*liver"):
        Ensemble([universal_model, liver_only]).propose_many(OBLIQUE, ["liver", "aorta"], **FAST)


def test_every_result_lies_on_the_input_grid(universal_model, liver_only):
    with pytest.warns(EnsembleWarning):
        results = Ensemble([universal_model, liver_only]).propose_many(OBLIQUE, ["spleen", "L kidney"], **FAST)
    for result in results:
        for array in (*result.proposals, result.mean_probability, result.fused, result.uncertainty):
            assert array.shape == OBLIQUE.array.shape
    assert not (results[0].fused & results[1].fused).any()  # kept apart


def test_weights_give_each_model_its_say_in_the_mean_probability(liver, universal_model, progidiff_model):
    _, alone, _ = liver
    weighed = Ensemble([universal_model, progidiff_model], {"Liver": {"tiny": 3, "tiny-progidiff": 1}}).propose(
        OBLIQUE, "liver", **FAST, largest_component=False)
    np.testing.assert_allclose(weighed.mean_probability,
                               0.75 * alone[0].mean_probability + 0.25 * alone[1].mean_probability, atol=1e-6)
    assert weighed.models == ["tiny", "tiny", "tiny-progidiff", "tiny-progidiff"]  # every proposal still shown
    only_universal = Ensemble([universal_model, progidiff_model], {"liver": {"tiny": 1, "tiny-progidiff": 0}})
    result = only_universal.propose(OBLIQUE, "liver", **FAST, largest_component=False)
    np.testing.assert_array_equal(result.fused, alone[0].fused)
    np.testing.assert_array_equal(result.uncertainty, alone[0].uncertainty)


@pytest.mark.parametrize("weights, message", [
    ({"liver": {"tiny": 1}}, "must give each model of the ensemble a weight: tiny, tiny-progidiff"),
    ({"liver": {"tiny": 1, "tiny-progidiff": -1}}, "numbers, 0 or more, not all 0"),
    ({"liver": {"tiny": 0, "tiny-progidiff": 0}}, "numbers, 0 or more, not all 0"),
    ({"liver": {"tiny": "a lot", "tiny-progidiff": 1}}, "numbers, 0 or more"),
])
def test_weights_that_do_not_fit_the_ensemble_are_refused(universal_model, progidiff_model, weights, message):
    with pytest.raises(SettingsError, match=message):
        Ensemble([universal_model, progidiff_model], weights)


def test_a_model_named_twice_is_refused(universal_model):
    with pytest.raises(SettingsError, match="two of the ensemble's models are named 'tiny'"):
        Ensemble([universal_model, universal_model])


# --- the command line and the worker ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    return write_volume(tmp_path_factory.mktemp("scan") / "scan.nrrd", OBLIQUE)


@pytest.fixture(scope="module")
def liver_only_dir(tmp_path_factory):
    """The ProGiDiff model of ``liver_only`` as a model folder."""
    return save_model(progidiff(("liver", "spleen")), tmp_path_factory.mktemp("models") / "tiny-progidiff", half=False)


def test_the_command_line_writes_each_proposals_model_on_the_input_grid(capsys, tmp_path, scan_file, tiny_model_dir,
                                                                        liver_only_dir):
    output, proposals = tmp_path / "result.seg.nrrd", tmp_path / "proposals"
    code, out, err = run(capsys, "segment", "-i", scan_file, "-p", "liver", "-p", "L kidney", "-o", output,
                         "--model", f"{tiny_model_dir},{liver_only_dir}", "--steps", 2, "--proposals", 2,
                         "--proposals-dir", proposals, "--uncertainty", tmp_path / "uncertainty.nii.gz",
                         "--progress", "none")
    assert code == 0, err
    assert "textdiffseg: warning: left kidney is asked only of tiny: tiny-progidiff cannot segment it" in err

    segmentation = slicerio.read_segmentation(str(output))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(OBLIQUE), atol=1e-5)
    assert segmentation["voxels"].shape[-3:] == tuple(reversed(OBLIQUE.array.shape))
    fused = {segment["id"]: segment["tags"] for segment in segmentation["segments"]}
    assert fused["liver"]["TextDiffSeg.model"] == "tiny,tiny-progidiff"
    assert fused["kidney_left"]["TextDiffSeg.model"] == "tiny"
    assert fused["liver"]["TextDiffSeg.proposals"] == "4" and fused["kidney_left"]["TextDiffSeg.proposals"] == "2"

    written = sorted(path.name for path in proposals.iterdir())
    assert written == [f"kidney_left_proposal{k}.seg.nrrd" for k in (1, 2)] + \
        [f"liver_proposal{k}.seg.nrrd" for k in (1, 2, 3, 4)]
    tags = [slicerio.read_segmentation(str(proposals / f"liver_proposal{k}.seg.nrrd"))["segments"][0]["tags"]
            for k in (1, 2, 3, 4)]
    assert [tag["TextDiffSeg.model"] for tag in tags] == ["tiny", "tiny", "tiny-progidiff", "tiny-progidiff"]
    assert [tag["TextDiffSeg.seed"] for tag in tags] == ["0", "1", "0", "1"]
    uncertainty = [tmp_path / f"uncertainty_{name}.nii.gz" for name in ("liver", "kidney_left")]
    for path in [*proposals.iterdir(), *uncertainty]:
        assert_same_geometry(read_volume(path), OBLIQUE)


def test_one_model_on_the_command_line_gives_what_the_segmenter_gives(capsys, tmp_path, scan_file, tiny_model_dir):
    output = tmp_path / "result.nii.gz"
    code, _, err = run(capsys, "segment", "-i", scan_file, "-p", "liver", "-p", "spleen", "-o", output,
                       "--model", tiny_model_dir, "--steps", 2, "--proposals", 2, "--progress", "none")
    assert code == 0, err
    liver, spleen = Segmenter.from_pretrained(tiny_model_dir).propose_many(OBLIQUE, ["liver", "spleen"], 2, 0, 2)
    labels = read_volume(output).array
    np.testing.assert_array_equal(labels == 1, liver.fused.astype(bool) & ~spleen.fused.astype(bool))
    np.testing.assert_array_equal(labels == 2, spleen.fused.astype(bool))


def test_the_worker_asks_a_list_of_models_together(tmp_path, scan_file, tiny_model_dir, liver_only_dir):
    events = []
    request = dict(id=1, command="segment", input=str(scan_file), prompts=["liver", "left kidney"], steps=2,
                   model=[str(tiny_model_dir), str(liver_only_dir)], num_proposals=2, device="cpu",
                   output_dir=str(tmp_path))
    Worker(events.append).handle(request)
    assert events[-1]["type"] == "result", events[-1]
    liver, kidney = events[-1]["results"]
    assert liver["models"] == ["tiny", "tiny", "tiny-progidiff", "tiny-progidiff"] and liver["seeds"] == [0, 1, 0, 1]
    assert liver["model"] == "tiny,tiny-progidiff" and len(liver["proposals"]) == 4
    assert kidney["models"] == ["tiny", "tiny"] and "left kidney is asked only of tiny" in kidney["warning"]
    assert liver["warning"] is None or "kidney" not in liver["warning"]  # said with the structure it concerns only
    fractions = [event["fraction"] for event in events if event["type"] == "progress" and event["stage"] == "sample"]
    assert fractions == sorted(fractions)


def test_the_worker_weighs_the_models_as_asked_from_an_object_or_a_file(tmp_path, scan_file, tiny_model_dir,
                                                                       liver_only_dir):
    def fused(name, **request):
        events = []
        output = tmp_path / name
        output.mkdir()
        Worker(events.append).handle(dict(id=1, command="segment", input=str(scan_file), prompts=["liver"], steps=2,
                                          num_proposals=2, device="cpu", output_dir=str(output), **request))
        assert events[-1]["type"] == "result", events[-1]
        return read_volume(events[-1]["results"][0]["fused"]).array

    models = [str(tiny_model_dir), str(liver_only_dir)]
    tiny_only = {"liver": {"tiny": 1, "tiny-progidiff": 0}}
    report = tmp_path / "report.json"  # an evaluate report of the ensemble, holding the weights it chose
    report.write_text(json.dumps({"weighting": {"weights": tiny_only}}))
    alone = fused("alone", model=str(tiny_model_dir))
    np.testing.assert_array_equal(fused("object", model=models, model_weights=tiny_only), alone)
    np.testing.assert_array_equal(fused("file", model=models, model_weights=str(report)), alone)
    assert not np.array_equal(fused("alike", model=models), alone)  # else the weights would show nothing

    errors = []
    for request in (dict(model=models, model_weights=str(tmp_path / "missing.json")),
                    dict(model=str(tiny_model_dir), model_weights=tiny_only), dict(model=models, model_weights=[1])):
        events = []
        Worker(events.append).handle(dict(id=2, command="segment", input=str(scan_file), prompts=["liver"],
                                          output_dir=str(tmp_path), **request))
        errors.append(events[-1]["message"])
    assert "cannot read the model weights" in errors[0]
    assert "ask several models together" in errors[1]
    assert "model_weights must be a JSON file's path or the weights" in errors[2]


@pytest.mark.filterwarnings("ignore::TextDiffSegLib.errors.ScanWarning")  # the synthetic scans are no real CTs
def test_evaluate_scores_the_ensemble_and_each_model_on_the_same_proposals(capsys, tmp_path, dataset, tiny_model_dir,
                                                                           liver_only_dir):
    report_path = tmp_path / "report.json"
    code, out, err = run(capsys, "evaluate", "--data", dataset, "--model", f"{tiny_model_dir},{liver_only_dir}",
                         "--proposals", 2, "--steps", 2, "--report", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny,tiny-progidiff" and report["steps"] == 2
    assert list(report["structures"]) == list(TINY_STRUCTURES)
    assert [row["structure"] for row in report["rows"]] == list(TINY_STRUCTURES) * 3  # three cases
    aurocs = [row["uncertainty_auroc"] for row in report["rows"]]
    assert all(value is None or 0 <= value <= 1 for value in aurocs) and any(value is not None for value in aurocs)
    assert "ensemble: mean dice" in out and "tiny-progidiff: mean dice" in out and "uncertainty auroc" in out
    assert "the weights chosen on the other cases: mean dice" in out
    for row in report["rows"]:  # each proposal's Dice and model, in order, for the curves over k
        knows = ["tiny"] * 2 + (["tiny-progidiff"] * 2 if row["structure"] in ("liver", "spleen") else [])
        assert row["proposal_models"] == knows and len(row["proposal_dice"]) == len(knows)
        assert max(row["proposal_dice"]) == pytest.approx(row["oracle_dice"])

    # Each model's scores are those it gets alone, on the structures it knows.
    assert list(report["models"]) == ["tiny", "tiny-progidiff"]
    for folder, structures in ((tiny_model_dir, list(TINY_STRUCTURES)), (liver_only_dir, ["liver", "spleen"])):
        alone = evaluate(Segmenter.from_pretrained(folder), str(dataset), structures=structures, num_proposals=2,
                         steps=2)
        scores = report["models"][alone["model"]]
        assert scores["rows"] == json.loads(json.dumps(alone["rows"]))
        assert list(scores["structures"]) == structures and scores["steps"] == 2
        assert scores["mean_uncertainty_auroc"] == alone["mean_uncertainty_auroc"]
        model = Segmenter.from_pretrained(folder).model
        assert scores["parameters"] == alone["parameters"] == sum(p.numel() for p in model.parameters())
    assert report["parameters"] == sum(scores["parameters"] for scores in report["models"].values())

    # The same proposals fused at each candidate weighting: the two models alike is the ensemble's own fusion, the
    # first model alone what it gives alone.
    weighting = report["weighting"]
    assert [list(c.values()) for c in weighting["weight_candidates"]] == [[1, 0], [0.75, 0.25], [0.5, 0.5],
                                                                          [0.25, 0.75], [0, 1]]
    for row, alone in zip(report["rows"], report["models"]["tiny"]["rows"]):
        assert len(row["weighted_dice"]) == 5 and row["weighted_dice"][2] == pytest.approx(row["dice"])
        assert row["weighted_dice"][0] == pytest.approx(alone["dice"])
    assert set(weighting["weights"]) == set(TINY_STRUCTURES)
    assert set(weighting["cross_validated"]["structures"]) == set(TINY_STRUCTURES)

    # A model's scores in it stand as a report of its own (scripts/bundle_model.py renders its card from one).
    own = model_report(report, "tiny-progidiff")
    assert (own["model"], own["ensemble"], own["seconds_per_case"]) == ("tiny-progidiff", "tiny,tiny-progidiff", None)
    assert own["rows"] == report["models"]["tiny-progidiff"]["rows"] and "weighting" not in own
    bundled = resolve_model("lcpdn-btcv")  # any model's config and training record: the card's scores are own's
    card = render_card(read_config(bundled), json.loads((bundled / "training.json").read_text()), own)
    assert "scored in a run of the ensemble tiny,tiny-progidiff (not timed apart)" in card
    with pytest.raises(DataError, match="scores no model 'other'"):
        model_report(report, "other")

    # The weights it chose segment with --model-weights REPORT.
    code, out, err = run(capsys, "segment", "-i", dataset.parent / json.loads(dataset.read_text())["training"][0]["image"],
                         "-p", "liver", "-o", tmp_path / "liver.seg.nrrd", "--model", f"{tiny_model_dir},{liver_only_dir}",
                         "--model-weights", report_path, "--proposals", 2, "--steps", 2)
    assert code == 0, err


def test_cross_validated_weights_are_chosen_on_the_other_cases():
    candidates = weight_candidates(["a", "b"], divisions=2)
    assert candidates == [{"a": 1, "b": 0}, {"a": 0.5, "b": 0.5}, {"a": 0, "b": 1}]
    rows = [{"case": case, "structure": "liver", "weighted_dice": dices}
            for case, dices in (("c1", [0.9, 0.8, 0.1]), ("c2", [0.9, 0.8, 0.1]), ("c3", [0.2, 0.5, 0.9]))]
    rows += [{"case": case, "structure": "spleen", "weighted_dice": [0.7, 0.7, 0.7]} for case in ("c1", "c2")]
    weighting = cross_validated_weighting(rows, candidates, ["liver", "spleen"])
    liver = weighting["cross_validated"]["structures"]["liver"]
    # c1 and c2 are each scored with the weights best on the other two (a alone: 0.55, even: 0.65, b: 0.5); c3 with
    # those best on c1 and c2 (a alone).
    assert [(c["case"], c["a"]) for c in liver["chosen"]] == [("c1", 0.5), ("c2", 0.5), ("c3", 1)]
    assert liver["dice"] == pytest.approx((0.8 + 0.8 + 0.2) / 3)
    assert weighting["weights"]["liver"] == {"a": 0.5, "b": 0.5}  # on all three: 0.667, 0.7, 0.367
    assert weighting["weights"]["spleen"] == {"a": 0.5, "b": 0.5}  # a tie goes to the even weights
    assert weighting["cross_validated"]["mean_dice"] == pytest.approx((liver["dice"] + 0.7) / 2)
    assert cross_validated_weighting(rows[:1], candidates, ["liver"])["cross_validated"] is None  # one case only


@pytest.mark.filterwarnings("ignore::TextDiffSegLib.errors.ScanWarning")  # the synthetic scans are no real CTs
def test_evaluate_weighs_models_only_where_the_fusion_reads_weights(dataset, universal_model, progidiff_model):
    # Majority voting and STAPLE count every proposal alike: no weighting to measure, and none to pass on.
    ensemble = Ensemble([universal_model, progidiff_model])
    for fusion in ("majority", "staple"):
        report = evaluate(ensemble, str(dataset), num_proposals=2, steps=1, fusion=fusion)
        assert report["fusion"] == fusion and list(report["models"]) == ["tiny", "tiny-progidiff"]
        assert "weighting" not in report and not any("weighted_dice" in row for row in report["rows"])
    assert "weighting" in evaluate(ensemble, str(dataset), num_proposals=2, steps=1)  # the mean fusion


def test_model_weights_that_cannot_be_used_are_refused_with_what_to_do(capsys, tmp_path, scan_file, tiny_model_dir,
                                                                      liver_only_dir):
    not_weights = tmp_path / "list.json"
    not_weights.write_text("[1, 2]")
    one_model = tmp_path / "weights.json"
    one_model.write_text(json.dumps({"liver": {"tiny": 1}}))
    for models, weights, message in ((f"{tiny_model_dir},{liver_only_dir}", tmp_path / "missing.json",
                                      "cannot read the model weights"),
                                     (f"{tiny_model_dir},{liver_only_dir}", not_weights, "holds no model weights"),
                                     (str(tiny_model_dir), one_model, "ask several models together")):
        code, out, err = run(capsys, "segment", "-i", scan_file, "-p", "liver", "-o", tmp_path / "out.seg.nrrd",
                             "--model", models, "--model-weights", weights, "--proposals", 1, "--steps", 1)
        assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.seg.nrrd").exists()
