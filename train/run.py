"""``make train``: train a 4M model on a dataset root's token store, resumably, with Lightning.

Before any step the run checks that the three sides agree: the token store (each shard's
``four_m.vocab_size`` and ``four_m.tokenizer``), the trained tokenizers under ``tokenizers/``, and,
when resuming, the checkpoint's own modalities and vocabularies. A mismatch stops with a message
naming both sides; so does a checkpoint of an older version of the model, which must be retrained.
Single process, multi-GPU and multi-node runs differ only in ``train.strategy``/``devices``/``num_nodes``:
Lightning launches and places the processes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import save_model

from four_m.core.config import Config
from four_m.core.dataset_root import DatasetRoot, atomic_path, clear_temporaries, write_text_atomic
from four_m.core.errors import UserError
from four_m.core.modalities import MODALITIES, pixel_inputs
from four_m.core.runs import DESCRIPTION, LOGS, mark_run, read_losses, run_lock
from four_m.core.storage import RootPath
from four_m.tokenize.registry import load_tokenizer, tokenizer_id
from four_m.train.checkpoints import AtomicCheckpointIO, PortableModelCheckpoint, RunMirror
from four_m.train.data import PASSED_OVER, TokenDataModule, store_vocabularies
from four_m.train.finetune import FinetuneStart
from four_m.train.masking import Masker, ModalityInfo
from four_m.train.model import FourM, ModelConfig, ModelModality, check_weight_names
from four_m.train.module import FourMTraining

LAST = "last.ckpt"


class TrainingMismatchError(UserError):
    """Token store, tokenizers and checkpoint disagree on modalities or vocabularies."""


@dataclass(frozen=True)
class TrainSummary:
    run_dir: RootPath
    steps: int
    losses: list[tuple[int, float]]
    """(step, logged train loss), over every launch of the run."""
    seconds: float
    crops: int = 1
    """Crops per sample in the token store: each example showed one of them."""
    notes: tuple[str, ...] = ()
    """How the model started, for a fine-tune (``FinetuneStart.notes``)."""
    task: str = ""
    """``inputs -> targets`` of a run trained on a fixed task (``train.task``), else empty."""
    passed_over: Mapping[str, int] = field(default_factory=dict)
    """What reading the training batches passed over (``TokenDataModule.passed_over``; rank 0's share under DDP)."""

    def lines(self) -> list[str]:
        curve = f"loss {self.losses[0][1]:.3f} -> {self.losses[-1][1]:.3f}" if self.losses else "no loss logged yet"
        what = f"task {self.task} (inputs whole, targets whole)" if self.task else "any-to-any masking"
        return [
            *self.notes,
            f"train: {self.steps} steps of {what} on {self.crops} crop(s) per sample, {curve}; {self.seconds:.1f} s",
            f"train: wrote {self.run_dir / 'loss.png'} and {self.run_dir / 'model.safetensors'}",
            *self._passed_over_line(),
        ]

    def _passed_over_line(self) -> list[str]:
        counted = [f"{n} {PASSED_OVER[reason]}" for reason, n in self.passed_over.items() if n]
        return (
            [f"train: passed over while reading, each time an epoch read them: {', '.join(counted)}"] if counted else []
        )


def run_train(config: Config, start: FinetuneStart | None = None) -> TrainSummary:
    """Train ``train.run``; ``start`` (``make finetune``) starts it from another run's weights."""
    root = DatasetRoot(config.root)
    with _run_lock(root, config.train.run):
        return _train(root, config, start)


def run_finetune(config: Config) -> TrainSummary:
    """``make finetune``: ``finetune.from_run``'s weights trained on with the ``train`` section changed
    by ``finetune.train`` (``train.finetune``)."""
    config = config.finetuned()
    return run_train(config, FinetuneStart(config))


def _run_lock(root: DatasetRoot, run: str) -> AbstractContextManager:
    """The run's lock, held by the launching process only: Lightning's DDP ranks (and the other
    nodes' processes) call ``run_train`` too, inside the run that already holds it."""
    if rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0":
        return root.lock(run_lock(run))
    return nullcontext()


def _train(root: DatasetRoot, config: Config, start: FinetuneStart | None) -> TrainSummary:
    started = time.perf_counter()
    cfg = config.train
    modalities = model_modalities(root, cfg.run_modalities)
    mirror = RunMirror(root / f"runs/{cfg.run}")
    mirror.pull()
    run_dir = mirror.local  # where Lightning writes: the run folder itself, or its local mirror
    resume = run_dir / "checkpoints" / LAST
    if resume.is_file():
        check_checkpoint(resume, modalities, cfg.run)
    infos = [ModalityInfo(m.name, m.layout, m.positions, image_size=m.image_size) for m in modalities]
    data = TokenDataModule(
        root=root.path,
        modalities=[m.name for m in modalities],
        masker=Masker(infos, cfg.masking, seed=cfg.seed),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        holdout=cfg.holdout_shards,
    )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = FourMTraining.create(
        start.model_config() if start else ModelConfig.named(cfg.model),  # a fine-tune keeps its source's
        modalities,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
    )
    callbacks = start.prepare(module, resuming=resume.is_file()) if start else []
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy(cfg.strategy),
        precision=precision(cfg.precision),
        gradient_clip_val=cfg.gradient_clip,
        # A new log version per launch: a resumed run appends a segment instead of overwriting the curve.
        logger=[CSVLogger(run_dir, name=LOGS), TensorBoardLogger(run_dir, name="tensorboard")],
        callbacks=[
            PortableModelCheckpoint(
                dirpath=run_dir / "checkpoints", every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True
            ),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(after_save=mirror.push)],
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    for folder in (run_dir, run_dir / "checkpoints"):
        clear_temporaries(folder)  # what a killed launch was writing
    write_text_atomic(run_dir / "config.yaml", config.recorded_yaml())
    # weights_only: a checkpoint is plain tensors and primitives; nothing in it may run code on load.
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume.is_file() else None, weights_only=True)
    losses = read_losses(run_dir / LOGS)
    if trainer.is_global_zero:  # one writer: every DDP rank returns here
        origin = start.finished(module.model) if start else {}
        with atomic_path(run_dir / "model.safetensors") as temp:
            save_model(module.model, str(temp))
        described = {
            "model": asdict(module.model.config),
            "modalities": [asdict(m) for m in modalities],
            "tokenizers": {m.name: tokenizer_id(root, m.name) for m in modalities if m.layout != "pixels"},
            **({"task": asdict(cfg.task)} if cfg.task.inputs else {}),
            **origin,
        }
        write_text_atomic(run_dir / DESCRIPTION, json.dumps(described, indent=1))
        plot_losses(losses, run_dir / "loss.png")
        mirror.push()
        mark_run(root, cfg.run, run_dir, config.section_hash("train"))
    mirror.release()
    crops = data.shards.crops_per_sample if data.shards is not None else 1
    notes = tuple(start.notes) if start else ()
    task = f"{'+'.join(cfg.task.inputs)} -> {', '.join(cfg.task.targets)}" if cfg.task.inputs else ""
    seconds = time.perf_counter() - started
    return TrainSummary(mirror.remote, trainer.global_step, losses, seconds, crops, notes, task, dict(data.passed_over))


