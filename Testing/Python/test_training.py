"""Training: the loss falls, runs resume from their checkpoint, the model folder is complete, and the
``textdiffseg train`` command works end to end. Three CHAOS T2 cases, the tiny model of ``conftest``: these
are the universal family's training tests (its recipe's stages, weights and slice sampler); what every family's
training must do is in test_family_conformance.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from TextDiffSegLib import cli, training
from TextDiffSegLib.datasets import PreparedCase, read_dataset
from TextDiffSegLib.errors import DataError, ModelError, PromptError
from TextDiffSegLib.families.universal import UniversalModel
from TextDiffSegLib.model_card import VOLUME_RANGES
from TextDiffSegLib.modelio import read_config, save_model
from TextDiffSegLib.segmenter import Segmenter
from TextDiffSegLib.families.universal_training import SliceSampler
from TextDiffSegLib.training import CHECKPOINT_NAME, LOG_NAME, NOT_OPTIONS, TrainSettings, train
from TextDiffSegLib.volume import read_volume

pytestmark = pytest.mark.realdata

CHAOS_CASES = ("chaos_t2_01", "chaos_t2_02", "chaos_t2_15")
CHAOS_STRUCTURES = ["liver", "kidney_right", "kidney_left", "spleen"]


@pytest.fixture(scope="module")
def chaos_dataset(shared_data, tmp_path_factory) -> Path:
    """A dataset.json naming three CHAOS T2 cases by absolute path."""
    chaos = shared_data / "chaos_t2"
    description = json.loads((chaos / "dataset.json").read_text())
    description["training"] = [{"image": str(chaos / "imagesTr" / f"{case}.nii.gz"),
                                "label": str(chaos / "labelsTr" / f"{case}.nii.gz")} for case in CHAOS_CASES]
    path = tmp_path_factory.mktemp("chaos") / "dataset.json"
    path.write_text(json.dumps(description))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache of resampled cases for the whole module, so each case is resampled once per spacing."""
    return tmp_path_factory.mktemp("cache")


def tiny_options(**overrides) -> dict:
    """The architecture fields of the tiny config, as ``TrainSettings.model_options``."""
    config = tiny_config()
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name not in NOT_OPTIONS}
    return {**options, **overrides}


def settings(chaos_dataset, cache_dir, output, **overrides) -> TrainSettings:
    values = dict(data=str(chaos_dataset), output=str(output), batch_size=8, crop=(64, 64), autoencoder_steps=20,
                  diffusion_steps=3, cache_dir=str(cache_dir), model_options=tiny_options())
    values.update(overrides)
    return TrainSettings(**values)


def read_log(output: Path) -> list[dict]:
    with (Path(output) / LOG_NAME).open(newline="") as handle:
        return list(csv.DictReader(handle))


def steps(rows: list[dict], stage: str) -> list[int]:
    return [int(row["step"]) for row in rows if row["stage"] == stage]


class Recorder:
    """A progress callback that keeps every call."""

    def __init__(self, stop_at: tuple[str, int] | None = None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, stage, step, total, loss):
        self.calls.append((stage, step, total))
        assert np.isfinite(loss)
        if (stage, step) == self.stop_at:
            raise KeyboardInterrupt  # as when the user stops a run


def test_a_short_run_lowers_the_loss(chaos_dataset, cache_dir, tmp_path):
    progress = Recorder()
    output = tmp_path / "run"
    train(settings(chaos_dataset, cache_dir, output, autoencoder_steps=200, diffusion_steps=100), progress)
    rows = read_log(output)
    assert list(rows[0]) == ["stage", "step", "loss", "lr", "seconds"]
    assert steps(rows, "autoencoder") == list(range(1, 201))
    assert steps(rows, "diffusion") == list(range(1, 101))
    assert [row["stage"] for row in rows] == ["autoencoder"] * 200 + ["diffusion"] * 100
    assert all(float(row["lr"]) > 0 and float(row["seconds"]) >= 0 for row in rows)
    assert progress.calls == [("autoencoder", k, 200) for k in range(1, 201)] + [("diffusion", k, 100) for k in range(1, 101)]
    for stage in ("autoencoder", "diffusion"):
        losses = [float(row["loss"]) for row in rows if row["stage"] == stage]
        assert all(np.isfinite(losses))
        first, last = np.mean(losses[:10]), np.mean(losses[-10:])
        assert last < 0.85 * first, (stage, first, last)


