//! Reports from DICOM Structured Reports.
//!
//! A hospital keeps the radiologist's report as an SR object in the same study as the images,
//! not as a text file beside them; an export from a PACS holds both. This module reads an SR's
//! content tree into plain text, says which images it describes, and picks one report per image
//! when a study has several (a preliminary read and its verified final, an amendment). Ingest
//! then de-identifies the text exactly as it does a side-file report, with the identifiers of
//! both headers.
//!
//! Matching: an SR describes the images of its Study Instance UID; when its evidence
//! (Current Requested Procedure Evidence or Pertinent Other Evidence) lists SOP instances, only
//! those. Among the SRs that describe an image the best one wins: verified before unverified,
//! complete before partial, final before preliminary, then the latest content date and time.
//! Two best SRs with different texts make the image's report ambiguous, and the image is
//! refused rather than given either.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, Tag};

use crate::dicom::{all_values, text};
use crate::report_deid::Context;
use crate::{Error, Result};

/// Largest Structured Report read (the text it yields is bounded by
/// [`crate::shard::MAX_REPORT_BYTES`]).
pub const MAX_SR_BYTES: u64 = 16 << 20;

/// SOP classes of Structured Reports start with this root (Basic Text, Enhanced, Comprehensive,
/// Comprehensive 3D, Extensible SR, and the template-specific classes).
const SR_SOP_CLASS_ROOT: &str = "1.2.840.10008.5.1.4.1.1.88.";

const CONTENT_SEQUENCE: Tag = Tag(0x0040, 0xA730);
const VALUE_TYPE: Tag = Tag(0x0040, 0xA040);
const CONCEPT_NAME: Tag = Tag(0x0040, 0xA043);
const CONCEPT_CODE: Tag = Tag(0x0040, 0xA168);
const TEXT_VALUE: Tag = Tag(0x0040, 0xA160);
const PERSON_NAME: Tag = Tag(0x0040, 0xA123);
const MEASURED_VALUE: Tag = Tag(0x0040, 0xA300);
const NUMERIC_VALUE: Tag = Tag(0x0040, 0xA30A);
const UNITS: Tag = Tag(0x0040, 0x08EA);
const CODE_MEANING: Tag = Tag(0x0008, 0x0104);
const CODE_VALUE: Tag = Tag(0x0008, 0x0100);
const VERIFYING_OBSERVER: Tag = Tag(0x0040, 0xA073);
const VERIFYING_OBSERVER_NAME: Tag = Tag(0x0040, 0xA075);
const VERIFYING_ORGANIZATION: Tag = Tag(0x0040, 0xA027);
const AUTHOR_OBSERVER: Tag = Tag(0x0040, 0xA078);
const PARTICIPANT: Tag = Tag(0x0040, 0xA07A);
const CURRENT_EVIDENCE: Tag = Tag(0x0040, 0xA375);
const OTHER_EVIDENCE: Tag = Tag(0x0040, 0xA385);
const REFERENCED_SERIES: Tag = Tag(0x0008, 0x1115);
const REFERENCED_SOP: Tag = Tag(0x0008, 0x1199);
const REFERENCED_SOP_INSTANCE: Tag = Tag(0x0008, 0x1155);
const COMPLETION_FLAG: Tag = Tag(0x0040, 0xA491);
const VERIFICATION_FLAG: Tag = Tag(0x0040, 0xA493);
const PRELIMINARY_FLAG: Tag = Tag(0x0040, 0xA496);
const CONTENT_DATE: Tag = Tag(0x0008, 0x0023);
const CONTENT_TIME: Tag = Tag(0x0008, 0x0033);

/// How final an SR says it is; the derived order ranks SRs of one image (best last).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finality {
    /// Verification Flag `VERIFIED`.
    pub verified: bool,
    /// Completion Flag `COMPLETE`.
    pub complete: bool,
    /// Preliminary Flag not `PRELIMINARY`.
    pub is_final: bool,
    /// Content Date and Time as written (`YYYYMMDDHHMMSS.FFFFFF`, compared as text).
    pub content_datetime: String,
}

/// One Structured Report read into text, with what it describes.
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredReport {
    /// The SR's own SOP Instance UID.
    pub instance_uid: String,
    /// The study whose images it describes.
    pub study_uid: String,
    /// The SOP instances its evidence lists; empty: every image of the study.
    pub evidence: BTreeSet<String>,
    /// The report text: section headings, text, coded and numeric findings, in tree order.
    pub text: String,
    /// Names, identifiers and institutions the SR carries (header, observers, person-name
    /// items), for removing them from the text; never written.
    pub identifiers: Context,
    /// How final it is.
    pub finality: Finality,
}