def model_modalities(root: DatasetRoot, names: tuple[str, ...]) -> list[ModelModality]:
    """The run's modalities with their vocabularies, once the store and the tokenizers agree (pixel
    inputs have neither: they are read from ``images/``)."""
    pixels = pixel_inputs(names)
    store = store_vocabularies(root.path, [n for n in names if n not in pixels])
    modalities = []
    for name in names:
        if name in pixels:
            modalities.append(ModelModality.pixels_of(pixels[name]))
            continue
        tokenizer = load_tokenizer(root, name)
        side = store[name]
        if side["vocab_size"] != tokenizer.vocab_size or side["tokenizer"] != tokenizer_id(root, name):
            raise TrainingMismatchError(
                f"{name}: tokens/{name} were made by tokenizer {side['tokenizer']} with {side['vocab_size']} ids,"
                f" but tokenizers/{name} is {tokenizer_id(root, name)} with {tokenizer.vocab_size}:"
                " rerun `make tokenize` after retraining a tokenizer"
            )
        spec = MODALITIES[name]
        modalities.append(ModelModality(name, spec.layout, side["vocab_size"], side["max_tokens"], spec.vocabulary))
    return modalities


def check_checkpoint(path: Path, modalities: list[ModelModality], run: str) -> None:
    """A resumed run must be this version of the model, over the same vocabularies."""
    # mmap: only the tensors' names are read here, not a large model's weights and optimizer state.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    hyper = checkpoint["hyper_parameters"]
    with torch.device("meta"):  # the checkpoint's own model, shapes only: the weights' names it should have
        saved_modalities = [ModelModality.from_dict(m) for m in hyper["modalities"]]
        model = FourM(ModelConfig(**hyper["model"]), saved_modalities)
    check_weight_names(model, [name.removeprefix("model.") for name in checkpoint["state_dict"]], run)
    saved, now = [asdict(m) for m in saved_modalities], [asdict(m) for m in modalities]
    if saved != now:
        raise TrainingMismatchError(
            f"checkpoint {path} was trained on {_describe(saved)}, the token store now has {_describe(now)}:"
            " use a new train.run name, or retokenize with the checkpoint's tokenizers"
        )


def _describe(modalities: list[dict]) -> str:
    return ", ".join(f"{m['name']} ({m['vocab_size']} ids)" for m in modalities)


def strategy(setting: str) -> str:
    """ddp with unused-parameter detection: a batch without some modality leaves its head unused."""
    return "ddp_find_unused_parameters_true" if setting == "ddp" else setting


def precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def plot_losses(losses: list[tuple[int, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot([s for s, _ in losses], [v for _, v in losses])
    axis.set_xlabel("step")
    axis.set_ylabel("train loss (mean over target modalities)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