def test_resume_continues_the_run_and_writes_a_model_folder(chaos_dataset, cache_dir, tmp_path, shared_data):
    output = tmp_path / "run"
    folder = train(settings(chaos_dataset, cache_dir, output, diffusion_steps=3))
    assert folder == output / "model"
    assert (output / CHECKPOINT_NAME).is_file()
    first_weights = (folder / "model.safetensors").read_bytes()

    progress = Recorder()
    folder = train(settings(chaos_dataset, cache_dir, output, diffusion_steps=5), progress)
    assert progress.calls == [("diffusion", 4, 5), ("diffusion", 5, 5)]  # the autoencoder is not trained again
    rows = read_log(output)
    assert steps(rows, "autoencoder") == list(range(1, 21))
    assert steps(rows, "diffusion") == [1, 2, 3, 4, 5]
    assert (folder / "model.safetensors").read_bytes() != first_weights

    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "training.json"]
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():  # as readable as any file the user makes: the folder may be shared or packaged
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    record = json.loads((folder / "training.json").read_text())
    split = record["split"]
    assert sorted(split["training"] + split["validation"]) == sorted(CHAOS_CASES)
    assert len(split["validation"]) == 1 and not set(split["training"]) & set(split["validation"])
    assert record["settings"]["diffusion_steps"] == 5
    # Each structure's volume range over the training cases, measured on the model grid: within a tenth of
    # the manual labels' volumes at the scans' own resolution.
    dataset = read_dataset(chaos_dataset)
    labels = [read_volume(case.label) for case in dataset.select(split["training"])]
    for name, value in dataset.label_values().items():
        volumes = [float((label.array == value).sum() * np.prod(label.spacing)) / 1000 for label in labels]
        np.testing.assert_allclose(record[VOLUME_RANGES][name], [min(volumes), max(volumes)], rtol=0.1)
    assert "Structure volumes in the training cases (ml; a result far outside them is flagged" in (folder / "README.md").read_text()
    card = (folder / "README.md").read_text()
    assert card.startswith("# run\n")
    assert "2 training cases, 1 validation cases" in card
    assert all(case in card for case in split["validation"])
    config = read_config(folder)
    assert config.name == "run" and config.family == "universal" and config.modality == "MR"
    assert list(config.structures) == CHAOS_STRUCTURES
    assert config.unet_channels == tiny_config().unet_channels
    assert config.latent_scale != 1.0  # measured after the autoencoder stage

    # The folder is a model the segmenter loads and runs.
    volume = read_volume(shared_data / "totalseg_examples" / "example_mr_sm.nii.gz")
    result = Segmenter.from_pretrained(folder).propose(volume, "right kidney", num_proposals=1, steps=1)
    assert result.fused.shape == volume.array.shape and result.model == "run"


