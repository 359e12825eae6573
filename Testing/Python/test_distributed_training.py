"""Training in several processes (``distributed``): two CPU processes joined by gloo train the tiny universal
model of test_training on its three CHAOS cases. ``textdiffseg train`` runs under torchrun and resumes in one
process; two processes started as torchrun starts them write nothing but through the first, and with batches
of B they take the steps one process takes with batches of 2B made of the same samples."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing

from test_training import cache_dir, chaos_dataset, read_log, settings, steps  # noqa: F401 (fixtures)
from TextDiffSegLib import cli, distributed, training
from TextDiffSegLib.families import FAMILIES
from TextDiffSegLib.families.universal_training import UniversalRecipe
from TextDiffSegLib.training import CHECKPOINT_NAME, LOG_NAME, TrainSettings, train

pytestmark = pytest.mark.realdata

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small CI machine
TINY_MODEL = ["spacing=6,6,9", "window=32,32", "mask_channels=4,8,8", "image_channels=8,8,8",
              "image_feature_channels=8", "unet_channels=8,16,16"]  # conftest's tiny_config, as --model-option


def train_arguments(dataset: Path, cache: Path, output: Path, denoiser_steps: int) -> list[str]:
    """``textdiffseg train`` of the tiny model: 200 autoencoder steps at batches of 4 per process (test_training's
    short run at batches of 8, in two processes)."""
    return ["train", "--data", str(dataset), "--output", str(output), "--cache-dir", str(cache), "--device", "cpu",
            "--precision", "fp32", "--crop", "64", "--batch-size", "4", "--autoencoder-steps", "200",
            "--steps", str(denoiser_steps), "--checkpoint-every", "50",
            *[word for option in TINY_MODEL for word in ("--model-option", option)]]


@pytest.fixture(scope="module")
def torchrun_output(chaos_dataset, cache_dir, tmp_path_factory) -> Path:  # noqa: F811 (fixtures)
    """The run folder of ``textdiffseg train`` started by torchrun in two processes (2 denoiser steps)."""
    output = tmp_path_factory.mktemp("torchrun") / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "TextDiffSegLib.cli", *train_arguments(chaos_dataset, cache_dir, output, 2)],
                          capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    [line] = done.stdout.splitlines()  # from the first process alone
    assert line.startswith(f"wrote {output / 'model'} (its diffusion stage trained ")
    return output


def test_textdiffseg_train_runs_under_torchrun_and_writes_one_model_folder(torchrun_output):
    assert sorted(p.name for p in torchrun_output.iterdir()) == [CHECKPOINT_NAME, LOG_NAME, "model"]
    assert sorted(p.name for p in (torchrun_output / "model").iterdir()) == \
        ["README.md", "config.json", "model.safetensors", "training.json"]
    rows = read_log(torchrun_output)
    assert steps(rows, "autoencoder") == list(range(1, 201)) and steps(rows, "diffusion") == [1, 2]  # each step once
    losses = [float(row["loss"]) for row in rows if row["stage"] == "autoencoder"]
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10]), losses


def test_a_run_of_two_processes_resumes_in_one(torchrun_output, chaos_dataset, cache_dir, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "run"
    shutil.copytree(torchrun_output, output)
    assert cli.main(train_arguments(chaos_dataset, cache_dir, output, 4)) == 0
    assert "autoencoder" not in capsys.readouterr().err  # only the denoiser's two new steps ran
    rows = read_log(output)
    assert steps(rows, "autoencoder") == list(range(1, 201)) and steps(rows, "diffusion") == [1, 2, 3, 4]
    checkpoint = torch.load(output / CHECKPOINT_NAME, weights_only=True)
    assert (checkpoint["stage"], checkpoint["step"]) == ("diffusion", 4)


@pytest.mark.parametrize("workers", [0, 1])
def test_each_process_draws_its_own_batches(chaos_dataset, cache_dir, tmp_path, monkeypatch, workers):  # noqa: F811
    """The first batch of one run in its processes 0 and 1 of 2, drawn in the process or by a worker process."""
    def first_images(rank: int) -> torch.Tensor:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        run = training._Run(settings(chaos_dataset, cache_dir, tmp_path / str(rank), workers=workers), None)
        return run.batch()[0]

    assert not torch.equal(first_images(0), first_images(1))


# --- two processes against one ------------------------------------------------------------------------


class SharedBatches:
    """One fixed list of samples, taken in order: each step takes the next ``batch_size`` × processes, the
    first process the first share, the second the next. Two processes with batches of B thus draw at every
    step the samples that one process draws with batches of 2B."""

    def __init__(self, source, samples: int):
        self.rng = source.rng  # reseeded by the trainer, and not used
        self.images, self.masks, self.labels = source.batch(samples)
        self.steps_drawn = 0

    def batch(self, size: int):
        start = (self.steps_drawn * distributed.process_count() + distributed.rank()) * size % len(self.labels)
        self.steps_drawn += 1
        return self.images[start:start + size], self.masks[start:start + size], self.labels[start:start + size]


class SharedBatchesRecipe(UniversalRecipe):
    """The universal recipe's mask autoencoder stage alone (its loss draws no noise), on ``SharedBatches`` of
    as many samples as its steps take."""

    def batch_source(self, cases, structures, text):
        samples = self.settings.autoencoder_steps * self.settings.batch_size * distributed.process_count()
        return SharedBatches(super().batch_source(cases, structures, text), samples)

    def stages(self):
        return super().stages()[:1]


SHARED_BATCHES_FAMILY = dataclasses.replace(FAMILIES["universal"], recipe=SharedBatchesRecipe)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_as_process(rank: int, count: int, port: int, run_settings: TrainSettings, record: Path) -> None:
    """``train`` on ``SharedBatches`` in process ``rank`` of ``count``, as torchrun starts it (its environment),
    keeping in ``record/RANK.json`` every file this process opened for writing or moved in the run folder or
    the cache (Python's audit events)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    FAMILIES["universal"] = SHARED_BATCHES_FAMILY
    watched, written = (run_settings.output, run_settings.cache_dir), []

    def keep_writes(event: str, args: tuple) -> None:
        if event == "open" and not isinstance(args[0], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
            path = os.fsdecode(args[0])
        elif event == "os.rename":
            path = os.fsdecode(args[1])
        else:
            return
        if path.startswith(watched):
            written.append(path)

    sys.addaudithook(keep_writes)
    train(run_settings)
    (record / f"{rank}.json").write_text(json.dumps(written))


@pytest.fixture(scope="module")
def two_and_one(chaos_dataset, tmp_path_factory) -> tuple[Path, Path, Path]:  # noqa: F811 (fixtures)
    """Run folders of two processes with batches of 4 and of one with batches of 8, 10 steps on the same samples,
    and the record of what each of the two wrote. The two start with an empty cache, which they fill."""
    folder = tmp_path_factory.mktemp("two-and-one")
    record = folder / "written"
    record.mkdir()
    two = settings(chaos_dataset, folder / "cache", folder / "two", batch_size=4, autoencoder_steps=10,
                   precision="fp32")
    one = dataclasses.replace(two, output=str(folder / "one"), batch_size=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the spawned processes, set before they load torch
        torch.multiprocessing.spawn(train_as_process, args=(2, free_port(), two, record), nprocs=2)
        patch.setitem(FAMILIES, "universal", SHARED_BATCHES_FAMILY)
        train(one)
    return Path(two.output), Path(one.output), record


def test_only_the_first_process_writes(two_and_one):
    two, _, record = two_and_one
    first, second = (json.loads((record / f"{rank}.json").read_text()) for rank in (0, 1))
    assert second == []
    names = {Path(path).name for path in first}
    assert {CHECKPOINT_NAME, LOG_NAME, "model.safetensors", "training.json"} <= names
    assert any(path.endswith(".npz") for path in first)  # the cache of resampled cases
    rows = read_log(two)
    assert steps(rows, "autoencoder") == list(range(1, 11))


def test_two_processes_with_batches_of_b_step_as_one_with_batches_of_2b(two_and_one):
    """AdamW given the mean of the two processes' gradients of their mean losses over 4 samples takes the step
    it takes given the gradient of the mean loss over the 8 samples: after 10 steps the same weights, the same
    moments (summed gradients would make them 2 and 4 times larger), and the same losses logged. The gradients,
    summed in another order, differ in their last digits, which the moments show most where a gradient is
    small against the terms it sums."""
    two, one, _ = two_and_one
    state_two, state_one = (torch.load(folder / CHECKPOINT_NAME, weights_only=True) for folder in (two, one))
    assert state_two["step"] == state_one["step"] == 10
    for name, weights in state_one["model"].items():
        torch.testing.assert_close(state_two["model"][name], weights, rtol=1e-5, atol=1e-6, msg=name)
    for index, moments in state_one["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            largest = float(moments[key].abs().max())
            assert largest > 0, "no step was taken"
            torch.testing.assert_close(state_two["optimizer"]["state"][index][key], moments[key], rtol=0,
                                       atol=1e-3 * largest)
    losses_two, losses_one = ([float(row["loss"]) for row in read_log(folder)] for folder in (two, one))
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
