"""Multi-process training: the SimCLR stage on PyTorch DistributedDataParallel (gloo on CPU, nccl on GPU).

`cradl train ... --nproc N` starts N processes on this machine; under `torchrun` (WORLD_SIZE, RANK,
MASTER_ADDR/PORT set) every process joins the group torchrun made. What each stage does:

1. Preparation (brain extraction, alignment): rank 0 prepares every scan once and writes the
   preparation cache (OUT.prep.npz); the other ranks read it.
2. SimCLR: every rank holds the same model (DDP broadcasts rank 0's weights); each global batch
   (`--batch-size`, the same seeded order as single-process training) is split across the ranks, each
   rank draws its own augmentations, the projections of all ranks are gathered (with their
   gradients) so the NT-Xent loss sees the whole global batch as in one process, and DDP averages
   the gradients. Batch-norm statistics are each rank's own (rank 0's running statistics are kept).
   Rank 0 writes the checkpoint (OUT.ckpt, the single-process format) after every epoch; an
   interrupted run resumes from it, with any number of processes.
3. Rank 0 fits the mixture, calibrates and writes the bundle, through the single-process trainer
   (`train_model`), which finds the finished checkpoint and the cache and goes straight to step 3.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import CradlError, InputError

log = logging.getLogger("cradl.train")


class _Pair(nn.Module):
    """Encoder and projection head as one module for DDP (their state dicts stay separate)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_distributed(normal_dirs, out, config, nproc: int = 2, device: str = "auto", resume: bool = True,
                      progress: bool = True) -> Path:
    """Train like `train_model`, with the SimCLR stage on `nproc` DDP processes; returns `out`."""
    from ..io import find_scans
    from .trainer import split_scans

    out = Path(out)
    if not out.parent.is_dir():
        raise CradlError(f"cannot write {out}: folder {out.parent} does not exist")
    paths = find_scans(normal_dirs)
    split_scans(len(paths), config)  # refuse too few scans before any process starts
    if under_torchrun():
        _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", normal_dirs, out, config,
                   device, resume, progress, None)
        return out
    if nproc < 1:
        raise CradlError("--nproc must be at least 1")
    if config.batch_size < nproc:
        raise InputError(f"--batch-size {config.batch_size} is smaller than --nproc {nproc}")
    import torch.multiprocessing as mp

    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # the failing rank says why, once
    logs = _logging_setup()
    with tempfile.TemporaryDirectory(prefix="cradl-ddp-") as scratch:
        errors = Path(scratch)
        init = f"tcp://127.0.0.1:{_free_port()}"
        try:
            mp.spawn(_spawned, args=(nproc, init, normal_dirs, out, config, device, resume, progress, str(errors),
                                     logs), nprocs=nproc, join=True)
        except Exception as exc:  # noqa: BLE001 - a rank failed: say what it said, in one line
            messages = sorted(errors.glob("rank*.txt"))
            if messages:
                raise CradlError(messages[0].read_text().strip()) from None
            raise RuntimeError(f"a training process failed: {exc}") from None
    return out


def _logging_setup() -> dict:
    """What a spawned process needs to log like this one: the console level and the --log files."""
    root = logging.getLogger()
    console = min((h.level for h in root.handlers if not isinstance(h, logging.FileHandler)), default=logging.INFO)
    files = [h.baseFilename for h in logging.getLogger("cradl").handlers if isinstance(h, logging.FileHandler)]
    return {"console": console, "files": files}