def test_an_interrupted_run_resumes_from_its_last_checkpoint(chaos_dataset, cache_dir, tmp_path):
    output = tmp_path / "run"
    run_settings = settings(chaos_dataset, cache_dir, output, diffusion_steps=7, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(run_settings, Recorder(stop_at=("diffusion", 5)))
    assert steps(read_log(output), "diffusion") == [1, 2, 3, 4, 5]
    assert not (output / "model").exists()

    progress = Recorder()
    train(run_settings, progress)
    assert progress.calls == [("diffusion", k, 7) for k in (5, 6, 7)]  # from the checkpoint of step 4
    rows = read_log(output)
    assert steps(rows, "autoencoder") == list(range(1, 21))
    assert steps(rows, "diffusion") == list(range(1, 8))  # step 5, done twice, is logged once
    assert (output / "model" / "model.safetensors").is_file()


def test_resuming_with_other_settings_or_a_corrupt_checkpoint_is_refused(chaos_dataset, cache_dir, tmp_path):
    output = tmp_path / "run"
    train(settings(chaos_dataset, cache_dir, output, autoencoder_steps=2, diffusion_steps=1))
    log = (output / LOG_NAME).read_text()
    wider = settings(chaos_dataset, cache_dir, output, autoencoder_steps=2, diffusion_steps=2,
                     model_options=tiny_options(unet_channels=(16, 16, 32)))
    with pytest.raises(ModelError, match="cannot resume .*other model settings.*new output folder"):
        train(wider)
    checkpoint = output / CHECKPOINT_NAME
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ModelError, match="corrupt"):
        train(settings(chaos_dataset, cache_dir, output, autoencoder_steps=2, diffusion_steps=2))
    assert (output / LOG_NAME).read_text() == log


def test_dataset_errors(chaos_dataset, cache_dir, tmp_path):
    with pytest.raises(DataError, match="has no labels for aorta"):
        train(settings(chaos_dataset, cache_dir, tmp_path / "a", structures=("liver", "aorta")))
    with pytest.raises(PromptError, match="gallbladder"):
        train(settings(chaos_dataset, cache_dir, tmp_path / "b", structures=("gallblader",)))
    with pytest.raises(DataError, match="cannot read"):
        train(settings(tmp_path / "absent.json", cache_dir, tmp_path / "c"))
    one_case = json.loads(chaos_dataset.read_text())
    one_case["training"] = one_case["training"][:1]
    (tmp_path / "one.json").write_text(json.dumps(one_case))
    with pytest.raises(DataError, match="at least two cases"):
        train(settings(tmp_path / "one.json", cache_dir, tmp_path / "d"))
    assert not list((tmp_path / "a").glob("*")) and not (tmp_path / "a" / "model").exists()


def test_structures_by_any_name(chaos_dataset, cache_dir, tmp_path):
    folder = train(settings(chaos_dataset, cache_dir, tmp_path / "run", structures=("Left Kidney", "liver", "hepar"),
                            autoencoder_steps=1, diffusion_steps=1))
    assert read_config(folder).structures == ("kidney_left", "liver")


