//! DICOM decoding with the de-identification gate.
//!
//! Only pixel data and a whitelist of non-identifying attributes ever leave this module; patient
//! and study identity appear as keyed-hash pseudonyms and age only as a band. A file that still
//! carries direct identifiers is refused unless the caller asked for de-identification, which here
//! means applying the subset of the DICOM PS3.15 Basic Application Level Confidentiality Profile
//! documented in `docs/shard-format.md` (everything not whitelisted is dropped; IDs are replaced by
//! pseudonyms; dates are reduced to an age band). Identifier values are never logged: errors name
//! attributes, not their contents.

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, Tag};
use dicom_pixeldata::{
    ConvertOptions, ModalityLutOption, PhotometricInterpretation, PixelDecoder, PixelRepresentation,
};

use crate::image16::Image16;
use crate::meta::{SampleMeta, age_band, pseudonym};
use crate::{Error, Result};

/// Attributes that identify a patient directly (PS3.15 Table E.1-1 subset); their presence with a
/// non-empty value makes a file "identified".
pub const DIRECT_IDENTIFIERS: &[(Tag, &str)] = &[
    (tags::PATIENT_NAME, "PatientName"),
    (tags::PATIENT_ID, "PatientID"),
    (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
    (tags::PATIENT_ADDRESS, "PatientAddress"),
    (tags::PATIENT_TELEPHONE_NUMBERS, "PatientTelephoneNumbers"),
    (Tag(0x0010, 0x1000), "OtherPatientIDs"),
    (tags::OTHER_PATIENT_NAMES, "OtherPatientNames"),
    (tags::PATIENT_MOTHER_BIRTH_NAME, "PatientMotherBirthName"),
    (Tag(0x0010, 0x1090), "MedicalRecordLocator"),
    (tags::REFERRING_PHYSICIAN_NAME, "ReferringPhysicianName"),
    (tags::PERFORMING_PHYSICIAN_NAME, "PerformingPhysicianName"),
    (tags::OPERATORS_NAME, "OperatorsName"),
    (tags::INSTITUTION_NAME, "InstitutionName"),
    (tags::INSTITUTION_ADDRESS, "InstitutionAddress"),
    (tags::ACCESSION_NUMBER, "AccessionNumber"),
];

/// SOP classes whose images often carry burned-in identifying text (screenshots, scanned
/// documents, ultrasound with its annotation overlay, endoscopy and photography).
pub const AT_RISK_SOP_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.7", "Secondary Capture"),
    (
        "1.2.840.10008.5.1.4.1.1.7.1",
        "Multi-frame Single Bit Secondary Capture",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.2",
        "Multi-frame Grayscale Byte Secondary Capture",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.3",
        "Multi-frame Grayscale Word Secondary Capture",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7.4",
        "Multi-frame True Color Secondary Capture",
    ),
    ("1.2.840.10008.5.1.4.1.1.6.1", "Ultrasound Image"),
    ("1.2.840.10008.5.1.4.1.1.6.2", "Enhanced US Volume"),
    (
        "1.2.840.10008.5.1.4.1.1.3.1",
        "Ultrasound Multi-frame Image",
    ),
    ("1.2.840.10008.5.1.4.1.1.77.1.1", "VL Endoscopic Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.4", "VL Photographic Image"),
];

/// Modalities at the same risk when the SOP class says nothing more (US, other, secondary
/// capture, external camera, endoscopy).
pub const AT_RISK_MODALITIES: &[&str] = &["US", "OT", "SC", "XC", "ES", "GM", "SM"];

/// Why a file's pixels may carry identifiers and need the ingest operator's explicit
/// acceptance: `BurnedInAnnotation` is not `NO` and the SOP class or modality is one whose images
/// often carry burned-in text. None: no known risk. (`YES` is refused earlier, always.)
pub fn pixel_risk(
    sop_class: Option<&str>,
    modality: Option<&str>,
    burned_in: Option<&str>,
) -> Option<String> {
    if burned_in.is_some_and(|v| v.eq_ignore_ascii_case("NO")) {
        return None;
    }
    let class = sop_class.and_then(|uid| {
        AT_RISK_SOP_CLASSES
            .iter()
            .find(|(u, _)| *u == uid.trim_end_matches('\0').trim())
            .map(|(_, name)| format!("SOP class {name}"))
    });
    let modality = modality
        .filter(|m| AT_RISK_MODALITIES.contains(&m.trim()))
        .map(|m| format!("modality {}", m.trim()));
    class.or(modality).map(|what| {
        format!("{what} often carries burned-in text and BurnedInAnnotation does not say NO")
    })
}

/// What the de-identification gate lets through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gate {
    /// Strip identifiers instead of refusing identified files.
    pub deidentify: bool,
    /// The ingest operator checked that images at risk of burned-in text carry none.
    pub accept_burned_in_risk: bool,
}

