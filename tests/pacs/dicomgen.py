#!/usr/bin/python3
"""Synthetic DICOM studies for the PACS bridge tests and benchmark, made with pydicom from the
demo cases (demo/cases/*.png, 64x64 RGB).

Grey images (every channel equal) become MONOCHROME2, 8 bits, with Window Center 128 /
Width 256: the linear VOI function (PS3.3 C.11.2.1.2) maps x to ((x - 127.5) / 255 + 0.5) *
255 = x, so a viewer (and the router's display pipeline) shows the PNG's pixels exactly,
where no window would stretch min..max. Colour ones are RGB, 8 bits, interleaved, shown as
they are. So the demo model sees the same image as from the PNG.

Each study carries a made-up patient (name, ID, birth date) so that the tests can grep the
bridge's logs for them: they must never appear there.

    study = make_study([("CT", "ct_1.png", 1), ("CT", "ct_1.png", 5), ("MR", "mri_1.png", 7)],
                       patient=PATIENTS[0])
    # series 1: one CT instance (a scout); series 2: five CT instances, the middle one (the
    # 3rd by InstanceNumber) is ct_1.png, the others ct_2.png; series 3: seven MR instances
    study.files  -> [bytes of a Part 10 file, ...]
"""

import io
import os

import numpy as np
import PIL.Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CASES = os.path.join(ROOT, "demo", "cases")

SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
             "SM": "1.2.840.10008.5.1.4.1.1.77.1.6", "OT": "1.2.840.10008.5.1.4.1.1.7"}

# Made-up people: strings distinctive enough that a grep for them finds nothing else.
PATIENTS = [{"name": "Zyxwert^Quintessa", "id": "PID-774411", "birth": "19480229"},
            {"name": "Blorvane^Ottokar", "id": "PID-662093", "birth": "19710704"},
            {"name": "Krimsel^Hedvika", "id": "PID-530187", "birth": "19550918"},
            {"name": "Vantreux^Ambrose", "id": "PID-918264", "birth": "19830111"},
            {"name": "Quellmoor^Isidora", "id": "PID-207755", "birth": "19660327"}]


class Study:
    def __init__(self, uid, files, instances):
        self.uid = uid              # StudyInstanceUID
        self.files = files          # [Part 10 bytes]
        self.instances = instances  # [(series uid, sop uid, instance number, png, modality)]

    def middle_of_largest(self, modality=None):
        """(series, sop) the bridge must choose: the middle instance by InstanceNumber of the
        series of `modality` (None: any) with most instances."""
        by_series = {}
        for se, sop, num, _, mod in self.instances:
            if modality is None or mod == modality:
                by_series.setdefault(se, []).append((num, sop))
        se = max(by_series, key=lambda s: len(by_series[s]))
        insts = sorted(by_series[se])
        return se, insts[(len(insts) - 1) // 2][1]


def _pixels(png):
    a = np.asarray(PIL.Image.open(os.path.join(CASES, png)).convert("RGB"))
    if (a[..., 0] == a[..., 1]).all() and (a[..., 0] == a[..., 2]).all():
        return a[..., 0].copy(), "MONOCHROME2"
    return a, "RGB"


def make_instance(study_uid, series_uid, series_number, instance_number, modality, png, patient,
                  accession="ACC0001", description="medmoe bridge test"):
    px, photometric = _pixels(png)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS.get(modality, SOP_CLASS["OT"])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.StudyDescription = description
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1 if photometric == "MONOCHROME2" else 3
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    else:
        ds.WindowCenter = 128
        ds.WindowWidth = 256
    ds.Rows, ds.Columns = px.shape[0], px.shape[1]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = px.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue(), sop_uid


def make_study(series, patient, accession="ACC0001"):
    """series: [(modality, png of the middle instance, instance count)]; the other instances
    use the case's "_2" image when there is one (so the middle one is recognisable)."""
    study_uid = generate_uid()
    files, instances = [], []
    for k, (modality, png, count) in enumerate(series):
        se_uid = generate_uid()
        other = png.replace("_1.png", "_2.png")
        if not os.path.exists(os.path.join(CASES, other)):
            other = png
        mid = (count - 1) // 2
        for i in range(count):
            p = png if i == mid else other
            data, sop = make_instance(study_uid, se_uid, k + 1, i + 1, modality, p, patient, accession)
            files.append(data)
            instances.append((se_uid, sop, i + 1, p, modality))
    return Study(study_uid, files, instances)