def test_train_command(chaos_dataset, cache_dir, tmp_path, capsys):
    """``textdiffseg train`` builds the default-size model (the CLI sets no widths): 2 + 2 steps, batches of 2."""
    output = tmp_path / "cli-run"
    args = ["train", "--data", str(chaos_dataset), "--output", str(output), "--autoencoder-steps", "2", "--steps", "2",
            "--batch-size", "2", "--cache-dir", str(cache_dir), "--device", "cpu", "--rotation-degrees", "5",
            "--scaling", "0.1", "--ema-decay", "0.99", "--present-fraction", "0.5", "--near-negatives", "0.25",
            "--gamma", "1.5", "--crop", "64", "--workers", "1", "--decoded-mask-weight", "0.5", "--high-noise-share", "0.25"]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    trained = json.loads((output / "model" / "training.json").read_text())["trained_parameters"]
    assert out.strip() == (f"wrote {output / 'model'} (its diffusion stage trained {trained['trained']:,} of "
                           f"{trained['of']:,} parameters)")
    assert "autoencoder" in err and "diffusion" in err and "loss=" in err  # the progress bars
    rows = read_log(output)
    assert steps(rows, "autoencoder") == [1, 2] and steps(rows, "diffusion") == [1, 2]
    model = output / "model"
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "config.json", "model.safetensors", "training.json"]
    config = read_config(model)
    assert config.name == "cli-run" and config.conditioning == "text" and list(config.structures) == CHAOS_STRUCTURES
    assert config.unet_channels == (32, 64, 96)  # the default widths
    recorded = json.loads((model / "training.json").read_text())["settings"]
    settings_given = (recorded["batch_size"], recorded["rotation_degrees"], recorded["scaling"], recorded["ema_decay"],
                      recorded["present_fraction"], recorded["near_negative_fraction"], recorded["crop"], recorded["workers"],
                      recorded["gamma"], recorded["decoded_mask_weight"], recorded["high_noise_share"])
    assert settings_given == (2, 5.0, 0.1, 0.99, 0.5, 0.25, [64, 64], 1, 1.5, 0.5, 0.25)

    # The same command with more steps resumes: only the new denoiser step runs.
    assert cli.main([*args, "--steps", "3"]) == 0
    _, err = capsys.readouterr()
    assert "autoencoder" not in err and "diffusion" in err
    assert steps(read_log(output), "diffusion") == [1, 2, 3]

    # Errors are one line and status 2.
    for extra, words in ((["--structures", "liver,aorta"], ["has no labels for aorta"]),
                         (["--device", "tpu"], ["unknown device 'tpu'"]),
                         (["--scaling", "1.5"], ["augmentation needs 0 <= scaling < 1"]),
                         (["--workers", "-2"], ["workers is a number of processes"]),
                         (["--decoded-mask-weight", "-1"], ["decoded_mask_weight is a loss weight"]),
                         (["--high-noise-share", "1.5"], ["high_noise_share is a share between 0 and 1"]),
                         (["--crop", "100"], ["positive multiples of 16", "(100, 100)"]),
                         (["--model-option", "unet_width=3"], ["no option unet_width", "unet_channels"]),
                         (["--model-option", "structures=liver"], ["cannot be set as model options"]),
                         (["--model-option", "unet_channels=8,16,20"], ["multiples of 8"]),
                         (["--model-option", "unet_channels=wide"], ["do not fit"])):
        code = cli.main(["train", "--data", str(chaos_dataset), "--output", str(tmp_path / "bad"), "--steps", "1",
                         "--autoencoder-steps", "1", "--cache-dir", str(cache_dir), *extra])
        _, err = capsys.readouterr()
        assert code == 2 and err.startswith("textdiffseg: error: ") and "Traceback" not in err
        assert all(word in err for word in words), err
    assert not (tmp_path / "bad" / "model").exists()