/// A decoded DICOM file: one image per frame plus whitelisted metadata.
#[derive(Debug, Clone)]
pub struct DicomImage {
    /// One image per frame.
    pub frames: Vec<Image16>,
    /// Metadata shared by the frames (width/height set, frame unset).
    pub meta: SampleMeta,
    /// The file's identifiers, for removing them from the case's report; never written.
    pub identifiers: crate::report_deid::Context,
    /// Study Instance UID, for finding the study's Structured Report; never written.
    pub study_uid: Option<String>,
    /// SOP Instance UID, for the evidence a Structured Report lists; never written.
    pub instance_uid: Option<String>,
}

/// Name, identifier and institution attributes whose values a report of the case must not
/// carry.
const REPORT_NAMES: [Tag; 5] = [
    tags::PATIENT_NAME,
    tags::OTHER_PATIENT_NAMES,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::OPERATORS_NAME,
];
const REPORT_IDS: [Tag; 4] = [
    tags::PATIENT_ID,
    Tag(0x0010, 0x1000),
    tags::ACCESSION_NUMBER,
    Tag(0x0010, 0x1090),
];
const REPORT_PLACES: [Tag; 3] = [
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::PATIENT_ADDRESS,
];

/// What the header says that a report of the case must not repeat, and the patient's date shift.
fn report_context(obj: &DefaultDicomObject, salt: &[u8]) -> crate::report_deid::Context {
    let patient = text(obj, tags::PATIENT_ID).unwrap_or_default();
    crate::report_deid::Context {
        date_shift_days: crate::report_deid::date_shift_days(salt, &patient),
        ..report_identifiers(obj)
    }
}

/// The names, identifiers and institutions a header holds (no date shift).
pub(crate) fn report_identifiers(obj: &InMemDicomObject) -> crate::report_deid::Context {
    let values =
        |tags: &[Tag]| -> Vec<String> { tags.iter().flat_map(|&t| all_values(obj, t)).collect() };
    crate::report_deid::Context {
        names: values(&REPORT_NAMES),
        identifiers: values(&REPORT_IDS),
        institutions: values(&REPORT_PLACES),
        date_shift_days: 0,
    }
}

/// Largest DICOM file read.
pub const MAX_FILE_BYTES: u64 = 2 << 30;
/// Most frames one DICOM file may declare.
pub const MAX_FRAMES: u64 = 4096;

/// The decoded size the header declares (rows, columns, frames, samples per pixel), checked
/// before any decompression allocates it.
fn check_declared_size(obj: &DefaultDicomObject, name: &str) -> Result<()> {
    let number = |tag: Tag, default: u64| -> u64 {
        text(obj, tag)
            .and_then(|v| v.split('\\').next()?.trim().parse::<u64>().ok())
            .or_else(|| obj.element_opt(tag).ok()??.to_int::<u64>().ok())
            .unwrap_or(default)
    };
    let (rows, cols) = (number(tags::ROWS, 0), number(tags::COLUMNS, 0));
    let frames = number(tags::NUMBER_OF_FRAMES, 1);
    let samples = number(tags::SAMPLES_PER_PIXEL, 1);
    crate::image16::check_size(cols, rows, name)?;
    if frames > MAX_FRAMES || samples > 4 {
        return Err(Error::Image {
            source_name: name.to_string(),
            reason: format!(
                "{frames} frames of {samples} samples per pixel is outside the limits ({MAX_FRAMES} frames, 4 samples)"
            ),
        });
    }
    Ok(())
}

/// Each value of a multi-valued attribute (values separated by `\\`).
pub(crate) fn all_values(obj: &InMemDicomObject, tag: Tag) -> Vec<String> {
    text(obj, tag)
        .map(|v| v.split('\\').map(str::to_string).collect())
        .unwrap_or_default()
}

pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let v = obj
        .element_opt(tag)
        .ok()??
        .to_str()
        .ok()?
        .trim()
        .trim_end_matches('\0')
        .to_string();
    (!v.is_empty()).then_some(v)
}

/// Names of the direct identifiers present with a value.
pub fn identifiers_present(obj: &DefaultDicomObject) -> Vec<&'static str> {
    DIRECT_IDENTIFIERS
        .iter()
        .filter(|(t, _)| text(obj, *t).is_some())
        .map(|(_, n)| *n)
        .collect()
}