/// The Structured Reports of an ingest, by study.
#[derive(Debug, Clone, Default)]
pub struct ReportIndex {
    by_study: BTreeMap<String, Vec<StructuredReport>>,
}

/// No Structured Report, one, or several best ones that disagree.
#[derive(Debug, PartialEq)]
pub enum Match<'a> {
    /// No SR describes the image.
    None,
    /// The best SR that describes it.
    One(&'a StructuredReport),
    /// This many equally final SRs with different texts describe it.
    Ambiguous(usize),
}

impl ReportIndex {
    /// Adds one SR.
    pub fn add(&mut self, report: StructuredReport) {
        self.by_study
            .entry(report.study_uid.clone())
            .or_default()
            .push(report);
    }

    /// Number of SRs held.
    pub fn len(&self) -> usize {
        self.by_study.values().map(Vec::len).sum()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.by_study.is_empty()
    }

    /// The report of the image `instance_uid` of study `study_uid`.
    pub fn for_image(&self, study_uid: &str, instance_uid: Option<&str>) -> Match<'_> {
        let describes = |r: &&StructuredReport| {
            r.evidence.is_empty() || instance_uid.is_some_and(|i| r.evidence.contains(i))
        };
        let candidates: Vec<&StructuredReport> = self
            .by_study
            .get(study_uid)
            .map(|v| v.iter().filter(describes).collect())
            .unwrap_or_default();
        let Some(best) = candidates.iter().map(|r| &r.finality).max() else {
            return Match::None;
        };
        let top: Vec<&StructuredReport> = candidates
            .into_iter()
            .filter(|r| &r.finality == best)
            .collect();
        let texts: BTreeSet<&str> = top.iter().map(|r| r.text.as_str()).collect();
        if texts.len() > 1 {
            return Match::Ambiguous(top.len());
        }
        Match::One(top[0])
    }
}

/// Whether a DICOM object is a Structured Report (by SOP class, else by modality `SR`).
pub fn is_structured_report(obj: &InMemDicomObject) -> bool {
    match text(obj, tags::SOP_CLASS_UID) {
        Some(class) => class.starts_with(SR_SOP_CLASS_ROOT),
        None => text(obj, tags::MODALITY).is_some_and(|m| m == "SR"),
    }
}

/// Reads the file as a Structured Report, naming it `name` in errors. `Ok(None)`: a DICOM
/// object of another kind (an image beside the reports). Files that are not DICOM at all, SRs
/// over [`MAX_SR_BYTES`] and SRs without a study or content are errors.
pub fn read(path: &Path, name: &str) -> Result<Option<StructuredReport>> {
    let bad = |reason: String| Error::StructuredReport {
        source_name: name.to_string(),
        reason,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| bad(format!("unreadable: {e}")))?
        .len();
    if size <= MAX_SR_BYTES {
        let bytes = std::fs::read(path).map_err(|e| bad(format!("unreadable: {e}")))?;
        crate::dicom_lengths::check(&bytes).map_err(|why| bad(format!("malformed: {why}")))?;
    }
    let cap = (size.min(MAX_SR_BYTES) as usize)
        .saturating_mul(2)
        .max(1 << 20);
    // Everything before the pixel data: all of an SR, the header of an image.
    let obj = crate::alloc_cap::with_cap(cap, || {
        dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
    })
    .map_err(|e| bad(format!("not a readable DICOM file: {e}")))?;
    if !is_structured_report(&obj) {
        return Ok(None);
    }
    if size > MAX_SR_BYTES {
        return Err(bad(format!(
            "a Structured Report of {size} bytes is more than the limit of {MAX_SR_BYTES}"
        )));
    }
    from_object(&obj).map(Some).map_err(bad)
}

