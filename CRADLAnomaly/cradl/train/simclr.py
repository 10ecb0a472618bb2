"""The SimCLR stage: the encoder and its projection head trained with NT-Xent on two augmented views of each
slice, with a resumable checkpoint after every epoch.

Needs torch and numpy only (no SimpleITK, no scikit-learn), so the stage can run on a machine that holds
nothing but prepared slices (a GPU node); `train_model` then finds the finished checkpoint and goes on to
the mixture and calibration. The single-process and the DDP trainer share these steps and the format.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_path
from ..encoder import ProjectionHead, SliceEncoder
from .augment import nt_xent, simclr_view

if TYPE_CHECKING:
    from .trainer import TrainConfig

log = logging.getLogger("cradl.train")


def device_name(dev: torch.device) -> str:
    """The training device in words, as the manifest records it."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


@dataclass
class SimclrProgress:
    """How far a SimCLR run has got: the mean loss of each finished epoch, the time those epochs took and the
    devices they ran on (a run resumed elsewhere, e.g. trained on a GPU node and finished here, names both)."""

    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    devices: list[str] = field(default_factory=list)

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def finish_epoch(self, loss: float, seconds: float, device: str) -> None:
        self.history.append(round(loss, 4))
        self.seconds += seconds
        if device not in self.devices:
            self.devices.append(device)

    def record(self) -> dict:
        """What the manifest keeps of the run."""
        return {"loss_per_epoch": self.history, "simclr_seconds": round(self.seconds, 1),
                "simclr_devices": self.devices}


def simclr_optimiser(encoder: SliceEncoder, head: ProjectionHead, n_slices: int, config: TrainConfig):
    """(optimiser, learning-rate schedule, steps per epoch) of a SimCLR run on `n_slices` slices: one recipe
    for the single-process and the DDP trainer, so their checkpoints resume into each other."""
    params = list(encoder.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, n_slices // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.learning_rate,
                                                   total_steps=config.epochs * steps_per_epoch, pct_start=0.1)
    return optimiser, schedule, steps_per_epoch


def train_simclr(encoder: SliceEncoder, head: ProjectionHead, slices: np.ndarray, config: TrainConfig,
                 dev: torch.device, checkpoint: Path | None, progress: bool = True) -> SimclrProgress:
    """Train `encoder` and its projection `head` in place with SimCLR (NT-Xent on two augmented views of
    each slice) on `slices` (N, S, S); returns the finished run's progress (loss per epoch, time, devices).

    The one contrastive training step of the project: the model's own training and the baselines' short
    runs use it, so a variant differs from CRADL only where it says so. With `checkpoint`, every epoch is
    saved and a run of the same recipe resumes from it, on this device or another."""
    optimiser, schedule, steps_per_epoch = simclr_optimiser(encoder, head, len(slices), config)
    run = resume_simclr(checkpoint, dev, encoder, head, optimiser, schedule, config, steps_per_epoch)
    if run.epochs_done:
        log.info("resuming from %s at epoch %d", checkpoint, run.epochs_done + 1)
    data = torch.from_numpy(slices).unsqueeze(1)
    generator = torch.Generator(device=dev)
    for epoch in range(run.epochs_done, config.epochs):
        started = time.perf_counter()
        encoder.train(), head.train()
        generator.manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"SimCLR epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                   disable=not progress)
        for step in bar:
            batch = data[order[step * config.batch_size:(step + 1) * config.batch_size]].to(dev)
            z1 = head(encoder(simclr_view(batch, generator, config.geometry)))
            z2 = head(encoder(simclr_view(batch, generator, config.geometry)))
            loss = nt_xent(z1, z2, config.temperature)
            simclr_step(loss, optimiser, schedule, losses, bar)
        run.finish_epoch(float(np.mean(losses)), time.perf_counter() - started, device_name(dev))
        log.info("epoch %d/%d  NT-Xent loss %.4f", epoch + 1, config.epochs, run.history[-1])
        if checkpoint is not None:
            save_simclr(checkpoint, encoder, head, optimiser, schedule, config, steps_per_epoch, run)
    return run


def simclr_step(loss: torch.Tensor, optimiser, schedule, losses: list[float], bar) -> None:
    """One optimiser step on `loss`; its value is kept for the epoch's mean and shown on the progress bar."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    schedule.step()
    losses.append(loss.item())
    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")


def resume_simclr(checkpoint: Path | None, dev, encoder, head, optimiser, schedule, config: TrainConfig,
                  steps_per_epoch: int) -> SimclrProgress:
    """The progress of `checkpoint`, its state restored, when it is of this very run (same epochs and steps
    per epoch); else a fresh start."""
    if checkpoint is None or not checkpoint.exists():
        return SimclrProgress()
    state = torch.load(checkpoint, map_location=dev, weights_only=True)
    if state["steps_per_epoch"] != steps_per_epoch or state["epochs"] != config.epochs:
        return SimclrProgress()
    encoder.load_state_dict(state["encoder"]), head.load_state_dict(state["head"])
    optimiser.load_state_dict(state["optimiser"]), schedule.load_state_dict(state["schedule"])
    return SimclrProgress(list(state["history"]), float(state.get("seconds", 0.0)), list(state.get("devices", [])))


def save_simclr(checkpoint: Path, encoder, head, optimiser, schedule, config: TrainConfig, steps_per_epoch: int,
                run: SimclrProgress, **extra) -> None:
    """The resumable state after the run's last finished epoch, written atomically (the one checkpoint format
    of both trainers)."""
    with atomic_path(checkpoint) as tmp:
        torch.save({"encoder": encoder.state_dict(), "head": head.state_dict(),
                    "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                    "epoch": run.epochs_done - 1, "epochs": config.epochs, "steps_per_epoch": steps_per_epoch,
                    "history": run.history, "seconds": run.seconds, "devices": run.devices, **extra}, tmp)
