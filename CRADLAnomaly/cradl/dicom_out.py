"""DICOM results for a DICOM series input (highdicom, pydicom).

- the regions as a DICOM Segmentation (binary, one segment per region, ranked by peak), each segment
  naming the model (name, version) as its algorithm identification;
- the heatmap as a DICOM Parametric Map (32-bit float frames, the same values as the NIfTI heatmap,
  with a real-world value mapping: 1.0 = the 99th percentile of heatmap values on normal scans).

- the heatmap blended in colour over the scan as a Secondary Capture series (one RGB image per source
  slice, in the quick-look's colours), for viewers and PACS that cannot show a Parametric Map (dwv
  0.36 cannot place its frames).

All reference the source series (same study, frame of reference and the source instances), carry
the model's name and version (manufacturer model name, software versions) and say "NOT FOR
DIAGNOSTIC USE" in their series descriptions, so they open next to the scan in Slicer's DICOM
module, OHIF or a PACS. Frames are matched to source slices by their position along the slice
normal, so they lie exactly on the source grid whatever order the files have.

`write_dicom_series` turns an image into a classic single-frame MR series (tests and demos).
"""
from __future__ import annotations

import datetime
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .colormap import grey_window, heat_over_grey, heat_scale, region_rgb
from .errors import InputError, OutputError

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
MANUFACTURER = "CRADL Anomaly (research software)"


def _direction_columns(image: sitk.Image) -> np.ndarray:
    """Columns: the x, y and z axes of the image grid in LPS."""
    return np.array(image.GetDirection(), dtype=float).reshape(3, 3)


def source_datasets(folder: Path, grid: sitk.Image) -> list:
    """The series' datasets ordered like the z axis of `grid` (the scan as cradl read it); refused unless
    every slice lies on that grid."""
    import pydicom

    datasets = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - not a DICOM file: not a member of the series
            continue
        if "ImagePositionPatient" in ds and "PixelData" in ds:
            datasets.append(ds)
    size = grid.GetSize()
    if len(datasets) != size[2]:
        raise InputError(f"{folder}: {len(datasets)} DICOM slices for a scan of {size[2]} slices; cannot map "
                         "the results onto the series")
    axes = _direction_columns(grid)
    origin, spacing = np.array(grid.GetOrigin()), np.array(grid.GetSpacing())
    ordered: list = [None] * size[2]
    for ds in datasets:
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        if not (np.allclose(iop[:3], axes[:, 0], atol=1e-4) and np.allclose(iop[3:], axes[:, 1], atol=1e-4)):
            raise InputError(f"{folder}: slice orientation differs from the scan's grid")
        if (int(ds.Rows), int(ds.Columns)) != (size[1], size[0]):
            raise InputError(f"{folder}: slice size differs from the scan's grid")
        offset = np.array(ds.ImagePositionPatient, dtype=float) - origin
        k = int(round(float(offset @ axes[:, 2]) / spacing[2]))
        off_grid = np.linalg.norm(offset - k * spacing[2] * axes[:, 2]) > 1e-2
        if not 0 <= k < size[2] or ordered[k] is not None or off_grid:
            raise InputError(f"{folder}: slice at {list(ds.ImagePositionPatient)} is not on the scan's grid")
        ordered[k] = ds
    return ordered