def _apply_logging(setup: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(setup["console"])
    for name in setup["files"]:
        handler = logging.FileHandler(name)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("cradl").addHandler(handler)


def _spawned(rank, world, init, normal_dirs, out, config, device, resume, progress, errors, logs):
    if rank == 0:
        _apply_logging(logs)
    try:
        _rank_main(rank, world, init, normal_dirs, out, config, device, resume, progress, errors)
    except CradlError as exc:
        Path(errors, f"rank{rank}.txt").write_text(str(exc))
        raise
    except Exception as exc:
        Path(errors, f"rank{rank}.txt").write_text(f"internal error in training process {rank}: "
                                                   f"{type(exc).__name__}: {exc}")
        if os.environ.get("CRADL_DEBUG"):
            traceback.print_exc()
        raise


def _rank_main(rank, world, init, normal_dirs, out, config, device, resume, progress, errors) -> None:
    from ..bundle import load_bundle, save_bundle
    from ..detector import resolve_device
    from ..encoder import ProjectionHead, SliceEncoder
    from ..space import ReferenceSpace
    from ..io import find_scans
    from .trainer import prepare_all, split_scans, train_model

    started = time.perf_counter()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if rank != 0:
        logging.getLogger("cradl").setLevel(logging.WARNING)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=world, timeout=datetime.timedelta(hours=4))
    try:
        out = Path(out)
        checkpoint, cache = out.with_suffix(".ckpt"), out.with_suffix(".prep.npz")
        paths = find_scans(normal_dirs)
        train_idx, _, _ = split_scans(len(paths), config)
        space = ReferenceSpace.from_mni(config.slice_size, config.spacing_mm)
        if rank == 0:
            if not resume:
                for stale in (checkpoint, cache):
                    stale.unlink(missing_ok=True)
            prepared = prepare_all(paths, space, config, cache, progress and rank == 0)
        _barrier(dev)
        if rank != 0:
            prepared = prepare_all(paths, space, config, cache, False)
        train_slices = np.concatenate([prepared[i].slices for i in train_idx])
        del prepared
        torch.manual_seed(config.seed)
        encoder = SliceEncoder(config.width, config.feature_dim, config.grid).to(dev)
        head = ProjectionHead(config.feature_dim, config.projection_dim).to(dev)
        simclr_ddp(encoder, head, train_slices, config, dev, checkpoint, rank, world, progress)
        _barrier(dev)
        if rank == 0:
            train_model(normal_dirs, out, config, device=str(dev.type), resume=True, scans=paths, progress=progress)
            bundle = load_bundle(out)
            manifest = dict(bundle.manifest.stored)
            training = dict(bundle.manifest.training)
            training["distributed"] = {"processes": world, "backend": dist.get_backend(),
                                       "global_batch_size": config.batch_size}
            training["seconds"] = round(time.perf_counter() - started, 1)
            manifest["training"] = training
            save_bundle(out, manifest, bundle.encoder, bundle.gmm, bundle.template, bundle.template_mask,
                        bundle.normal_mean)
        _barrier(dev)
    finally:
        dist.destroy_process_group()


def _barrier(dev) -> None:
    dist.barrier(device_ids=[dev.index]) if dev.type == "cuda" else dist.barrier()


def simclr_ddp(encoder, head, slices: np.ndarray, config, dev, checkpoint: Path, rank: int, world: int,
               progress: bool = True) -> None:
    """SimCLR on DDP; same schedule, batches and checkpoint format as the single-process trainer (rank 0 writes
    the checkpoint after every epoch, which `train_model` then resumes)."""
    from torch.distributed.nn.functional import all_gather
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    from .augment import nt_xent, simclr_view
    from .simclr import device_name, resume_simclr, save_simclr, simclr_optimiser, simclr_step

    if config.batch_size < world:
        raise InputError(f"--batch-size {config.batch_size} is smaller than --nproc {world}")
    optimiser, schedule, steps_per_epoch = simclr_optimiser(encoder, head, len(slices), config)
    run = resume_simclr(checkpoint, dev, encoder, head, optimiser, schedule, config, steps_per_epoch)
    if run.epochs_done and rank == 0:
        log.info("resuming from %s at epoch %d", checkpoint, run.epochs_done + 1)
    model = DDP(_Pair(encoder, head), device_ids=[dev.index] if dev.type == "cuda" else None)
    data = torch.from_numpy(slices).unsqueeze(1)
    generator = torch.Generator(device=dev)
    for epoch in range(run.epochs_done, config.epochs):
        started = time.perf_counter()
        model.train()
        generator.manual_seed((config.seed * 1000 + epoch) * 1009 + rank)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"SimCLR epoch {epoch + 1}/{config.epochs} ({world} processes)",
                   unit="batch", leave=False, disable=not progress or rank != 0)
        for step in bar:
            batch = order[step * config.batch_size:(step + 1) * config.batch_size][rank::world]
            batch = data[batch].to(dev)
            z1 = model(simclr_view(batch, generator, config.geometry))
            z2 = model(simclr_view(batch, generator, config.geometry))
            # every rank's projections, with their gradients: the loss sees the whole global batch; the
            # gradient reaching each rank's share is summed over ranks, and DDP's average undoes that sum
            loss = nt_xent(torch.cat(all_gather(z1)), torch.cat(all_gather(z2)), config.temperature)
            simclr_step(loss, optimiser, schedule, losses, bar)
        run.finish_epoch(float(np.mean(losses)), time.perf_counter() - started, f"{device_name(dev)} x {world}")
        if rank == 0:
            log.info("epoch %d/%d  NT-Xent loss %.4f (%d processes)", epoch + 1, config.epochs, run.history[-1], world)
            save_simclr(checkpoint, encoder, head, optimiser, schedule, config, steps_per_epoch, run, processes=world)
