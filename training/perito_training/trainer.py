"""The training loop: seeded, resumable, with early stopping and transfer-learning stages.

The network is trained inside `ImageClassifier`, the module that is exported: training sees
uint8 images through the same resize and normalisation serving does, and the weights never
leave that wrapper. A checkpoint is written after every epoch (`checkpoints/last.pt`) with
everything needed to resume exactly: weights, optimiser, schedule, history, early-stopping
state. Each epoch reseeds from (seed, epoch), so a resumed run continues as if never stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from perito_core.models.engines.base import pick_device
from perito_core.models.manifest import InputContract
from perito_training.architectures import Architecture, get_architecture
from perito_training.config import AugmentConfig, TrainConfig
from perito_training.datasets import ImageSet
from perito_training.export import ImageClassifier

Log = Callable[[str], None]


def input_contract(config: TrainConfig, architecture: Architecture) -> InputContract:
    model = config.model
    return InputContract(
        height=model.input_size,
        width=model.input_size,
        resize_size=model.resolved_resize_size(),
        resize_mode=model.resize_mode,
        interpolation=model.interpolation,
        mean=architecture.mean,
        std=architecture.std,
    )


def build_model(config: TrainConfig, num_classes: int) -> ImageClassifier:
    architecture = get_architecture(config.model.architecture)
    network = architecture.build(num_classes, config.model)
    return ImageClassifier(network, input_contract(config, architecture))


class TorchImages(Dataset[tuple[torch.Tensor, int]]):
    """An `ImageSet` as uint8 CHW tensors, optionally augmented."""

    def __init__(self, images: ImageSet, transform: nn.Module | None = None) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A copy: cached arrays may be read-only views, and augmentation must not touch them.
        image = torch.tensor(self.images.image(index)).permute(2, 0, 1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.images.targets[index])


def augmentation(config: AugmentConfig, size: int) -> nn.Module | None:
    """Training-time transforms on uint8 CHW tensors (the output keeps the input size)."""
    steps: list[nn.Module] = []
    if config.crop_scale is not None:
        steps.append(v2.RandomResizedCrop(size, scale=config.crop_scale, antialias=True))
    if config.translate_pixels:
        steps.append(v2.RandomCrop(size, padding=config.translate_pixels))
    if config.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if config.vflip:
        steps.append(v2.RandomVerticalFlip())
    if config.rotation_degrees:
        steps.append(v2.RandomRotation(config.rotation_degrees))
    if config.color_jitter or config.hue_jitter:
        jitter = config.color_jitter or None
        steps.append(
            v2.ColorJitter(
                brightness=jitter, contrast=jitter, saturation=jitter, hue=config.hue_jitter or None
            )
        )
    if config.random_erasing:
        # Last, on the final pixels: a random rectangle (2-33% of the area) set to black.
        steps.append(v2.RandomErasing(p=config.random_erasing, value=0))
    return v2.Compose(steps) if steps else None


class BatchAugment:
    """Training augmentation of a whole uint8 batch (N, C, H, W) at once, in a few tensor ops.

    The same transforms as `augmentation` (random translation with zero padding, horizontal and
    vertical flips, random erasing of a 2-33% rectangle with aspect ratio 0.3-3.3), drawn
    independently per image from torch's global generator, without torchvision's per-image
    Python calls: those cost about 0.5 ms an image, as much as training a small network on it.
    Returns a new batch; the input is not modified.
    """

    def __init__(
        self, translate_pixels: int, hflip: bool, vflip: bool, random_erasing: float
    ) -> None:
        self.translate_pixels = translate_pixels
        self.hflip = hflip
        self.vflip = vflip
        self.random_erasing = random_erasing

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # One thread: a batch of small images is too little work to share out, and on a busy
        # machine waiting for a second thread made these few operations 5-10x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._augment(images)
        finally:
            torch.set_num_threads(threads)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.translate_pixels:
            images = self._translate(images)
        if self.hflip:
            images = self._flip(images, 3)
        if self.vflip:
            images = self._flip(images, 2)
        if self.random_erasing:
            images = self._erase(images)
        return images

    def _translate(self, images: torch.Tensor) -> torch.Tensor:
        # RandomCrop(size, padding=p): a window at offset 0..2p of the zero-padded image.
        n, channels, height, width = images.shape
        pad = self.translate_pixels
        padded = F.pad(images, (pad, pad, pad, pad)).flatten(2)
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1))
        rows = dy + torch.arange(height)  # (N, H), in the padded image
        cols = dx + torch.arange(width)  # (N, W)
        where = rows[:, :, None] * (width + 2 * pad) + cols[:, None, :]
        index = where.view(n, 1, height * width).expand(-1, channels, -1)
        return padded.gather(2, index).view(n, channels, height, width)

    @staticmethod
    def _flip(images: torch.Tensor, dim: int) -> torch.Tensor:
        chosen = torch.rand(len(images)) < 0.5
        return torch.where(chosen.view(-1, 1, 1, 1), images.flip(dim), images)

    def _erase(self, images: torch.Tensor, attempts: int = 10) -> torch.Tensor:
        # torchvision's RandomErasing: up to 10 draws of area and aspect, the first that fits.
        n, _, height, width = images.shape
        area = height * width * torch.empty(n, attempts).uniform_(0.02, 0.33)
        aspect = torch.exp(torch.empty(n, attempts).uniform_(math.log(0.3), math.log(3.3)))
        h = torch.sqrt(area * aspect).round().long()
        w = torch.sqrt(area / aspect).round().long()
        fits = (h < height) & (w < width)
        first = fits.int().argmax(1, keepdim=True)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        erase = fits.any(1) & (torch.rand(n) < self.random_erasing)
        top = (torch.rand(n) * (height - h + 1)).long()
        left = (torch.rand(n) * (width - w + 1)).long()
        rows = torch.arange(height).view(1, -1)
        cols = torch.arange(width).view(1, -1)
        inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (N, H)
        inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (N, W)
        mask = inside_rows[:, :, None] & inside_cols[:, None, :] & erase.view(-1, 1, 1)
        return images * ~mask[:, None]


def batch_augmentation(config: AugmentConfig) -> BatchAugment | None:
    """The batch form of `augmentation` when every transform asked for has one (translation,
    flips, random erasing); None when none is asked for, or when one is not (random resized
    crop, rotation, colour jitter): then the per-image transforms run, all of them."""
    if config.crop_scale is not None or config.rotation_degrees:
        return None
    if config.color_jitter or config.hue_jitter:
        return None
    if not (config.translate_pixels or config.hflip or config.vflip or config.random_erasing):
        return None
    return BatchAugment(config.translate_pixels, config.hflip, config.vflip, config.random_erasing)


def _make_optimizer(
    config: TrainConfig, model: ImageClassifier, head: tuple[str, ...]
) -> torch.optim.Optimizer:
    head_params: list[nn.Parameter] = []
    backbone_params: list[nn.Parameter] = []
    for name, parameter in model.network.named_parameters():
        (head_params if name.startswith(head) else backbone_params).append(parameter)
    lr = config.optim.lr
    groups = [
        {"params": head_params, "lr": lr},
        {"params": backbone_params, "lr": lr * config.model.backbone_lr_scale},
    ]
    optim = config.optim
    if optim.name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay, nesterov=True
        )
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=optim.weight_decay)


def schedule_position(step: int, time_share: float | None, total_steps: int) -> float:
    """Where the learning-rate schedule stands after optimiser step `step`, in steps of the
    `total_steps` that `epochs` make: the further of the steps taken and, under
    `train.max_minutes`, the share of the time used (`time_share`, None: no limit) times
    `total_steps`. Training stops at whichever limit comes first, and the schedule reaches its
    end there: a run whose epochs end long before its time (2 epochs in 4 s of 18 minutes)
    follows its steps, where following the time alone left it near its starting rate."""
    if time_share is None:
        return float(step)
    return max(float(step), time_share * total_steps)


def lr_factor(config: TrainConfig, step: float, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at optimiser step `step` (schedules run per step;
    `schedule_position` says which step that is under `train.max_minutes`)."""
    schedule = config.schedule
    total = config.train.epochs * steps_per_epoch
    warmup = schedule.warmup_epochs * steps_per_epoch
    if schedule.name == "onecycle":
        # Up from lr/25 over the first 30%, then a cosine down to ~0 (Smith's one-cycle).
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / peak)) / 2
        progress = (step - peak) / max(1, total - peak)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "step":
        return float(schedule.gamma ** ((step // steps_per_epoch) // schedule.step_size))
    if schedule.name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    return 1.0


def set_backbone_trainable(model: ImageClassifier, head: tuple[str, ...], trainable: bool) -> None:
    for name, parameter in model.network.named_parameters():
        if not name.startswith(head):
            parameter.requires_grad_(trainable)


def _freeze_batch_norm(model: ImageClassifier, head: tuple[str, ...]) -> None:
    """A frozen backbone keeps its batch-norm statistics: put those layers in eval mode."""
    for name, module in model.network.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(head):
            module.eval()


@dataclass
class TrainState:
    """What a checkpoint holds besides weights and optimiser: enough to resume exactly."""

    epoch: int = 0
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    # Wall-clock seconds spent in training so far (all sessions of a resumed run).
    seconds: float = 0.0

    def improved(self, value: float, maximise: bool) -> bool:
        if self.best_value is None:
            return True
        return value > self.best_value if maximise else value < self.best_value


@torch.no_grad()
def predict_logits(
    model: ImageClassifier, images: ImageSet, batch_size: int, device: torch.device
) -> np.ndarray:
    """Uncalibrated logits for every image of `images`, in order."""
    model.eval()
    loader = DataLoader(TorchImages(images), batch_size=batch_size, shuffle=False)
    outputs = [model.logits(batch.to(device)).float().cpu() for batch, _ in loader]
    if not outputs:
        return np.zeros((0, len(images.classes)), dtype=np.float32)
    return torch.cat(outputs).numpy()


class Trainer:
    """Trains one configuration into a run folder.

    Args:
        config: the resolved training configuration.
        run_dir: where checkpoints and history go.
        log: receives one line per epoch and notable events.
        progress: show a progress bar per epoch (on a terminal).
    """

    def __init__(
        self, config: TrainConfig, run_dir: Path, *, log: Log = print, progress: bool = True
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.log = log
        self.progress = progress
        self.device = pick_device(config.train.device)
        self.architecture = get_architecture(config.model.architecture)
        self.head = self.architecture.head_prefixes
        self.amp = config.train.amp and self.device.type == "cuda"
        self.layout = torch.channels_last if config.train.channels_last else torch.preserve_format
        if config.train.threads:
            torch.set_num_threads(config.train.threads)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best.pt"

    def fit(
        self, train: ImageSet, val: ImageSet, *, resume: bool = False
    ) -> tuple[ImageClassifier, TrainState]:
        """Train; returns the model with the best epoch's weights, and the final state."""
        config = self.config
        torch.manual_seed(config.train.seed)
        model = build_model(config, len(train.classes)).to(self.device)
        model = model.to(memory_format=self.layout)
        optimizer = _make_optimizer(config, model, self.head)
        loader = self._train_loader(train)
        steps_per_epoch = len(loader)
        state = TrainState()
        clock = _Clock(config.train.max_minutes)

        def scheduled_step(step: int) -> float:
            return schedule_position(step, clock.share(), config.train.epochs * steps_per_epoch)

        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(config, scheduled_step(step), steps_per_epoch)
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if resume and self.checkpoint_path.exists():
            state = self._load_checkpoint(model, optimizer, scheduler, scaler)
            clock.resume(state.seconds)
            self.log(f"resumed from {self.checkpoint_path} after epoch {state.epoch}")
        maximise = config.train.monitor == "val_accuracy"
        for epoch in range(state.epoch + 1, config.train.epochs + 1):
            if state.stopped_early or clock.over(state.seconds):
                break
            frozen = self._frozen_at(epoch)
            set_backbone_trainable(model, self.head, not frozen)
            started = time.perf_counter()
            train_loss, train_accuracy = self._train_epoch(
                model, loader, optimizer, scheduler, scaler, epoch, frozen, clock
            )
            val_loss, val_accuracy = self._validate(model, val)
            state.seconds = clock.seconds()
            record = {
                "epoch": float(epoch),
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - started,
            }
            state.history.append(record)
            state.epoch = epoch
            value = val_accuracy if maximise else val_loss
            if state.improved(value, maximise):
                state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
                _atomic_save({"model": model.state_dict(), "epoch": epoch}, self.best_path)
            else:
                state.bad_epochs += 1
            patience = config.train.early_stopping_patience
            if patience is not None and state.bad_epochs >= patience:
                state.stopped_early = True
            self._save_checkpoint(model, optimizer, scheduler, scaler, state)
            self.log(
                f"epoch {epoch}/{config.train.epochs}  train loss {train_loss:.4f} acc "
                f"{train_accuracy:.4f}  val loss {val_loss:.4f} acc {val_accuracy:.4f}  "
                f"lr {record['lr']:.2e}  {record['seconds']:.0f}s"
                + ("  (backbone frozen)" if frozen else "")
                + ("  *best*" if state.best_epoch == epoch else "")
            )
            if state.stopped_early:
                self.log(
                    f"early stop: {config.train.monitor} has not improved for {patience} epochs "
                    f"(best: epoch {state.best_epoch})"
                )
            if clock.over(state.seconds):
                self.log(
                    f"time limit: train.max_minutes={config.train.max_minutes} reached in epoch "
                    f"{epoch} after {state.seconds / 60:.1f} min (best: epoch {state.best_epoch})"
                )
        best = torch.load(self.best_path, map_location=self.device, weights_only=True)
        model.load_state_dict(best["model"])
        # Export wants the plain layout: TorchScript keeps whatever strides the weights have.
        return model.to(memory_format=torch.contiguous_format).eval(), state

    def _frozen_at(self, epoch: int) -> bool:
        model = self.config.model
        if model.freeze == "none":
            return False
        return model.unfreeze_at_epoch is None or epoch < model.unfreeze_at_epoch

    def _train_loader(self, train: ImageSet) -> DataLoader[tuple[torch.Tensor, int]]:
        config = self.config
        transform = None
        if batch_augmentation(config.augment) is None:
            transform = augmentation(config.augment, config.model.input_size)
        workers = config.train.num_workers
        return DataLoader(
            TorchImages(train, transform),
            batch_size=config.train.batch_size,
            shuffle=True,
            drop_last=len(train) > config.train.batch_size,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )

    def _train_epoch(
        self,
        model: ImageClassifier,
        loader: DataLoader[tuple[torch.Tensor, int]],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        epoch: int,
        frozen: bool,
        clock: _Clock,
    ) -> tuple[float, float]:
        seed = self.config.train.seed * 100_003 + epoch
        torch.manual_seed(seed)
        assert isinstance(loader.generator, torch.Generator)
        loader.generator.manual_seed(seed)
        model.train()
        if frozen:
            _freeze_batch_norm(model, self.head)
        augment = batch_augmentation(self.config.augment)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}/{self.config.train.epochs}",
            leave=False,
            disable=not self.progress or None,
            unit="batch",
        )
        for images, targets in bar:
            if augment is not None:
                images = augment(images)
            images = images.to(self.device, non_blocking=True, memory_format=self.layout)
            targets = targets.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = model.logits(images)
                loss = F.cross_entropy(
                    logits, targets, label_smoothing=self.config.train.label_smoothing
                )
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} in epoch {epoch}: lower optim.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * len(targets)
            correct += int((logits.argmax(1) == targets).sum())
            seen += len(targets)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
            if clock.over(clock.seconds()):
                break
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def _validate(self, model: ImageClassifier, val: ImageSet) -> tuple[float, float]:
        if len(val) == 0:
            return float("nan"), float("nan")
        logits = torch.from_numpy(
            predict_logits(model, val, self.config.train.eval_batch_size, self.device)
        )
        targets = torch.from_numpy(val.targets)
        loss = F.cross_entropy(logits, targets).item()
        accuracy = (logits.argmax(1) == targets).float().mean().item()
        return loss, accuracy

    def _save_checkpoint(
        self,
        model: ImageClassifier,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        state: TrainState,
    ) -> None:
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "state": state.__dict__,
                "config": self.config.model_dump(mode="json"),
            },
            self.checkpoint_path,
        )

    def _load_checkpoint(
        self,
        model: ImageClassifier,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
    ) -> TrainState:
        saved: dict[str, Any] = torch.load(
            self.checkpoint_path, map_location=self.device, weights_only=True
        )
        changed = _config_changes(saved["config"], self.config.model_dump(mode="json"))
        if changed:
            raise ValueError(
                f"cannot resume {self.run_dir}: the config differs in {', '.join(changed)} "
                "(only train.epochs may change)"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        return TrainState(**saved["state"])


class _Clock:
    """Training's wall-clock time against `train.max_minutes`, in seconds: what earlier
    sessions of a resumed run spent plus the time since this one started."""

    def __init__(self, max_minutes: float | None) -> None:
        self.limit = None if max_minutes is None else 60 * max_minutes
        self.resume(0.0)

    def resume(self, spent: float) -> None:
        self.spent = spent
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.spent + time.perf_counter() - self.started

    def share(self) -> float | None:
        """The share of the limit used, in [0, 1]; None without a limit."""
        return None if self.limit is None else min(self.seconds() / self.limit, 1.0)

    def over(self, seconds: float) -> bool:
        return self.limit is not None and seconds >= self.limit


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    allowed = {
        "train.epochs",
        "train.max_minutes",
        "train.early_stopping_patience",
        "train.num_workers",
        "train.threads",
    }
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _config_changes(a, b, f"{path}.")
        elif a != b and path not in allowed:
            changes.append(path)
    return changes


def _atomic_save(obj: object, path: Path) -> None:
    """Write then rename: a crash mid-save never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, partial)
    partial.replace(path)
