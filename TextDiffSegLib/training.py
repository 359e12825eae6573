"""Training any model family on a Decathlon-style dataset, resumable from checkpoints.

The family's recipe (``families.base.Recipe``) gives the stages, their losses and the batches; this
trainer runs them: AdamW with a cosine schedule, bfloat16 autocast where the device computes it
natively, batches drawn by worker processes, and for an averaged stage an exponential moving average
of the trained weights, which is what is saved (steadier than the last step's weights, as diffusion
models usually do). A checkpoint is written every few hundred steps; running the same command again
resumes from it. Every step's loss goes to ``loss_log.csv``.

Under ``torchrun`` (``distributed``) the same command trains in several processes, on one machine or many:
each draws its own batches (of ``batch_size``: the step's batch is that times the processes), their gradients
are averaged before every step, and the main process alone writes the checkpoint, the log and the model
folder. The checkpoint holds one copy of the state, so a run resumes with any number of processes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed
from .adaptation import add_adapter, save_adapter, weights_sha256
from .datasets import prepare_case, read_dataset, split_cases
from .errors import DataError, ModelError, SettingsError
from .families import FAMILIES
from .families.base import BatchSource, Stage
from .modelio import load_model, save_model
from .model_card import TRAINED_PARAMETERS, TRAINING_RECORD, VOLUME_RANGES, render_card
from .registry import resolve_model
from .terminology import get_structure, resolve_prompt
from .text_encoders import TASKS, TextEmbedding, conditioning_text, load_text_encoder
from .typical_size import training_volume_ranges
from .volume import write_atomically

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "loss_log.csv"
# A step whose gradients are not finite is skipped (bfloat16 kernels on some CPUs give a rare NaN); this many
# in a row mean the run has diverged.
MAX_SKIPPED_IN_A_ROW = 20
# Config fields that are not model options: the dataset, the run's settings and training set them.
NOT_OPTIONS = ("family", "name", "modality", "structures", "adapter", "latent_scale")


@dataclasses.dataclass
class TrainSettings:
    data: str
    output: str
    family: str = "universal"
    name: str = ""
    structures: tuple[str, ...] = ()  # empty: every structure the dataset labels
    validation_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 16
    crop: tuple[int, ...] = (128, 128)  # training crop, voxels of the model grid: (y, x) slices or (z, y, x) patches
    autoencoder_steps: int = 600
    diffusion_steps: int = 6000
    autoencoder_lr: float = 1e-3
    lr: float = 3e-4
    weight_decay: float = 1e-5
    decoded_mask_weight: float = 1.0
    high_noise_share: float = 0.0  # of the timesteps drawn by importance, the share taken from the last tenth instead
    present_fraction: float = 0.75  # share of samples drawn from slices that contain the structure
    near_negative_fraction: float = 0.5  # of the other samples, the share from slices within 40 mm past its ends
    rotation_degrees: float = 10.0  # in-plane rotations drawn from ±this (0: none)
    scaling: float = 0.15  # in-plane zoom drawn from 1 ± this (0: none)
    gamma: float = 1.0  # intensity gamma drawn log-uniformly from 1/this to this (1: none)
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto": bf16 where the CPU or GPU computes it natively
    cache_dir: str = ""
    # Config fields of a new model (spacing, widths...); training from init_from accepts only its own values.
    model_options: dict = dataclasses.field(default_factory=dict)
    init_from: str = ""  # a model (folder or name) to start from: its config and weights; no autoencoder stage
    lora_rank: int = 0  # > 0: adapt init_from with LoRA of this rank (see adaptation) instead of training it all
    lora_alpha: float = 0.0  # LoRA scale numerator (0: the rank)
    ema_decay: float = 0.999  # the saved denoiser: a moving average of its weights with this decay (0: the last ones)
    workers: int = 0  # processes drawing batches ahead of the training step (0: drawn in the training process)


class WorkerBatches(torch.utils.data.IterableDataset):
    """Endless batches of a family's batch source for a ``DataLoader`` with worker processes.

    Each worker draws from its own random stream, seeded by ``seed`` (the run's seed, position and process)
    and the worker's number: forked with one copy of the source, they would otherwise all send
    the same batches.
    """

    def __init__(self, source: BatchSource, batch_size: int, seed: list[int]):
        self.source, self.batch_size, self.seed = source, batch_size, seed

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            self.source.rng = np.random.default_rng([*self.seed, worker.id])
        while True:
            yield self.source.batch(self.batch_size)


def _new_config(settings: TrainSettings, name: str, modality: str, structures: tuple[str, ...]):
    """The config of a model trained from scratch: its family's defaults, with ``settings.model_options``."""
    if settings.family not in FAMILIES:
        raise DataError(f"unknown model family {settings.family!r}; known families are {', '.join(FAMILIES)}")
    config_class = FAMILIES[settings.family].config
    options = settings.model_options
    known = sorted({f.name for f in dataclasses.fields(config_class)} - set(NOT_OPTIONS))
    misplaced = sorted(set(options) & set(NOT_OPTIONS))
    if misplaced:
        raise DataError(f"{', '.join(misplaced)} cannot be set as model options: the dataset, the run's settings "
                        "and training set them")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DataError(f"the {settings.family} family has no option {', '.join(unknown)}; its options are {', '.join(known)}")
    try:
        return config_class.from_options(dict(family=settings.family, name=name, modality=modality,
                                              structures=structures, **options))
    except (TypeError, ValueError) as error:
        raise DataError(f"the model options do not fit the {settings.family} family: {error}") from None


def _check_options_kept(config, options: dict, init_from: str) -> None:
    """Refuse model options that differ from those of the model training continues from."""
    current = config.to_dict()
    for key, value in options.items():
        if key not in current or key in NOT_OPTIONS:
            raise DataError(f"{key} is not a model option; leave it out when training from {init_from}")
        if current[key] != (list(value) if isinstance(value, tuple) else value):
            raise DataError(f"{init_from} has {key} = {current[key]}, and training from it cannot change that "
                            f"to {value}; leave that model option out, or train a new model without init_from")


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (CPUs with AVX-512 BF16 or AMX; Ampere and later GPUs).

    Not oneDNN's own test, which also passes CPUs with plain AVX-512 that emulate bfloat16: a 3D training step
    there took 3.0 s in bfloat16 against 1.2 s in fp32 (a 2-core Intel Xeon without AVX-512 BF16). A PyTorch too old
    to list the CPU's capabilities (`torch.cpu.get_capabilities`) trains in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    listed = getattr(torch.cpu, "get_capabilities", None)
    capabilities = listed() if device.type == "cpu" and listed else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise DataError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision == "bf16" and not bf16_is_native(device):
        raise DataError(f"{device} has no native bfloat16 arithmetic; train with precision fp32 (--precision fp32)")
    return precision == "bf16" or (precision == "auto" and bf16_is_native(device))


def _cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _check_counts(settings: TrainSettings) -> None:
    """Raise ``SettingsError`` unless the batch size and checkpoint interval are whole numbers of at least 1."""
    for name, value in (("batch_size (--batch-size)", settings.batch_size),
                        ("checkpoint_every (--checkpoint-every)", settings.checkpoint_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingsError(f"{name} must be a whole number of at least 1, not {value!r}")


def _check_stages(stages: list[Stage]) -> None:
    """Raise ``SettingsError`` where a stage the run trains has no steps: no model is written that was not trained."""
    for stage in stages:
        if not isinstance(stage.steps, int) or isinstance(stage.steps, bool) or stage.steps < 1:
            raise SettingsError(f"the {stage.name} stage is set to {stage.steps!r} steps (--steps sets the denoiser's, "
                                "--autoencoder-steps a mask autoencoder's); each stage a run trains needs at least 1")


class _Run:
    """State of one training run: the model, its family's recipe, optimiser, stage and step, log."""

    def __init__(self, settings: TrainSettings, progress: Callable[[str, int, int, float], None] | None):
        self.rank = distributed.rank()
        self.settings, self.progress = settings, progress if self.rank == 0 else None  # one progress bar
        _check_counts(settings)
        self.output = Path(settings.output)
        self.device = distributed.device_of_this_process(settings.device)
        # Weights and optimiser stay fp32; only the forward pass runs in bfloat16 (1.7x faster on a
        # CPU with AVX-512 BF16), and losses are computed in fp32.
        self.bf16 = _use_bf16(settings.precision, self.device)
        if not 0 <= settings.ema_decay < 1:
            raise DataError(f"ema_decay must be at least 0 and below 1 (0: no averaging), not {settings.ema_decay}")
        if not (0 <= settings.present_fraction <= 1 and 0 <= settings.near_negative_fraction <= 1):
            raise DataError(f"present_fraction and near_negative_fraction are shares between 0 and 1, not "
                            f"{settings.present_fraction} and {settings.near_negative_fraction}")
        if settings.decoded_mask_weight < 0:
            raise DataError(f"decoded_mask_weight is a loss weight, 0 or more, not {settings.decoded_mask_weight}")
        if not 0 <= settings.high_noise_share <= 1:
            raise DataError(f"high_noise_share is a share between 0 and 1, not {settings.high_noise_share}")
        if settings.workers < 0:
            raise DataError(f"workers is a number of processes, 0 or more, not {settings.workers}")
        if not 0 <= settings.scaling < 1 or settings.rotation_degrees < 0 or settings.gamma < 1:
            raise DataError(f"augmentation needs 0 <= scaling < 1, rotation_degrees >= 0 and gamma >= 1, not "
                            f"scaling {settings.scaling}, rotation_degrees {settings.rotation_degrees} and "
                            f"gamma {settings.gamma}")
        dataset = read_dataset(settings.data)
        # Names or synonyms ("left kidney"); a misspelt one gets the nearest known names.
        structures = (tuple(dict.fromkeys(resolve_prompt(s).name for s in settings.structures))
                      or tuple(dataset.labels[v] for v in sorted(dataset.labels)))
        dataset.require_labels(structures)
        self.training_cases, self.validation_cases = split_cases(dataset.cases, settings.validation_fraction, settings.split_seed)
        if settings.lora_rank and not settings.init_from:
            raise DataError("LoRA adapts a trained model: name it with init_from (--init-from)")
        if settings.init_from:
            base = resolve_model(settings.init_from)
            if base.resolve() == (self.output / "model").resolve():
                raise DataError(f"{base} is where this run writes its model: training from it would replace the model "
                                "it starts from; choose another --output")
            self.model = load_model(base, device=self.device).train()
            self.config = self.model.config
            self.config.name = settings.name or self.output.name
            self.config.modality = dataset.modality  # the scans it now learns from are normalised as such
            if settings.lora_rank:
                self._add_adapter(base, structures)
            _check_options_kept(self.config, settings.model_options, settings.init_from)
            structures = self.config.structures
            dataset.require_labels(structures, f", which {settings.init_from} segments; training from it needs all of them")
        else:
            self.config = _new_config(settings, settings.name or self.output.name, dataset.modality, structures)
            self.model = FAMILIES[settings.family].model(self.config).to(self.device)
        self.recipe = FAMILIES[self.config.family].recipe(self.model, settings, self)
        # A model trained on from another skips the stages that make a new one (its autoencoder, say).
        self.stages = [stage for stage in self.recipe.stages() if not (settings.init_from and stage.new_models_only)]
        _check_stages(self.stages)
        self.stage, self.step = self.stages[0].name, 0
        self.output.mkdir(parents=True, exist_ok=True)  # only once the settings are known to train a model
        cache = Path(settings.cache_dir) if settings.cache_dir else self.output / "cache"
        with distributed.main_first():  # the others read the cases the main process put in the cache
            prepared = [prepare_case(case, dataset, self.config.spacing, cache) for case in self.training_cases]
        self.source = self.recipe.batch_source(prepared, structures, self.prompt_embeddings(structures))
        self.cases, self.structures = prepared, structures
        self.optimizer = self._optimizer()
        self.average: dict[str, torch.Tensor] | None = None  # the moving average, once an averaged stage runs
        self.skipped_steps = self.skipped_in_a_row = 0  # steps not applied: their gradients were not finite
        self._resume()
        if self.rank:  # the main process draws as a run in one process does, the others from streams of their own
            self.source.rng = np.random.default_rng(self.position_seed())
        self.share_main_state()
        self.worker_batches = None  # started at the first batch, after resuming has set the run's position

    @property
    def current(self) -> Stage:
        return next(stage for stage in self.stages if stage.name == self.stage)

    def position_seed(self) -> list[int]:
        """The seed of the batches this process draws from the run's current position: a resumed run draws new
        ones, and each process its own (the main process those of a run in one process)."""
        return [self.settings.seed, self.step, len(self.stage)] + ([self.rank] if self.rank else [])

    def share_main_state(self) -> None:
        """Give every process the main one's weights and recipe state: they start from the same weights, and a
        stage's ``finish`` (the latent scale measured on each process's own batches, say) ends the same in all."""
        distributed.copy_from_main(self.model.state_dict().values())
        self.recipe.load_state(distributed.main_value(self.recipe.state()))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch of images, masks and structure indices, drawn here or by the worker processes."""
        if not self.settings.workers:
            return self.source.batch(self.settings.batch_size)
        if self.worker_batches is None:
            batches = WorkerBatches(self.source, self.settings.batch_size, self.position_seed())
            self.worker_batches = iter(torch.utils.data.DataLoader(
                batches, batch_size=None, num_workers=self.settings.workers, prefetch_factor=4,
                pin_memory=self.device.type == "cuda"))
        return next(self.worker_batches)

    def _add_adapter(self, base: Path, structures: tuple[str, ...]) -> None:
        """LoRA into the model; the adapter segments ``structures``, those the new modality's data labels."""
        init_from = self.settings.init_from
        if self.config.adapter is not None:
            raise DataError(f"{init_from} is itself an adapter; adapt its base model '{self.config.adapter['base']}' instead")
        if self.config.conditioning != "text":
            raise DataError(f"{init_from} names structures by a learnt embedding; LoRA adaptation needs a model "
                            "conditioned on text, which can be adapted for some of its structures")
        new = [s for s in structures if s not in self.config.structures]
        if new:
            raise DataError(f"{init_from} does not segment {', '.join(new)}: adaptation teaches a model a new "
                            "modality, not new structures; leave them out with --structures")
        self.config.structures = structures
        # A registered model is recorded by name, so that the adapter finds it on any machine.
        reference = str(base.resolve()) if Path(init_from).expanduser().is_dir() else init_from
        add_adapter(self.model, reference, weights_sha256(base), self.settings.lora_rank,
                    self.settings.lora_alpha or self.settings.lora_rank)

    def prompt_embeddings(self, structures: tuple[str, ...], task: str = TASKS[0]) -> TextEmbedding | None:
        """The embeddings of the structures' prompts with the verb ``task`` (the canonical prompts by default),
        one row each (None for a learned embedding)."""
        if self.config.conditioning == "learned":
            return None
        encoder = load_text_encoder(self.config.text_encoder, device=self.device)
        return encoder.encode([conditioning_text(get_structure(s), self.config.modality, task) for s in structures])

    def _optimizer(self) -> torch.optim.Optimizer:
        stage = self.current
        return torch.optim.AdamW(stage.parameters(), lr=stage.lr, weight_decay=self.settings.weight_decay)

    def _resume(self) -> None:
        path = self.output / CHECKPOINT_NAME
        if path.is_file():
            try:
                state = torch.load(path, map_location=self.device, weights_only=True)
                self.recipe.load_state(state)
                self.model.load_state_dict(state["model"])
                self.stage, self.step = state["stage"], state["step"]
                self.optimizer = self._optimizer()
                self.optimizer.load_state_dict(state["optimizer"])
                self.average = state.get("average")
                self.skipped_steps = state.get("skipped_steps", 0)
            except (RuntimeError, ValueError, KeyError, EOFError, OSError, StopIteration) as error:
                lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().endswith(":")]
                first_line = lines[0][:200] if lines else type(error).__name__
                raise ModelError(
                    f"cannot resume from {path}: it is corrupt or was written with other model settings ({first_line}). "
                    "Resume with the settings of that run, or choose a new output folder (or delete the checkpoint) "
                    "to start over."
                ) from None
            self.source.rng = np.random.default_rng(self.position_seed())
        self._trim_log()

    def _trim_log(self) -> None:
        """Drop log rows past the resumed position (steps done after the last checkpoint are done again)."""
        path = self.output / LOG_NAME
        if self.rank != 0 or not path.is_file():
            return
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        stages = [stage.name for stage in self.stages]

        def done(row: list[str]) -> bool:
            try:
                stage, step = row[0], int(row[1])
                return stages.index(stage) < stages.index(self.stage) or (stage == self.stage and step <= self.step)
            except (IndexError, ValueError):  # a malformed row (say, half written when the run was killed)
                return False

        kept = rows[:1] + [row for row in rows[1:] if done(row)]
        if len(kept) < len(rows):
            text = io.StringIO()
            csv.writer(text).writerows(kept)
            write_atomically(path, lambda p: p.write_text(text.getvalue()), overwrite=True)

    def checkpoint(self) -> None:
        if self.rank != 0:  # the others hold the same state
            return
        state = {**self.recipe.state(), "stage": self.stage, "step": self.step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "average": self.average, "skipped_steps": self.skipped_steps}
        write_atomically(self.output / CHECKPOINT_NAME, lambda p: torch.save(state, p), overwrite=True)

    def log(self, loss: float, seconds: float) -> None:
        if self.rank != 0:
            return
        path = self.output / LOG_NAME
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["stage", "step", "loss", "lr", "seconds"])
            writer.writerow([self.stage, self.step, f"{loss:.6f}", f"{self.optimizer.param_groups[0]['lr']:.3g}", f"{seconds:.3f}"])

    def run_stage(self) -> None:
        """The current stage's remaining steps."""
        stage = self.current
        while self.step < stage.steps:
            started = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = _cosine_lr(self.step, stage.steps, stage.lr)
            loss = stage.loss(self.batch())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Averaged over the processes before the check, so that all take (or all skip) the same step.
            loss = distributed.average_gradients(self._optimized(), loss)
            if self._gradients_finite():
                self.optimizer.step()
                if stage.averaged:
                    self.update_average()
                self.skipped_in_a_row = 0
            else:  # as AMP's gradient scaler does: the step is not applied, and the run goes on
                self.skipped_steps += 1
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
                    raise ModelError(f"training diverged: the gradients of {MAX_SKIPPED_IN_A_ROW} steps in a row were not "
                                     f"finite (NaN or infinite), at step {self.step + 1} of the {self.stage} stage; "
                                     "resume with a lower --lr, or with --precision fp32")
            self.step += 1
            self.log(loss.item(), time.perf_counter() - started)
            if self.progress is not None:
                self.progress(self.stage, self.step, stage.steps, loss.item())
            if self.step % self.settings.checkpoint_every == 0 or self.step == stage.steps:
                self.checkpoint()

    def _optimized(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _gradients_finite(self) -> bool:
        gradients = [p.grad for p in self._optimized() if p.grad is not None]
        return bool(torch.stack([g.isfinite().all() for g in gradients]).all()) if gradients else True

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update_average(self) -> None:
        """Move the average towards the current weights; early on it follows them closely (as diffusers' EMAModel)."""
        if not self.settings.ema_decay:
            return
        parameters = self._trained_parameters()
        if self.average is None:
            self.average = {name: p.detach().clone() for name, p in parameters.items()}
        decay = min(self.settings.ema_decay, (1 + self.step) / (10 + self.step))
        for name, parameter in parameters.items():
            self.average[name].lerp_(parameter, 1 - decay)

    @torch.no_grad()
    def use_average(self) -> None:
        """Put the averaged weights into the model (before saving it)."""
        if not self.settings.ema_decay:
            return
        parameters = self._trained_parameters()
        for name, value in (self.average or {}).items():
            parameters[name].copy_(value)


def train(settings: TrainSettings, progress: Callable[[str, int, int, float], None] | None = None) -> Path:
    """Train (or resume) and write the model folder ``<output>/model``; returns that folder. Under torchrun every
    process runs this, and returns once the main process has written the folder."""
    with distributed.process_group(distributed.device_of_this_process(settings.device)):
        # Each process draws its own noise; the weights of all are the main process's (share_main_state).
        torch.manual_seed(settings.seed + distributed.rank())
        run = _Run(settings, progress)
        run.model.train()
        names = [stage.name for stage in run.stages]
        for stage in run.stages[names.index(run.stage):]:
            if stage.name != run.stage:  # the next stage starts
                run.stage, run.step = stage.name, 0
                run.optimizer = run._optimizer()
                run.checkpoint()
            run.run_stage()
            if stage.finish is not None:
                stage.finish()
                run.share_main_state()
        run.use_average()
        run.model.eval()
        folder = run.output / "model"
        if run.rank == 0:  # the others hold the same weights
            _write_model(run, folder)
        return folder


def _write_model(run: _Run, folder: Path) -> None:
    """The trained model (or adapter) and its training record."""
    split = {"training": [c.id for c in run.training_cases], "validation": [c.id for c in run.validation_cases]}
    # A run from init_from trains the family of the model it starts from, whatever settings.family says.
    trained = sum(p.numel() for p in run._optimized())
    record = {"settings": {**dataclasses.asdict(run.settings), "family": run.config.family}, "split": split,
              "skipped_steps": run.skipped_steps,
              VOLUME_RANGES: training_volume_ranges(run.cases, run.structures, run.config.spacing),
              TRAINED_PARAMETERS: {"stage": run.stage, "trained": trained,
                                   "of": sum(p.numel() for p in run.model.parameters())}}
    save = save_adapter if run.config.adapter is not None else save_model
    save(run.model, folder, card=render_card(run.config, record))
    (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