/// The report an SR object holds, or why it holds none.
pub fn from_object(obj: &InMemDicomObject) -> Result<StructuredReport, String> {
    let study_uid = text(obj, tags::STUDY_INSTANCE_UID)
        .ok_or("a Structured Report without a StudyInstanceUID describes no images")?;
    let mut render = Render::default();
    render.items(obj, 0)?;
    let names = std::mem::take(&mut render.names);
    let body = render.finish();
    if body.is_empty() {
        return Err("its content tree holds no text, code or measurement".into());
    }
    let mut identifiers = crate::dicom::report_identifiers(obj);
    identifiers.names.extend(names);
    identifiers.names.extend(observer_names(obj));
    for v in sequence(obj, VERIFYING_OBSERVER) {
        identifiers
            .institutions
            .extend(all_values(v, VERIFYING_ORGANIZATION));
    }
    for p in sequence(obj, AUTHOR_OBSERVER) {
        identifiers
            .institutions
            .extend(all_values(p, tags::INSTITUTION_NAME));
    }
    Ok(StructuredReport {
        instance_uid: text(obj, tags::SOP_INSTANCE_UID).unwrap_or_default(),
        study_uid,
        evidence: evidence(obj),
        text: body,
        identifiers,
        finality: Finality {
            verified: flag(obj, VERIFICATION_FLAG, "VERIFIED"),
            complete: flag(obj, COMPLETION_FLAG, "COMPLETE"),
            is_final: !flag(obj, PRELIMINARY_FLAG, "PRELIMINARY"),
            content_datetime: format!(
                "{}{}",
                text(obj, CONTENT_DATE).unwrap_or_default(),
                text(obj, CONTENT_TIME).unwrap_or_default()
            ),
        },
    })
}

/// Deepest content tree read (the file's own nesting is bounded earlier by
/// [`crate::dicom_lengths::MAX_DEPTH`]).
const MAX_TREE_DEPTH: usize = 64;

/// The content tree as text: a container's heading on its own line, then its items.
#[derive(Default)]
struct Render {
    lines: Vec<String>,
    line: Vec<String>,
    bytes: usize,
    names: Vec<String>,
}

impl Render {
    fn items(&mut self, parent: &InMemDicomObject, depth: usize) -> Result<(), String> {
        if depth > MAX_TREE_DEPTH {
            return Err(format!("its content tree is deeper than {MAX_TREE_DEPTH}"));
        }
        for item in sequence(parent, CONTENT_SEQUENCE) {
            self.item(item, depth)?;
        }
        Ok(())
    }

    fn item(&mut self, item: &InMemDicomObject, depth: usize) -> Result<(), String> {
        let concept = code_meaning(item, CONCEPT_NAME);
        // Items by reference carry no value type and repeat content given elsewhere.
        match text(item, VALUE_TYPE).as_deref() {
            Some("CONTAINER") => {
                self.break_line();
                if let Some(heading) = concept {
                    self.push(format!("{heading}:"))?;
                }
            }
            Some("TEXT") => {
                if let Some(t) = text(item, TEXT_VALUE) {
                    self.push(t.split_whitespace().collect::<Vec<_>>().join(" "))?;
                }
            }
            Some("CODE") => {
                if let Some(value) = code_meaning(item, CONCEPT_CODE) {
                    self.push(labelled(concept, value))?;
                }
            }
            Some("NUM") => {
                if let Some(value) = measurement(item) {
                    self.push(labelled(concept, value))?;
                }
            }
            Some("PNAME") => self.names.extend(all_values(item, PERSON_NAME)),
            _ => {}
        }
        self.items(item, depth + 1)
    }

    fn push(&mut self, part: String) -> Result<(), String> {
        self.bytes += part.len() + 1;
        if self.bytes > crate::shard::MAX_REPORT_BYTES {
            return Err(format!(
                "its text is longer than the limit of {} bytes",
                crate::shard::MAX_REPORT_BYTES
            ));
        }
        if !part.is_empty() {
            self.line.push(part);
        }
        Ok(())
    }

    fn break_line(&mut self) {
        if !self.line.is_empty() {
            self.lines.push(std::mem::take(&mut self.line).join(" "));
        }
    }

    fn finish(mut self) -> String {
        self.break_line();
        self.lines.join("\n")
    }
}

fn labelled(concept: Option<String>, value: String) -> String {
    match concept {
        Some(c) => format!("{c}: {value}."),
        None => format!("{value}."),
    }
}

/// A NUM item's value with its units' code (UCUM, such as `mm`).
fn measurement(item: &InMemDicomObject) -> Option<String> {
    let measured = sequence(item, MEASURED_VALUE).first()?;
    let value = text(measured, NUMERIC_VALUE)?;
    match sequence(measured, UNITS)
        .first()
        .and_then(|u| text(u, CODE_VALUE))
    {
        Some(units) if units != "1" => Some(format!("{value} {units}")),
        _ => Some(value),
    }
}

fn code_meaning(item: &InMemDicomObject, sequence_tag: Tag) -> Option<String> {
    text(sequence(item, sequence_tag).first()?, CODE_MEANING)
}