def _algorithm(model: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(name=str(model["name"]), family=codes.cid7162.ArtificialIntelligence,
                                              version=str(model["version"]))


def _equipment(model: dict) -> dict:
    return {"manufacturer": MANUFACTURER, "manufacturer_model_name": f"{model['name']} {model['version']}"[:64],
            "software_versions": f"cradl {__version__}; model {model['version']}"[:64],
            "device_serial_number": "none"}


def build_segmentation(sources: list, labels: np.ndarray, regions: list, model: dict, threshold: float):
    """A binary DICOM Segmentation with one segment per region (labels: [z, y, x], k = region of rank k)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = _algorithm(model)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=r.rank, segment_label=f"CRADL region {r.rank} (peak {r.peak:.2f})"[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=f"CRADL region {r.rank}", tracking_uid=hd.UID(),
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in region_rgb(r.rank))))
        for r in regions]
    pixels = np.stack([labels == r.rank for r in regions], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1,
        content_description=f"CRADL anomaly regions above {threshold:.2f}; {DISCLAIMER}"[:64],
        content_label="CRADLREGIONS", omit_empty_frames=True, **_equipment(model))
    seg.SeriesDescription = f"CRADL anomaly regions - {DISCLAIMER}"
    return seg


def build_parametric_map(sources: list, heat: np.ndarray, model: dict):
    """A DICOM Parametric Map of the heatmap ([z, y, x] float32 on the source grid)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    heat = np.ascontiguousarray(heat, dtype=np.float32)
    top = float(max(heat.max(), 1e-3))
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="CRADL", lut_explanation="anomaly heatmap; 1.0 = 99th percentile on normal scans",
        unit=codes.UCUM.NoUnits, value_range=(float(heat.min()), top), slope=1.0, intercept=0.0)
    pmap = hd.pm.ParametricMap(
        source_images=sources, pixel_array=heat, series_instance_uid=hd.UID(), series_number=9902,
        sop_instance_uid=hd.UID(), instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=top / 2, window_width=top)],
        content_label="CRADLHEATMAP", content_description=f"CRADL anomaly heatmap; {DISCLAIMER}"[:64],
        **_equipment(model))
    pmap.SeriesDescription = f"CRADL anomaly heatmap - {DISCLAIMER}"
    return pmap


def build_heatmap_overlay(sources: list, heat: np.ndarray, model: dict, threshold: float) -> list:
    """The heatmap ([z, y, x] on the source grid) blended in colour over the scan as a Secondary Capture series:
    one RGB image per source slice, lying on it. For viewers and PACS that show no Parametric Map; the blend and
    colours are the quick-look PNG's (`colormap.heat_over_grey`), the grey window the whole series' so that
    slices match. Single-frame Secondary Capture Image Storage, the SC kind every viewer reads slice by slice."""
    import highdicom as hd
    from pydicom.pixels import apply_modality_lut

    scan = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in sources]).astype(np.float32)
    window, top = grey_window(scan), heat_scale(heat, threshold)
    series_uid = hd.UID()
    return [_overlay_image(source, heat_over_grey(scan[k], heat[k], threshold, top, window), k + 1, series_uid,
                           model, threshold) for k, source in enumerate(sources)]


def _orientation_letter(direction) -> str:
    """The patient direction (LPS: L, P or H; R, A or F when negative) an image axis mostly points to."""
    axis = int(np.argmax(np.abs(direction)))
    return ("LR", "PA", "HF")[axis][0 if direction[axis] > 0 else 1]


def _overlay_image(source, rgb: np.ndarray, number: int, series_uid: str, model: dict, threshold: float):
    import highdicom as hd
    from pydicom import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    iop = [float(v) for v in source.ImageOrientationPatient]
    image = hd.sc.SCImage.from_ref_dataset(
        source, rgb, hd.PhotometricInterpretationValues.RGB, 8, hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid, series_number=9903, sop_instance_uid=hd.UID(), instance_number=number,
        pixel_spacing=tuple(float(v) for v in source.PixelSpacing),
        patient_orientation=(_orientation_letter(iop[:3]), _orientation_letter(iop[3:])),
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description=f"CRADL anomaly heatmap overlay - {DISCLAIMER}",
        **_equipment(model))
    image.ConversionType = "WSD"  # made on a workstation from the scan (highdicom's default says digitized)
    image.BurnedInAnnotation = "NO"  # no text in the pixels: the disclaimer is in the descriptions
    image.RecognizableVisualFeatures = "YES"  # the scan's own grey values: as identifiable as the scan
    image.ImageComments = f"CRADL anomaly heatmap over the scan, coloured from {threshold:.2f}; {DISCLAIMER}"
    image.DerivationDescription = f"{model['name']} {model['version']} heatmap blended over the source image"[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    image.ReferencedImageSequence = [reference]
    image.SourceImageSequence = [Dataset(reference)]
    # Beyond the SC IOD (standard extended attributes), copied from the source slice: the plane and frame of
    # reference let viewers stack the slices in space and sync them with the scan, not just by instance number.
    for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
                    "ImageOrientationPatient", "SliceThickness", "SliceLocation"):
        if keyword in source:
            setattr(image, keyword, source[keyword].value)
    return image