fn age_years(obj: &DefaultDicomObject) -> Option<u32> {
    if let Some(a) = text(obj, tags::PATIENT_AGE) {
        let (num, unit) = a.split_at(a.len().saturating_sub(1));
        let n: u32 = num.parse().ok()?;
        return Some(match unit {
            "Y" => n,
            "M" => n / 12,
            "W" => n / 52,
            "D" => n / 365,
            _ => return None,
        });
    }
    let birth = text(obj, tags::PATIENT_BIRTH_DATE)?;
    let study = text(obj, tags::STUDY_DATE).or_else(|| text(obj, tags::ACQUISITION_DATE))?;
    let y = |d: &str| -> Option<(u32, u32)> {
        Some((d.get(0..4)?.parse().ok()?, d.get(4..8)?.parse().ok()?))
    };
    let ((by, bmd), (sy, smd)) = (y(&birth)?, y(&study)?);
    Some(sy.checked_sub(by)? - u32::from(smd < bmd))
}

/// Reads a DICOM file through the `gate`; pseudonyms use `salt`.
pub fn read(path: &Path, gate: Gate, salt: &[u8]) -> Result<DicomImage> {
    read_named(path, &path.display().to_string(), gate, salt)
}

/// Stored values as 16-bit gray: colour by luma, MONOCHROME1 inverted against the largest
/// stored value, shifted by `offset` (signed data) and clamped.
fn stored_gray(values: &[f64], spp: usize, invert_from: Option<f64>, offset: f64) -> Vec<u16> {
    values
        .chunks(spp.max(1))
        .map(|px| {
            let v = if spp >= 3 {
                0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2]
            } else {
                px[0]
            };
            let v = invert_from.map_or(v, |max| max - v);
            (v + offset).round().clamp(0.0, 65535.0) as u16
        })
        .collect()
}

/// Structured Reports and other objects without pixel data (presentation states, key object
/// selections) are told apart before the gate, which would otherwise refuse them for their
/// identifiers.
fn not_an_image(obj: &DefaultDicomObject, name: &str) -> Result<()> {
    let what = if crate::structured_report::is_structured_report(obj) {
        "a Structured Report".to_string()
    } else if [
        tags::PIXEL_DATA,
        tags::FLOAT_PIXEL_DATA,
        tags::DOUBLE_FLOAT_PIXEL_DATA,
    ]
    .iter()
    .all(|&t| obj.element_opt(t).ok().flatten().is_none())
    {
        let modality = text(obj, tags::MODALITY).unwrap_or_else(|| "DICOM".into());
        format!("a {modality} object without pixel data")
    } else {
        return Ok(());
    };
    Err(Error::NotAnImage {
        source_name: name.to_string(),
        what,
    })
}

/// The gate: burned-in text refused, pixels at risk refused unless accepted, identified files
/// refused unless de-identified.
fn admit(obj: &DefaultDicomObject, name: &str, gate: Gate) -> Result<()> {
    let burned_in = text(obj, tags::BURNED_IN_ANNOTATION);
    if burned_in
        .as_deref()
        .is_some_and(|v| v.eq_ignore_ascii_case("YES"))
    {
        return Err(Error::Image {
            source_name: name.to_string(),
            reason: "BurnedInAnnotation is YES: the pixels themselves carry identifiers; such images are never ingested".into(),
        });
    }
    let risk = pixel_risk(
        text(obj, tags::SOP_CLASS_UID).as_deref(),
        text(obj, tags::MODALITY).as_deref(),
        burned_in.as_deref(),
    );
    if let Some(reason) = risk.filter(|_| !gate.accept_burned_in_risk) {
        return Err(Error::PixelRisk {
            source_name: name.to_string(),
            reason,
        });
    }
    let found = identifiers_present(obj);
    if !found.is_empty() && !gate.deidentify {
        return Err(Error::Identified {
            path: name.to_string(),
            tags: found.join(", "),
        });
    }
    Ok(())
}

/// The metadata a file's header gives its samples: size, rescale, acquisition and subgroup
/// fields, pseudonyms instead of identifiers.
fn header_meta(
    obj: &DefaultDicomObject,
    (w, h): (u32, u32),
    (slope, intercept): (f64, f64),
    salt: &[u8],
) -> SampleMeta {
    SampleMeta {
        width: w,
        height: h,
        rescale_slope: slope,
        rescale_intercept: intercept,
        modality: text(obj, tags::MODALITY),
        body_part: text(obj, tags::BODY_PART_EXAMINED),
        view: text(obj, tags::VIEW_POSITION),
        sex: text(obj, tags::PATIENT_SEX),
        age_band: age_years(obj).map(|a| age_band(a).to_string()),
        manufacturer: text(obj, tags::MANUFACTURER),
        scanner_model: text(obj, tags::MANUFACTURER_MODEL_NAME),
        site: None,
        patient: text(obj, tags::PATIENT_ID).map(|p| pseudonym(salt, &p)),
        study: text(obj, tags::STUDY_INSTANCE_UID).map(|s| pseudonym(salt, &s)),
        frame: None,
        labels: Default::default(),
    }
}