/// Names of the verifying, authoring and participating observers.
fn observer_names(obj: &InMemDicomObject) -> Vec<String> {
    let mut names = Vec::new();
    for v in sequence(obj, VERIFYING_OBSERVER) {
        names.extend(all_values(v, VERIFYING_OBSERVER_NAME));
    }
    for seq in [AUTHOR_OBSERVER, PARTICIPANT] {
        for p in sequence(obj, seq) {
            names.extend(all_values(p, PERSON_NAME));
        }
    }
    names
}

/// The SOP instances listed as evidence.
fn evidence(obj: &InMemDicomObject) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for seq in [CURRENT_EVIDENCE, OTHER_EVIDENCE] {
        for study in sequence(obj, seq) {
            for series in sequence(study, REFERENCED_SERIES) {
                for sop in sequence(series, REFERENCED_SOP) {
                    out.extend(text(sop, REFERENCED_SOP_INSTANCE));
                }
            }
        }
    }
    out
}

fn flag(obj: &InMemDicomObject, tag: Tag, value: &str) -> bool {
    text(obj, tag).is_some_and(|v| v.eq_ignore_ascii_case(value))
}

fn sequence(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR, value::DataSetSequence};

    fn el(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, vr, PrimitiveValue::from(v))
    }

    fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
    }

    fn code(tag: Tag, meaning: &str) -> DataElement<InMemDicomObject> {
        seq(
            tag,
            vec![InMemDicomObject::from_element_iter([el(
                CODE_MEANING,
                VR::LO,
                meaning,
            )])],
        )
    }

    fn item(
        value_type: &str,
        concept: &str,
        mut rest: Vec<DataElement<InMemDicomObject>>,
    ) -> InMemDicomObject {
        rest.push(el(VALUE_TYPE, VR::CS, value_type));
        rest.push(code(CONCEPT_NAME, concept));
        InMemDicomObject::from_element_iter(rest)
    }

    fn text_item(concept: &str, value: &str) -> InMemDicomObject {
        item("TEXT", concept, vec![el(TEXT_VALUE, VR::UT, value)])
    }

    fn container(concept: &str, children: Vec<InMemDicomObject>) -> InMemDicomObject {
        item("CONTAINER", concept, vec![seq(CONTENT_SEQUENCE, children)])
    }

    /// A Basic Diagnostic Imaging Report (TID 2000) of study `1.2.3`.
    fn report(children: Vec<InMemDicomObject>, flags: [&str; 3], when: &str) -> InMemDicomObject {
        let mut root = container("Imaging Report", children);
        for e in [
            el(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.88.11"),
            el(tags::SOP_INSTANCE_UID, VR::UI, &format!("9.{when}")),
            el(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
            el(tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
            el(COMPLETION_FLAG, VR::CS, flags[0]),
            el(VERIFICATION_FLAG, VR::CS, flags[1]),
            el(PRELIMINARY_FLAG, VR::CS, flags[2]),
            el(CONTENT_DATE, VR::DA, &when[..8]),
            el(CONTENT_TIME, VR::TM, &when[8..]),
        ] {
            root.put(e);
        }
        root
    }

    fn findings(text: &str) -> Vec<InMemDicomObject> {
        vec![container("Findings", vec![text_item("Finding", text)])]
    }

    const FINAL: [&str; 3] = ["COMPLETE", "VERIFIED", "FINAL"];

    #[test]
    fn the_content_tree_reads_as_headed_sections_with_codes_and_measurements() {
        let size = item(
            "NUM",
            "Diameter",
            vec![seq(
                MEASURED_VALUE,
                vec![InMemDicomObject::from_element_iter([
                    el(NUMERIC_VALUE, VR::DS, "6"),
                    seq(
                        UNITS,
                        vec![InMemDicomObject::from_element_iter([el(
                            CODE_VALUE,
                            VR::SH,
                            "mm",
                        )])],
                    ),
                ])],
            )],
        );
        let finding = item(
            "CODE",
            "Finding",
            vec![
                code(CONCEPT_CODE, "Nodule"),
                seq(CONTENT_SEQUENCE, vec![size]),
            ],
        );
        let reader = item(
            "PNAME",
            "Recording Observer",
            vec![el(PERSON_NAME, VR::PN, "Grey^Meredith")],
        );
        let sr = report(
            vec![
                container(
                    "Findings",
                    vec![
                        text_item("Finding", "A  nodule\r\nin the right upper lobe."),
                        finding,
                    ],
                ),
                container(
                    "Impressions",
                    vec![text_item("Impression", "Likely benign.")],
                ),
                reader,
                // A by-reference item has no value type and adds nothing.
                InMemDicomObject::from_element_iter([el(TEXT_VALUE, VR::UT, "repeated")]),
            ],
            FINAL,
            "20240101120000",
        );
        let r = from_object(&sr).unwrap();
        assert_eq!(
            r.text,
            "Findings: A nodule in the right upper lobe. Finding: Nodule. Diameter: 6 mm.\n\
             Impressions: Likely benign."
        );
        assert!(r.identifiers.names.contains(&"Grey^Meredith".to_string()));
        assert!(r.identifiers.names.contains(&"Doe^Jane".to_string()));
        assert_eq!(r.study_uid, "1.2.3");
        assert!(r.evidence.is_empty());
    }

    #[test]
    fn an_sr_without_study_or_content_is_refused_with_the_reason() {
        let mut no_study = report(findings("x"), FINAL, "20240101120000");
        no_study.remove_element(tags::STUDY_INSTANCE_UID);
        assert!(
            from_object(&no_study)
                .unwrap_err()
                .contains("StudyInstanceUID")
        );
        let empty = report(vec![], FINAL, "20240101120000");
        assert!(from_object(&empty).unwrap_err().contains("holds no text"));
    }

    #[test]
    fn text_beyond_the_report_limit_is_refused() {
        let long = "word ".repeat(crate::shard::MAX_REPORT_BYTES / 5 + 10);
        let sr = report(findings(&long), FINAL, "20240101120000");
        assert!(
            from_object(&sr)
                .unwrap_err()
                .contains("longer than the limit")
        );
    }

    #[test]
    fn the_verified_final_report_wins_over_a_later_preliminary_one() {
        let mut index = ReportIndex::default();
        let prelim = ["PARTIAL", "UNVERIFIED", "PRELIMINARY"];
        index.add(from_object(&report(findings("prelim"), prelim, "20240102090000")).unwrap());
        index.add(from_object(&report(findings("final"), FINAL, "20240101120000")).unwrap());
        let Match::One(r) = index.for_image("1.2.3", Some("7")) else {
            panic!("one report");
        };
        assert!(r.text.ends_with("final"), "{}", r.text);
        // An amendment: equally final and later.
        index.add(from_object(&report(findings("amended"), FINAL, "20240103080000")).unwrap());
        let Match::One(r) = index.for_image("1.2.3", Some("7")) else {
            panic!("one report");
        };
        assert!(r.text.ends_with("amended"), "{}", r.text);
        assert_eq!(index.for_image("4.5.6", Some("7")), Match::None);
    }

    #[test]
    fn two_equally_final_reports_that_disagree_make_the_image_ambiguous() {
        let mut index = ReportIndex::default();
        index.add(from_object(&report(findings("one"), FINAL, "20240101120000")).unwrap());
        index.add(from_object(&report(findings("two"), FINAL, "20240101120000")).unwrap());
        assert_eq!(index.for_image("1.2.3", None), Match::Ambiguous(2));
        // The same text stored twice is one report.
        let mut index = ReportIndex::default();
        for _ in 0..2 {
            index.add(from_object(&report(findings("one"), FINAL, "20240101120000")).unwrap());
        }
        assert!(matches!(index.for_image("1.2.3", None), Match::One(_)));
    }

    #[test]
    fn evidence_limits_a_report_to_the_images_it_lists() {
        let mut sr = report(findings("left"), FINAL, "20240101120000");
        let sop = InMemDicomObject::from_element_iter([el(REFERENCED_SOP_INSTANCE, VR::UI, "7")]);
        let series = InMemDicomObject::from_element_iter([seq(REFERENCED_SOP, vec![sop])]);
        let study = InMemDicomObject::from_element_iter([seq(REFERENCED_SERIES, vec![series])]);
        sr.put(seq(CURRENT_EVIDENCE, vec![study]));
        let mut index = ReportIndex::default();
        index.add(from_object(&sr).unwrap());
        assert!(matches!(index.for_image("1.2.3", Some("7")), Match::One(_)));
        assert_eq!(index.for_image("1.2.3", Some("8")), Match::None);
        assert_eq!(index.for_image("1.2.3", None), Match::None);
    }

    #[test]
    fn structured_reports_are_told_from_images_by_sop_class_or_modality() {
        let sr = report(findings("x"), FINAL, "20240101120000");
        assert!(is_structured_report(&sr));
        let ct = InMemDicomObject::from_element_iter([el(
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.2",
        )]);
        assert!(!is_structured_report(&ct));
        let by_modality = InMemDicomObject::from_element_iter([el(tags::MODALITY, VR::CS, "SR")]);
        assert!(is_structured_report(&by_modality));
    }
}