def test_train_command_sets_a_new_models_config_with_model_options(chaos_dataset, cache_dir, tmp_path, capsys):
    output = tmp_path / "tiny"
    options = ["spacing=6,6,9", "window=32,32", "mask_channels=4,8,8", "image_channels=8,8,8",
               "image_feature_channels=8", "unet_channels=8,16,16", "project_to_masks=true"]
    common = ["--data", str(chaos_dataset), "--autoencoder-steps", "1", "--steps", "1", "--batch-size", "2",
              "--crop", "64", "--cache-dir", str(cache_dir)]
    code = cli.main(["train", "--output", str(output), *common, *[x for o in options for x in ("--model-option", o)]])
    assert code == 0, capsys.readouterr().err
    config = read_config(output / "model")
    assert (config.spacing, config.window, config.unet_channels, config.project_to_masks) == \
        ((6.0, 6.0, 9.0), (32, 32), (8, 16, 16), True)
    recorded = json.loads((output / "model" / "training.json").read_text())["settings"]["model_options"]
    assert recorded["unet_channels"] == [8, 16, 16]

    # Training on from it keeps its config: the same value is accepted, another is refused.
    more = ["train", "--output", str(tmp_path / "more"), *common, "--init-from", str(output / "model")]
    assert cli.main([*more, "--model-option", "unet_channels=8,16,16"]) == 0
    capsys.readouterr()
    assert cli.main([*more, "--model-option", "unet_channels=8,16,24", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "unet_channels = [8, 16, 16]" in err and "cannot change" in err
    assert cli.main([*more, "--model-option", "latent_scale=2", "--steps", "2"]) == 2
    assert "latent_scale is not a model option" in capsys.readouterr().err


def test_training_can_continue_from_a_model_folder(chaos_dataset, cache_dir, tmp_path):
    first = train(settings(chaos_dataset, cache_dir, tmp_path / "first", autoencoder_steps=5, diffusion_steps=2))
    second = train(settings(chaos_dataset, cache_dir, tmp_path / "second", diffusion_steps=2, init_from=str(first)))
    rows = read_log(tmp_path / "second")
    assert steps(rows, "autoencoder") == [] and steps(rows, "diffusion") == [1, 2]
    before, after = Segmenter.from_pretrained(first).model, Segmenter.from_pretrained(second).model
    assert read_config(second).latent_scale == read_config(first).latent_scale
    for (name, a), b in zip(before.mask_autoencoder.state_dict().items(), after.mask_autoencoder.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    assert read_config(second).name == "second"


def test_a_ct_model_continued_on_mr_scans_becomes_an_mr_model(chaos_dataset, cache_dir, tmp_path, tiny_model_dir):
    assert read_config(tiny_model_dir).modality == "CT"
    adapted = train(settings(chaos_dataset, cache_dir, tmp_path / "mr", diffusion_steps=1, init_from=str(tiny_model_dir)))
    assert read_config(adapted).modality == "MR"


def test_continuing_a_model_needs_labels_for_all_it_segments(chaos_dataset, cache_dir, tmp_path):
    with_aorta = save_model(UniversalModel(tiny_config(structures=("liver", "aorta"))), tmp_path / "aorta", card="# a\n")
    with pytest.raises(DataError, match="no labels for aorta, which .*aorta segments; training from it needs all"
                                        " of them; it labels liver, kidney_right, kidney_left, spleen"):
        train(settings(chaos_dataset, cache_dir, tmp_path / "run", diffusion_steps=1, init_from=str(with_aorta)))
    assert not (tmp_path / "run" / "model").exists()


def test_rotation_and_zoom_move_image_and_mask_together():
    image = np.zeros((3, 64, 64), dtype=np.uint8)
    label = np.zeros((3, 64, 64), dtype=np.uint8)
    image[:, 10:30, 20:50] = 255
    label[:, 10:30, 20:50] = 1
    case = PreparedCase("square", image, label, ("liver",))

    def mask_areas_and_misalignment(**augmentation):
        sampler = SliceSampler([case], ("liver",), (64, 64), context=1, present_fraction=1.0, seed=0, **augmentation)
        images, masks, _ = sampler.batch(16)
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        misaligned = ((images[:, 1] > 0.5) != (masks[:, 0] > 0.5)).float().mean().item()
        return masks.sum(dim=(1, 2, 3)), misaligned

    areas, misaligned = mask_areas_and_misalignment()
    assert misaligned == 0 and (areas == 600).all()
    areas, misaligned = mask_areas_and_misalignment(rotation_degrees=30, scaling=0.2)
    assert misaligned < 0.01  # only voxels on the square's edge may disagree
    assert areas.min() < 540 and areas.max() > 660  # zoomed in and out


def test_gamma_moves_each_tissues_brightness_and_keeps_their_order():
    """Two tissues at 0.3 and 0.6: with gamma 2 their values spread beyond the brightness jitter's
    (0.9-1.1 times, then ±0.05) and stay within the gamma curve's reach; the darker stays darker."""
    image = np.zeros((3, 32, 32), dtype=np.uint8)
    image[:, :, :16], image[:, :, 16:] = round(0.3 * 255), round(0.6 * 255)
    case = PreparedCase("two tissues", image, np.ones(image.shape, dtype=np.uint8), ("liver",))

    def tissue_values(gamma):
        images = SliceSampler([case], ("liver",), (32, 32), context=1, present_fraction=1.0, seed=0, gamma=gamma).batch(64)[0]
        assert images.dtype == torch.float32
        return images[:, 1, 0, 0], images[:, 1, 0, -1]  # the crop is the whole slice: its corners are the two tissues

    dark, bright = tissue_values(1.0)
    assert dark.min() >= 0.3 * 0.9 - 0.05 - 1e-3 and dark.max() <= 0.3 * 1.1 + 0.05 + 1e-3
    dark, bright = tissue_values(2.0)
    assert dark.min() < 0.3 * 0.9 - 0.05 and dark.max() > 0.3 * 1.1 + 0.05
    assert dark.min() >= 0.3 ** 2 * 0.9 - 0.05 - 1e-3 and dark.max() <= 0.3 ** 0.5 * 1.1 + 0.05 + 1e-3
    assert (dark < bright).all()


def test_slices_smaller_than_the_crop_land_anywhere_in_it():
    """A 20 x 30 slice, all liver, in 64 x 64 crops: whole every time, at many places."""
    label = np.ones((3, 20, 30), dtype=np.uint8)
    case = PreparedCase("small", np.full(label.shape, 255, dtype=np.uint8), label, ("liver",))
    sampler = SliceSampler([case], ("liver",), (64, 64), context=1, present_fraction=1.0, seed=0)
    _, masks, _ = sampler.batch(32)
    assert (masks.sum(dim=(1, 2, 3)) == 600).all()
    corners = {(int(rows[0]), int(columns[0])) for rows, columns in (np.nonzero(m[0].numpy()) for m in masks)}
    assert len(corners) > 16


def test_the_lateral_position_channel_is_the_position_of_the_anatomy_under_it():
    """A 20 x 30 slice whose body is its columns 10-29, padded anywhere in 64 x 64 crops: the extra channel
    is 0 at the body's middle column wherever it lands, grows by 2.5 mm per column, and is not jittered."""
    image = np.zeros((3, 20, 30), dtype=np.uint8)
    image[:, :, 10:] = 200
    case = PreparedCase("body", image, np.ones(image.shape, dtype=np.uint8), ("liver",))
    sampler = SliceSampler([case], ("liver",), (64, 64), context=1, present_fraction=1.0, seed=0, position_spacing=2.5)
    images, masks, _ = sampler.batch(16)
    assert images.shape[1] == 4
    for sample, mask in zip(images, masks):
        position = sample[3].numpy()
        np.testing.assert_allclose(np.diff(position, axis=1), 0.025, atol=1e-6)
        np.testing.assert_allclose(np.diff(position, axis=0), 0, atol=1e-6)
        body_columns = np.flatnonzero(sample[1].numpy().max(axis=0) > 0.5)
        middle = body_columns.mean()
        np.testing.assert_allclose(np.interp(middle, np.arange(64), position[0]), 0, atol=1e-6)
        assert np.array_equal(np.flatnonzero(mask[0].numpy().max(axis=0)), np.arange(body_columns[0] - 10, body_columns[-1] + 1))

    turned = SliceSampler([case], ("liver",), (64, 64), context=1, present_fraction=1.0, seed=0, position_spacing=2.5,
                          rotation_degrees=30, scaling=0.2).batch(16)[0]
    position = turned[:, 3]
    assert position.min() < -0.5 and position.max() > 0.5  # continued past the slice, not set to 0 (air) there
    assert (turned[:, :3] >= 0).all() and (turned[:, :3] <= 1).all()


def test_negative_samples_come_from_slices_without_the_structure_most_from_just_past_its_ends():
    """The liver on slices 15-19; the slices within 4 of its ends are bright, all others dark."""
    label = np.zeros((40, 16, 16), dtype=np.uint8)
    label[15:20, 4:12, 4:12] = 1
    image = np.zeros(label.shape, dtype=np.uint8)
    image[11:15] = image[20:24] = 255
    case = PreparedCase("ends", image, label, ("liver",))

    def draw(present_fraction, near_negative_fraction):
        sampler = SliceSampler([case], ("liver",), (16, 16), context=1, present_fraction=present_fraction, seed=0,
                               near_negative_fraction=near_negative_fraction, near_slices=4)
        images, masks, _ = sampler.batch(64)
        return images[:, 1].mean(dim=(1, 2)) > 0.5, masks.sum(dim=(1, 2, 3)) > 0

    near, present = draw(present_fraction=1.0, near_negative_fraction=1.0)
    assert present.all() and not near.any()
    near, present = draw(present_fraction=0.0, near_negative_fraction=1.0)
    assert not present.any() and near.all()
    near, present = draw(present_fraction=0.0, near_negative_fraction=0.0)  # any of the 35 slices without it
    assert not present.any() and 0 < near.float().mean() < 0.5


@pytest.mark.parametrize("shares", [{"present_fraction": 1.5}, {"near_negative_fraction": -0.1}])
def test_sampling_shares_are_checked_before_training(chaos_dataset, cache_dir, tmp_path, shares):
    with pytest.raises(DataError, match="are shares between 0 and 1"):
        train(settings(chaos_dataset, cache_dir, tmp_path, **shares))
    assert not (tmp_path / LOG_NAME).exists()


def test_precision_is_checked_before_training(chaos_dataset, cache_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="precision must be"):
        train(settings(chaos_dataset, cache_dir, tmp_path / "a", precision="fp16"))
    monkeypatch.setattr(training, "bf16_is_native", lambda device: False)
    with pytest.raises(DataError, match="no native bfloat16"):
        train(settings(chaos_dataset, cache_dir, tmp_path / "b", precision="bf16"))
    assert not (tmp_path / "b" / LOG_NAME).exists()


@pytest.mark.parametrize("flags, native", [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                                           ({"avx512_bw": True}, False), ({}, False)])
def test_bfloat16_is_native_only_where_the_cpu_has_its_instructions(flags, native, monkeypatch):
    # Plain AVX-512 passes oneDNN's own bfloat16 test, and emulates it at 2.5 times the cost of fp32.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False, **flags})
    assert training.bf16_is_native(torch.device("cpu")) is native


def test_a_pytorch_that_cannot_list_the_cpus_capabilities_trains_in_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert training.bf16_is_native(torch.device("cpu")) is False


def saved_and_checkpointed(output: Path) -> tuple[dict, dict]:
    return load_file(output / "model" / "model.safetensors"), torch.load(output / CHECKPOINT_NAME, weights_only=True)


def same_as_saved(saved: torch.Tensor, trained: torch.Tensor) -> bool:
    return torch.equal(saved, trained.to(saved.dtype))  # model folders may store half precision


def test_the_saved_denoiser_is_the_moving_average_of_its_weights(chaos_dataset, cache_dir, tmp_path):
    train(settings(chaos_dataset, cache_dir, tmp_path / "averaged", diffusion_steps=6, ema_decay=0.5))
    saved, state = saved_and_checkpointed(tmp_path / "averaged")
    averaged = state["average"]
    assert any(name.startswith("unet.") for name in averaged)
    assert not any(name.startswith("mask_autoencoder.") for name in averaged)  # frozen in this stage
    for name, value in state["model"].items():  # the checkpoint keeps the last weights, to resume from
        assert same_as_saved(saved[name], averaged.get(name, value)), name
    assert any(not torch.equal(averaged[name], state["model"][name]) for name in averaged)

    train(settings(chaos_dataset, cache_dir, tmp_path / "last", diffusion_steps=6, ema_decay=0.0))
    saved, state = saved_and_checkpointed(tmp_path / "last")
    assert state["average"] is None
    assert all(same_as_saved(saved[name], value) for name, value in state["model"].items())


def test_a_resumed_run_keeps_its_moving_average(chaos_dataset, cache_dir, tmp_path):
    run_settings = settings(chaos_dataset, cache_dir, tmp_path, diffusion_steps=7, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(run_settings, Recorder(stop_at=("diffusion", 5)))
    checkpointed = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["average"]
    resumed = training._Run(run_settings, None).average
    assert resumed.keys() == checkpointed.keys()
    assert all(torch.equal(resumed[name], value) for name, value in checkpointed.items())

    train(dataclasses.replace(run_settings, ema_decay=0.0))  # finished without averaging: the last weights
    saved, state = saved_and_checkpointed(tmp_path)
    assert all(same_as_saved(saved[name], value) for name, value in state["model"].items())


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_the_moving_average_decay_is_checked_before_training(chaos_dataset, cache_dir, tmp_path, decay):
    with pytest.raises(DataError, match="ema_decay must be at least 0 and below 1"):
        train(settings(chaos_dataset, cache_dir, tmp_path, ema_decay=decay))
    assert not (tmp_path / LOG_NAME).exists()


@pytest.mark.parametrize("augmentation", [{"scaling": 1.0}, {"scaling": -0.1}, {"rotation_degrees": -5}, {"gamma": 0.8}])
def test_augmentation_ranges_are_checked_before_training(chaos_dataset, cache_dir, tmp_path, augmentation):
    with pytest.raises(DataError, match="augmentation needs 0 <= scaling < 1, rotation_degrees >= 0 and gamma >= 1"):
        train(settings(chaos_dataset, cache_dir, tmp_path, **augmentation))
    assert not (tmp_path / LOG_NAME).exists()


def test_worker_processes_draw_different_batches_reproducibly():
    """Two worker processes, forked with one sampler, each draw their own batches; the same seed draws them again."""
    label = np.zeros((40, 32, 32), dtype=np.uint8)
    label[5:35, 8:24, 8:24] = 1
    image = np.random.default_rng(0).integers(0, 256, label.shape, dtype=np.uint8)
    case = PreparedCase("noise", image, label, ("liver",))

    def first_batches(seed):
        sampler = SliceSampler([case], ("liver",), (32, 32), context=1, present_fraction=0.5, seed=0)
        loader = torch.utils.data.DataLoader(training.WorkerBatches(sampler, 4, seed), batch_size=None, num_workers=2)
        batches = iter(loader)
        return [next(batches)[0] for _ in range(4)]  # the loader takes them from each worker in turn

    drawn = first_batches([0, 0, 1])
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[2], drawn[3])
    assert all(torch.equal(a, b) for a, b in zip(drawn, first_batches([0, 0, 1])))
    assert not torch.equal(drawn[0], first_batches([0, 7, 1])[0])  # a resumed run draws new ones


def test_training_with_worker_processes(chaos_dataset, cache_dir, tmp_path):
    folder = train(settings(chaos_dataset, cache_dir, tmp_path, autoencoder_steps=4, diffusion_steps=3, workers=2))
    assert steps(read_log(tmp_path), "diffusion") == [1, 2, 3]
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "training.json").read_text())["settings"]["workers"] == 2


def poisoned(run, steps: set[int] | None):
    """Make the run's current stage give NaN gradients at its ``steps`` (1-based; None: at every step)."""
    stage, loss, calls = run.current, run.current.loss, []

    def nan_at_some_steps(batch):
        calls.append(batch)
        value = loss(batch)
        return value * float("nan") if steps is None or len(calls) in steps else value

    stage.loss = nan_at_some_steps


def test_a_step_whose_gradients_are_not_finite_is_not_applied(chaos_dataset, cache_dir, tmp_path):
    run = training._Run(settings(chaos_dataset, cache_dir, tmp_path / "run", autoencoder_steps=3), None)
    poisoned(run, {2})
    weights = []
    run.progress = lambda *_: weights.append([p.detach().clone() for p in run.model.parameters()])
    run.run_stage()
    assert run.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 3 trained again
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_a_run_whose_gradients_stay_not_finite_stops_with_a_clear_error(chaos_dataset, cache_dir, tmp_path):
    run = training._Run(settings(chaos_dataset, cache_dir, tmp_path / "run", autoencoder_steps=30), None)
    poisoned(run, None)
    with pytest.raises(ModelError, match=f"training diverged: the gradients of {training.MAX_SKIPPED_IN_A_ROW} steps"):
        run.run_stage()
    assert run.step == training.MAX_SKIPPED_IN_A_ROW - 1
