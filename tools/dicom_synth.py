"""Synthetic DICOM images for tests, the benchmark and the demo (pydicom): one place that
knows which attributes an image object needs.

    from dicom_synth import image_dataset
    ds = image_dataset(512, 512, modality="CT", bits=16, signed=True)
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = arr.astype("<i2").tobytes()
    ds.save_as("ct.dcm", write_like_original=False)

Explicit VR little endian, a fresh SOP Instance UID; patient attributes only when given.
"""
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def image_dataset(rows, cols, pi="MONOCHROME2", samples=1, bits=16, stored=None, signed=False,
                  modality="OT", sop_class=SECONDARY_CAPTURE, patient=None):
    """An image object without its Pixel Data. patient: (name, id, birth date) or None."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    if patient:
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    ds.Modality = modality
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, pi
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = (stored or bits) - 1
    ds.PixelRepresentation = 1 if signed else 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.is_little_endian, ds.is_implicit_VR = True, False
    return ds