/// [`read`], naming the file `name` in errors (ingest names it by its pseudonymous source id:
/// paths often carry names and record numbers).
pub fn read_named(path: &Path, name: &str, gate: Gate, salt: &[u8]) -> Result<DicomImage> {
    let name = name.to_string();
    let img_err = |reason: String| Error::Image {
        source_name: name.clone(),
        reason,
    };
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size > MAX_FILE_BYTES {
        return Err(img_err(format!(
            "{size} bytes is more than the limit of {MAX_FILE_BYTES} for one DICOM file"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| img_err(format!("unreadable: {e}")))?;
    crate::dicom_lengths::check(&bytes).map_err(|why| img_err(format!("malformed: {why}")))?;
    drop(bytes);
    // The standard layout only (preamble, then `DICM`): the length walk above checked that one;
    // the parser's guess at other layouts would read what the walk did not.
    // No single value is larger than the file: a reservation beyond it is refused (where the
    // binary installs `alloc_cap::Capped`), whatever layout the parser believes it reads.
    let cap = (size as usize).saturating_mul(2).max(1 << 20);
    let obj = crate::alloc_cap::with_cap(cap, || {
        dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .open_file(path)
    })
    .map_err(|e| img_err(format!("not a readable DICOM file: {e}")))?;
    not_an_image(&obj, &name)?;
    admit(&obj, &name, gate)?;
    check_declared_size(&obj, &name)?;

    let pd = obj
        .decode_pixel_data()
        .map_err(|e| img_err(format!("pixel data: {e}")))?;
    let (w, h) = (pd.columns(), pd.rows());
    let spp = pd.samples_per_pixel() as usize;
    let rescale = pd.rescale().ok().and_then(|r| r.first().copied());
    let (slope, intercept) = rescale
        .map(|r| (r.slope, r.intercept))
        .unwrap_or((1.0, 0.0));
    let signed = matches!(pd.pixel_representation(), PixelRepresentation::Signed);
    let max_stored = ((1u32 << pd.bits_stored().min(16)) - 1) as f64;
    let invert = matches!(
        pd.photometric_interpretation(),
        PhotometricInterpretation::Monochrome1
    );
    // Stored values go into the PNG unchanged where possible; signed values are shifted into the
    // unsigned range and the intercept compensates, so physical = stored × slope + intercept holds.
    let offset = if signed { 32768.0 } else { 0.0 };
    let raw = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
    let mut frames = Vec::new();
    for f in 0..pd.number_of_frames() {
        let values: Vec<f64> = pd
            .to_vec_frame_with_options(f, &raw)
            .map_err(|e| img_err(format!("frame {f}: {e}")))?;
        let pixels = stored_gray(&values, spp, invert.then_some(max_stored), offset);
        if pixels.len() != (w * h) as usize {
            return Err(img_err(format!(
                "frame {f} has {} pixels, expected {w}x{h}",
                pixels.len()
            )));
        }
        frames.push(Image16 {
            width: w,
            height: h,
            pixels,
        });
    }
    let meta = header_meta(&obj, (w, h), (slope, intercept - offset * slope), salt);
    Ok(DicomImage {
        frames,
        meta,
        identifiers: report_context(&obj, salt),
        study_uid: text(&obj, tags::STUDY_INSTANCE_UID),
        instance_uid: text(&obj, tags::SOP_INSTANCE_UID),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_the_preamble_is_refused_not_guessed_at() {
        // Found by `make fuzz`: `DICM` at byte 0. Guessing that layout, the parser read an
        // element the length walk (which reads the standard layout) never saw, and reserved
        // 1.1 GiB.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("found.dcm");
        std::fs::write(
            &path,
            include_bytes!("../testdata/fuzz-oom-no-preamble.dcm"),
        )
        .unwrap();
        let gate = Gate {
            deidentify: true,
            accept_burned_in_risk: true,
        };
        let e = read_named(&path, "found", gate, b"salt")
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("not a readable DICOM file"), "{e}");
    }

    #[test]
    fn images_that_often_carry_burned_in_text_need_an_explicit_no() {
        let sc = Some("1.2.840.10008.5.1.4.1.1.7");
        let cr = Some("1.2.840.10008.5.1.4.1.1.1");
        let table = [
            (sc, Some("OT"), None, Some("SOP class Secondary Capture")),
            (sc, None, Some("NO"), None),
            (cr, Some("CR"), None, None),
            (None, Some("US"), None, Some("modality US")),
            (
                Some("1.2.840.10008.5.1.4.1.1.6.1"),
                Some("US"),
                Some(""),
                Some("Ultrasound Image"),
            ),
            (None, Some("CT"), None, None),
        ];
        for (class, modality, burned_in, want) in table {
            let got = pixel_risk(class, modality, burned_in);
            match want {
                None => assert_eq!(got, None, "{class:?} {modality:?}"),
                Some(w) => assert!(got.as_deref().is_some_and(|g| g.contains(w)), "{got:?}"),
            }
        }
    }
}