def build_dicom_results(series_folder: Path, result, model: dict, seg_path=None, pmap_path=None,
                        overlay_path=None) -> list:
    """The DICOM objects for `result`, built (and the series mapped onto the scan's grid) before anything is
    written: [(kind, final path, dataset, or for the overlay folder a list of them)]. The Segmentation only
    when there are regions."""
    if result.heatmap is None:
        raise InputError("DICOM results need the heatmap (drop --no-heatmap)")
    sources = source_datasets(Path(series_folder), result.heatmap)
    heatmap = sitk.GetArrayFromImage(result.heatmap)
    objects = []
    if pmap_path:
        objects.append(("pmap", pmap_path, build_parametric_map(sources, heatmap, model)))
    if seg_path and result.regions:
        labels = sitk.GetArrayFromImage(result.region_labels)
        objects.append(("seg", seg_path, build_segmentation(sources, labels, result.regions, model, result.threshold)))
    if overlay_path:
        objects.append(("overlay", overlay_path, build_heatmap_overlay(sources, heatmap, model, result.threshold)))
    return objects


OVERLAY_FILE = re.compile(r"overlay_\d{4,}\.dcm")  # the overlay folder's files; nothing else may be replaced


def save_dicom_results(objects: list) -> dict:
    """Write built DICOM objects, all or nothing; returns {"seg", "pmap", "overlay": path or None}."""
    from .atomic import atomic_files

    written = {"seg": None, "pmap": None, "overlay": None}
    with atomic_files() as files:
        for kind, final, built in objects:
            if kind == "overlay":
                folder = files.folder(final, OVERLAY_FILE.fullmatch)
                for dataset in built:
                    _save(dataset, folder / f"overlay_{int(dataset.InstanceNumber):04d}.dcm", final)
            else:
                _save(built, files.path(final), final)
            written[kind] = Path(final)
        files.commit()
    return written


def _save(dataset, tmp: Path, final) -> None:
    from .atomic import writing

    with writing(final):
        dataset.save_as(tmp, enforce_file_format=True)
    _verify(tmp, final, dataset.SOPInstanceUID)


def write_dicom_results(series_folder: Path, result, model: dict, seg_path=None, pmap_path=None,
                        overlay_path=None) -> dict:
    """Build and write the Segmentation (only when there are regions), the Parametric Map and the overlay
    series of `result`."""
    return save_dicom_results(build_dicom_results(series_folder, result, model, seg_path, pmap_path, overlay_path))


def _verify(tmp: Path, final, uid: str) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(tmp)
        pixels = next(getattr(ds, k) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
        frames = int(getattr(ds, "NumberOfFrames", 1))
        ok = ds.SOPInstanceUID == uid and len(pixels) >= frames * int(ds.Rows) * int(ds.Columns) // 8
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise OutputError(f"writing {final} failed: the file on disk is incomplete (disk full?)")


def write_dicom_series(image: sitk.Image, folder: Path, patient_id: str = "CRADL-TEST",
                       description: str = "synthetic T1", patient_name: str = "Test^Synthetic") -> Path:
    """Write `image` as a classic single-frame MR Image Storage series (int16) in `folder`."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if np.linalg.det(_direction_columns(image)) < 0:  # DICOM slices stack along row x column: right-handed
        image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    lo, hi = float(array.min()), float(array.max())
    slope = max(hi - lo, 1e-6) / 30000.0
    stored = np.round((array - lo) / slope).astype(np.int16)
    axes = _direction_columns(image)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    today = datetime.date.today().strftime("%Y%m%d")
    spacing = image.GetSpacing()
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.SeriesDescription, ds.Manufacturer = description, "written by cradl.dicom_out.write_dicom_series"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "NONE", "", "3D"
        ds.EchoTrainLength = 1
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in (*axes[:, 0], *axes[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{lo:.6g}", f"{slope:.6g}", "US"
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
