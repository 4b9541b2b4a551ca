"""Writes a Basic Text SR (TID 2000, Basic Diagnostic Imaging Report) of an image's study with
pydicom, the way a reporting system stores a radiologist's report beside the images.

usage: write_sr.py OUT.dcm IMAGE.dcm SPEC_JSON
SPEC: {"findings": str, "impression": str, "verified": bool, "complete": bool,
       "preliminary": bool, "when": "YYYYMMDDHHMMSS", "observer": "Family^Given",
       "evidence": bool (list the image's SOP instance), "recorder": "Family^Given" (a PNAME item)}
"""

import json
import sys

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def code(value, scheme, meaning):
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return Sequence([c])


def text_item(value, scheme, meaning, text):
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = code(value, scheme, meaning)
    item.TextValue = text
    return item


def container(value, scheme, meaning, children):
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "CONTAINER"
    item.ConceptNameCodeSequence = code(value, scheme, meaning)
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = Sequence(children)
    return item


def main(out, image_path, spec):
    image = pydicom.dcmread(image_path)
    ds = Dataset()
    for keyword in ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "AccessionNumber", "InstitutionName",
                    "ReferringPhysicianName", "StudyID"]:
        if keyword in image:
            setattr(ds, keyword, getattr(image, keyword))
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.ContentDate = spec["when"][:8]
    ds.ContentTime = spec["when"][8:]
    ds.CompletionFlag = "COMPLETE" if spec.get("complete", True) else "PARTIAL"
    ds.VerificationFlag = "VERIFIED" if spec.get("verified", True) else "UNVERIFIED"
    ds.PreliminaryFlag = "PRELIMINARY" if spec.get("preliminary", False) else "FINAL"
    if spec.get("verified", True):
        observer = Dataset()
        observer.VerifyingObserverName = spec.get("observer", "Grey^Meredith")
        observer.VerifyingOrganization = "St. Elsewhere General Hospital"
        observer.VerificationDateTime = spec["when"]
        observer.VerifyingObserverIdentificationCodeSequence = Sequence([])
        ds.VerifyingObserverSequence = Sequence([observer])
    if spec.get("evidence", False):
        sop = Dataset()
        sop.ReferencedSOPClassUID = image.SOPClassUID
        sop.ReferencedSOPInstanceUID = image.SOPInstanceUID
        series = Dataset()
        series.SeriesInstanceUID = image.get("SeriesInstanceUID", generate_uid())
        series.ReferencedSOPSequence = Sequence([sop])
        study = Dataset()
        study.StudyInstanceUID = image.StudyInstanceUID
        study.ReferencedSeriesSequence = Sequence([series])
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = code("18748-4", "LN", "Diagnostic Imaging Report")
    ds.ContinuityOfContent = "SEPARATE"
    content = [
        container("121070", "DCM", "Findings",
                  [text_item("121071", "DCM", "Finding", spec["findings"])]),
        container("121072", "DCM", "Impressions",
                  [text_item("121073", "DCM", "Impression", spec["impression"])]),
    ]
    if "recorder" in spec:
        person = Dataset()
        person.RelationshipType = "HAS OBS CONTEXT"
        person.ValueType = "PNAME"
        person.ConceptNameCodeSequence = code("121008", "DCM", "Person Observer Name")
        person.PersonName = spec["recorder"]
        content.insert(0, person)
    ds.ContentSequence = Sequence(content)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
