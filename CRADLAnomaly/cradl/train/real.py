"""Training on the real healthy cohort (IXI T1 heads in `../shared/data`) with the recorded subject split."""
from __future__ import annotations

from pathlib import Path

from .. import realdata
from .trainer import TrainConfig, recalibrate_model, train_model

GROUPS = ("train", "validation", "calibration")


def brain_masks(subjects, work_dir: Path, progress: bool = True) -> list[Path]:
    """The brain mask of every subject (brain extraction once, cached under work_dir/masks)."""
    from tqdm import tqdm

    paths = []
    for subject in tqdm(subjects, desc="brain extraction", unit="scan", disable=not progress):
        realdata.cached_brain_mask(subject.t1, work_dir / "masks")
        paths.append(realdata.mask_cache_path(subject.t1, work_dir / "masks"))
    return paths


def normal_subjects(root=None) -> tuple[list, dict[str, list[int]]]:
    """The training, validation and calibration subjects in one list, and each group's indices into it."""
    subjects, groups = [], {}
    for group in GROUPS:
        members = realdata.subjects_in(group, root)
        groups[group] = list(range(len(subjects), len(subjects) + len(members)))
        subjects += members
    return subjects, groups


def train_on_ixi(out: str | Path, config: TrainConfig, work_dir: str | Path, root=None, device: str = "auto",
                 resume: bool = True, progress: bool = True) -> Path:
    """Train on the recorded split's training subjects; validation and calibration subjects as their names
    say; the test subjects are never touched."""
    work_dir = Path(work_dir)
    subjects, groups = normal_subjects(root)
    masks = brain_masks(subjects, work_dir, progress)
    split = {g: [subjects[i].id for i in groups[g]] for g in GROUPS}
    split["test"] = realdata.recorded_split()["test"]
    return train_model([realdata.data_root(root) / "ixi" / "T1"], out, config, device=device, resume=resume,
                       scans=[s.t1 for s in subjects], progress=progress, masks=masks, groups=groups,
                       data_split={"file": realdata.SPLIT_FILE.name, "seed": realdata.SPLIT_SEED, **split},
                       contrasts=("t1",))


def recalibration_subjects(root=None, leak_free: bool = False) -> list:
    """The subjects a recalibration uses. Default: the recorded validation and calibration subjects, as
    training used them. `leak_free`: the calibration subjects alone, so that lesions painted into the
    validation subjects (`real-set --split validation`) are scored against statistics those subjects took
    no part in: the way to tune settings."""
    if leak_free:
        return realdata.subjects_in("calibration", root)
    return realdata.subjects_in("validation", root) + realdata.subjects_in("calibration", root)


def recalibrate_on_ixi(model, out: str | Path, localization: dict | None, version: str | None, work_dir: str | Path,
                       root=None, device: str = "auto", progress: bool = True, leak_free: bool = False,
                       false_alarm_quantile: float | None = None) -> Path:
    """Recalibrate `model` (after changing its heatmap settings) on the subjects `recalibration_subjects` names;
    the test subjects are never touched."""
    chosen = recalibration_subjects(root, leak_free)
    masks = brain_masks(chosen, Path(work_dir), progress)
    return recalibrate_model(model, [realdata.data_root(root) / "ixi" / "T1"], out, localization,
                             false_alarm_quantile, version, device, progress, [s.t1 for s in chosen], masks)
