//! De-identification of free-text radiology reports before anything is written.
//!
//! Report text is the riskiest data in the pipeline: a dictated report carries the patient's and
//! the physicians' names, dates, record and accession numbers, phone numbers, addresses, ages and
//! the hospital's name, in no fixed place. The method here, [`METHOD`], is rules plus context,
//! in the style of the rule-based scrubbers used for clinical notes (Philter, the MIT deid
//! package):
//!
//! 1. **Context**: every identifier the structured data knows about the case (the DICOM header
//!    or the side file: patient and physician names, patient id, accession number, institution)
//!    is removed wherever it appears, case-insensitively; names also token by token.
//! 2. **Patterns**: e-mail addresses and URLs, phone numbers, dates in numeric and written
//!    forms, labelled and long record numbers, street addresses and postcodes, ages over 89,
//!    institution names by their form (`St Mary's Hospital`), and names after a title or a
//!    label (`Dr. …`, `Patient: …`, `signed by …`).
//! 3. **Dates are shifted**, not removed: every date moves back by the patient's own number of
//!    days ([`date_shift_days`], from a keyed hash of the patient), so intervals between a
//!    patient's studies survive and no true date does.
//! 4. **Doubts**: what is left is scanned for what could still identify (a run of five or more
//!    digits, an `@`, a title not followed by a placeholder, a date-like text that is not a
//!    valid date). A report with doubts is flagged, and ingest refuses it unless told otherwise;
//!    a doubt names its kind and position, never the text.
//!
//! Known limits, in the wild: a name without a title, label or structured source ("spoke with
//! Smith") is missed unless the context lists it; rare date forms ("the ides of March"), and
//! identifiers spelled out in words ("M R N one two three") are not recognised; free-text
//! geography ("lives near the harbour") is not an address pattern. These are why the context
//! matters and why the doubt scan exists.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::{Captures, Regex};
use serde::Serialize;

/// The method this code applies, recorded beside every report it scrubs.
pub const METHOD: &str = "rules+context/v1";

/// What kind of identifier was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// A person's name.
    Name,
    /// A calendar date (shifted).
    Date,
    /// A record, accession or other identifying number.
    RecordNumber,
    /// A phone or fax number.
    Phone,
    /// A street address or postcode.
    Address,
    /// An age over 89.
    Age,
    /// A hospital or clinic.
    Institution,
    /// An e-mail address or URL.
    Contact,
}

impl Kind {
    /// The placeholder that replaces it (dates are shifted instead).
    pub fn placeholder(self) -> &'static str {
        match self {
            Kind::Name => "[NAME]",
            Kind::Date => "[DATE]",
            Kind::RecordNumber => "[ID]",
            Kind::Phone => "[PHONE]",
            Kind::Address => "[ADDRESS]",
            Kind::Age => "[AGE 90+]",
            Kind::Institution => "[INSTITUTION]",
            Kind::Contact => "[CONTACT]",
        }
    }
}

/// What the structured data knows about the report's case.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// Names of the patient and of the physicians (each also removed token by token).
    pub names: Vec<String>,
    /// Patient id, accession numbers, other identifiers.
    pub identifiers: Vec<String>,
    /// Institution names.
    pub institutions: Vec<String>,
    /// Days every date of this patient moves back ([`date_shift_days`]).
    pub date_shift_days: i64,
}

/// Something left in a scrubbed report that could still identify the patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Doubt {
    /// What it may be.
    pub kind: Kind,
    /// Byte offset in the scrubbed text.
    pub at: usize,
    /// Why it is doubtful (never the text itself).
    pub reason: &'static str,
}

/// A scrubbed report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scrubbed {
    /// The text, identifiers replaced and dates shifted.
    pub text: String,
    /// How many of each kind were removed.
    pub removed: BTreeMap<Kind, usize>,
    /// What may still identify.
    pub doubts: Vec<Doubt>,
}

/// The patient's date shift: 1 to 365 days back, from a keyed hash of the patient id, so that
/// every report of one patient moves by the same amount and nobody without the salt can undo it.
pub fn date_shift_days(salt: &[u8], patient: &str) -> i64 {
    let h = crate::meta::pseudonym(salt, &format!("date-shift:{patient}"));
    let n = u64::from_str_radix(&h[..8], 16).expect("hex");
    1 + (n % 365) as i64
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static pattern")
}

const MONTHS: &str = "(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)";

static CONTACT: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b|\b(?:https?://|www\.)\S+"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,5}\)[\s.-]?|\b\d{2,5}[\s.-])\d{3,4}[\s.-]\d{3,4}\b|(?i)\b(?:tel|phone|fax|pager|ext)\.?:?\s*#?\s*\d[\d\s.-]{2,}\d\b",
    )
});
static DATE_ISO: LazyLock<Regex> = LazyLock::new(|| re(r"\b(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})\b"));
static DATE_DMY: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b(\d{1,2})([/.-])(\d{1,2})[/.-](\d{4}|\d{2})\b"));
static DATE_WRITTEN: LazyLock<Regex> = LazyLock::new(|| {
    re(&format!(
        r"(?i)\b(?:(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?({MONTHS})\.?,?\s+(\d{{4}})|({MONTHS})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}}))\b"
    ))
});
static LABELLED_NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:mrn|mr\s?#|medical record(?:\s+(?:number|no\.?))?|record\s+(?:number|no\.?)|acc(?:ession)?(?:\s+(?:number|no\.?))?|acc#|patient\s+id|pid|nhs(?:\s+(?:number|no\.?))?|ssn|insurance(?:\s+(?:number|no\.?))?|case\s+(?:number|no\.?)|study\s+id|order\s+(?:number|no\.?))\s*[:#]?\s*([A-Z0-9][A-Z0-9-]{2,})",
    )
});
static LONG_NUMBER: LazyLock<Regex> =
    LazyLock::new(|| re(r"\b[A-Z]{0,3}\d{6,}[A-Z]?\b|\b\d{3}-\d{2}-\d{4}\b"));
static ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Terrace|Close|Crescent|Square)\b\.?(?:,?\s+(?:Apt|Suite|Unit|Flat)\.?\s*\w+)?|\b[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}\b|(?i:\bzip(?:\s*code)?:?\s*)\d{5}(?:-\d{4})?\b|\b[A-Z][a-z]+,\s+[A-Z]{2}\s+\d{5}(?:-\d{4})?\b",
    )
});
static AGE: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i)\b(?:(?:aged?|age:)\s*(\d{2,3})\b(?:\s*(?:years?|yrs?|y/?o)(?:\s*old)?)?|(\d{2,3})[\s-]*(?:years?|yrs?|y/?o)(?:[\s-]*old)?\b)",
    )
});
static INSTITUTION: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b(?:(?:St\.?|Saint)\s+)?(?:[A-Z][a-z']+\s+){1,4}(?:General\s+|University\s+|Memorial\s+|Children's\s+|Community\s+)?(?:Hospital|Medical Cent(?:er|re)|Clinic|Infirmary|Health(?:care)?\s+(?:System|Trust)|Imaging Cent(?:er|re))\b",
    )
});
static TITLED_NAME: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof|Doctor)\b\.?\s+((?:[A-Z]\.\s*)*[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+)?)",
    )
});
static LABELLED_NAME: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"(?i:\b(?:(?:patient(?:\s+name)?|name|referring(?:\s+physician)?|physician|radiologist|attending|signed|cc)\s*:|(?:signed|dictated|read|reported|transcribed|reviewed)\s+by\s*:?)\s*)((?:[A-Z][a-zA-Z'-]+,?\s+){0,3}[A-Z][a-zA-Z'-]+)",
    )
});
static DATE_MONTH_YEAR: LazyLock<Regex> =
    LazyLock::new(|| re(&format!(r"(?i)\b({MONTHS})\.?,?\s+(\d{{4}})\b")));

/// Replaces every match of `pattern` (its group `group`, or the whole match for 0) by `kind`'s
/// placeholder, counting.
fn replace(
    text: &str,
    pattern: &Regex,
    group: usize,
    kind: Kind,
    removed: &mut BTreeMap<Kind, usize>,
) -> String {
    let mut n = 0;
    let out = pattern.replace_all(text, |c: &Captures| {
        let whole = c.get(0).expect("match");
        let Some(g) = c.get(group) else {
            return whole.as_str().to_string();
        };
        n += 1;
        let s = whole.as_str();
        let (a, b) = (g.start() - whole.start(), g.end() - whole.start());
        format!("{}{}{}", &s[..a], kind.placeholder(), &s[b..])
    });
    *removed.entry(kind).or_default() += n;
    out.into_owned()
}

/// Removes every occurrence of a known value, case-insensitively.
fn remove_known(
    text: &str,
    values: &[String],
    kind: Kind,
    removed: &mut BTreeMap<Kind, usize>,
) -> String {
    let mut values: Vec<&str> = values
        .iter()
        .map(|v| v.trim())
        .filter(|v| v.len() >= 2)
        .collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = text.to_string();
    for v in values {
        let edge = |c: Option<char>| {
            if c.is_some_and(char::is_alphanumeric) {
                r"\b"
            } else {
                ""
            }
        };
        let (head, tail) = (edge(v.chars().next()), edge(v.chars().last()));
        let pattern = re(&format!(r"(?i){head}{}{tail}", regex::escape(v)));
        out = replace(&out, &pattern, 0, kind, removed);
    }
    out
}

/// The names' tokens (`Jane A. Doe` → `Jane`, `Doe`; `DOE^JANE` → `DOE`, `JANE`) of 2 letters
/// or more.
fn name_tokens(names: &[String]) -> Vec<String> {
    let mut tokens: Vec<String> = names
        .iter()
        .flat_map(|n| n.split(|c: char| c.is_whitespace() || c == '^' || c == ',' || c == '.'))
        .filter(|t| t.chars().filter(|c| c.is_alphabetic()).count() >= 2)
        .map(str::to_string)
        .collect();
    tokens.extend(names.iter().cloned());
    tokens
}

fn month_number(name: &str) -> Option<i8> {
    let m = name.to_ascii_lowercase();
    let all = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    all.iter()
        .position(|p| m.starts_with(p))
        .map(|i| i as i8 + 1)
}

fn shifted(y: i16, m: i8, d: i8, days: i64) -> Option<String> {
    let date = jiff::civil::Date::new(y, m, d).ok()?;
    let moved = date.checked_sub(jiff::Span::new().days(days)).ok()?;
    Some(moved.to_string())
}

fn year(text: &str) -> Option<i16> {
    let y: i16 = text.parse().ok()?;
    Some(if text.len() == 2 {
        if y < 50 { 2000 + y } else { 1900 + y }
    } else {
        y
    })
}

/// Shifts every recognised date back by the patient's days (ISO form); a date-like text that is
/// not a valid date becomes a placeholder and a doubt.
fn shift_dates(
    text: &str,
    days: i64,
    removed: &mut BTreeMap<Kind, usize>,
    invalid: &mut usize,
) -> String {
    let mut n = 0;
    let mut one = |parsed: Option<String>| {
        n += 1;
        parsed.unwrap_or_else(|| {
            *invalid += 1;
            Kind::Date.placeholder().to_string()
        })
    };
    let out = DATE_ISO.replace_all(text, |c: &Captures| {
        one((|| {
            shifted(
                c[1].parse().ok()?,
                c[2].parse().ok()?,
                c[3].parse().ok()?,
                days,
            )
        })())
    });
    let out = DATE_DMY.replace_all(&out, |c: &Captures| {
        // Day first unless the first number cannot be a day-of-month ordering (US: month first
        // when the second number exceeds 12).
        let (a, b): (i8, i8) = (c[1].parse().unwrap_or(0), c[3].parse().unwrap_or(0));
        let (d, m) = if b > 12 && a <= 12 { (b, a) } else { (a, b) };
        one((|| shifted(year(&c[4])?, m, d, days))())
    });
    let out = DATE_WRITTEN.replace_all(&out, |c: &Captures| {
        let (d, m, y) = match c.get(1) {
            Some(d) => (d.as_str(), &c[2], &c[3]),
            None => (&c[5], &c[4], &c[6]),
        };
        one((|| {
            shifted(year(y)?, month_number(m)?, d.parse().ok()?, days)
        })())
    });
    let out = DATE_MONTH_YEAR.replace_all(&out, |c: &Captures| {
        let moved = (|| shifted(year(&c[2])?, month_number(&c[1])?, 15, days))();
        one(moved.map(|d| d[..7].to_string()))
    });
    *removed.entry(Kind::Date).or_default() += n;
    out.into_owned()
}

/// Ages over 89 become `[AGE 90+]`; younger ages stay.
fn cap_ages(text: &str, removed: &mut BTreeMap<Kind, usize>) -> String {
    let mut n = 0;
    let out = AGE.replace_all(text, |c: &Captures| {
        let age: u32 = c
            .get(1)
            .or(c.get(2))
            .and_then(|m| m.as_str().parse().ok())
            .unwrap_or(0);
        if age > 89 {
            n += 1;
            Kind::Age.placeholder().to_string()
        } else {
            c[0].to_string()
        }
    });
    *removed.entry(Kind::Age).or_default() += n;
    out.into_owned()
}

static DOUBT_DIGITS: LazyLock<Regex> = LazyLock::new(|| re(r"\d{5,}"));
static DOUBT_TITLE: LazyLock<Regex> = LazyLock::new(|| {
    re(r"(?:\b(?:Dr|Mr|Mrs|Ms|Prof)\b\.?|\b(?:dr|mr|mrs|prof|DR|MR|MRS|PROF)\.)\s+[^\[\s]\S*")
});

fn doubts(text: &str, invalid_dates: usize) -> Vec<Doubt> {
    let mut out: Vec<Doubt> = DOUBT_DIGITS
        .find_iter(text)
        .map(|m| Doubt {
            kind: Kind::RecordNumber,
            at: m.start(),
            reason: "a run of five or more digits",
        })
        .collect();
    out.extend(text.match_indices('@').map(|(at, _)| Doubt {
        kind: Kind::Contact,
        at,
        reason: "an @ outside an address form",
    }));
    out.extend(DOUBT_TITLE.find_iter(text).map(|m| Doubt {
        kind: Kind::Name,
        at: m.start(),
        reason: "a title not followed by a recognised name",
    }));
    if invalid_dates > 0 {
        out.extend(
            text.match_indices(Kind::Date.placeholder())
                .map(|(at, _)| Doubt {
                    kind: Kind::Date,
                    at,
                    reason: "a date-like text that is not a valid date",
                }),
        );
    }
    out.sort_by_key(|d| d.at);
    out
}

/// Scrubs one report with what the structured data knows about its case.
pub fn scrub(text: &str, ctx: &Context) -> Scrubbed {
    let mut removed = BTreeMap::new();
    let r = &mut removed;
    let mut t = replace(text, &CONTACT, 0, Kind::Contact, r);
    t = remove_known(&t, &ctx.identifiers, Kind::RecordNumber, r);
    t = remove_known(&t, &ctx.institutions, Kind::Institution, r);
    t = remove_known(&t, &name_tokens(&ctx.names), Kind::Name, r);
    let mut invalid = 0;
    t = shift_dates(&t, ctx.date_shift_days, r, &mut invalid);
    t = replace(&t, &PHONE, 0, Kind::Phone, r);
    t = replace(&t, &LABELLED_NUMBER, 1, Kind::RecordNumber, r);
    t = replace(&t, &ADDRESS, 0, Kind::Address, r);
    t = replace(&t, &LONG_NUMBER, 0, Kind::RecordNumber, r);
    t = cap_ages(&t, r);
    t = replace(&t, &INSTITUTION, 0, Kind::Institution, r);
    t = replace(&t, &TITLED_NAME, 1, Kind::Name, r);
    t = replace(&t, &LABELLED_NAME, 1, Kind::Name, r);
    removed.retain(|_, n| *n > 0);
    Scrubbed {
        doubts: doubts(&t, invalid),
        text: t,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLINICAL: &str = "A 6 mm nodule in the right upper lobe, series 3 image 45. No pleural effusion. Heart size normal.";

    const FIRST: [&str; 6] = ["Jane", "Ahmed", "Maria", "Kenji", "Olga", "Thomas"];
    const LAST: [&str; 6] = [
        "Doe",
        "Karimi",
        "Fernandez",
        "Tanaka",
        "Ivanova",
        "Whitfield",
    ];
    const DOCTORS: [&str; 3] = ["Gregory House", "Lisa Cuddy", "Amara Okafor"];
    const DATES: [&str; 7] = [
        "2024-03-15",
        "15/03/2024",
        "03/15/2024",
        "15.03.2024",
        "March 15, 2024",
        "15th of March 2024",
        "Mar 15 2024",
    ];
    const PHONES: [&str; 5] = [
        "(555) 123-4567",
        "555-867-5309",
        "+44 20 7946 0958",
        "tel: 0207 946 0958",
        "pager 4432",
    ];
    const ADDRESSES: [&str; 4] = [
        "221 Baker Street",
        "12 Elm St., Apt 4B",
        "SW1A 1AA",
        "Springfield, IL 62704",
    ];
    const INSTITUTIONS: [&str; 3] = [
        "St Mary's Hospital",
        "Lakeside General Hospital",
        "Riverside Imaging Center",
    ];
    const CONTACTS: [&str; 2] = ["jane.doe@example.org", "https://portal.example.org/p/991"];

    /// The `i`th record number form and the number itself.
    fn record_number(i: usize) -> (String, String) {
        let mrn = format!("{:07}", 1_234_567 + i * 7919);
        let forms = [
            format!("MRN: {mrn}"),
            format!("Medical record number {mrn}"),
            format!("Acc# A{mrn}"),
            format!("patient id: {mrn}"),
            format!("ref {mrn}"),
        ];
        (forms[i % forms.len()].clone(), mrn)
    }

    /// The `i`th age-over-89 form and the age.
    fn old_age(i: usize) -> (String, String) {
        let forms = [
            (format!("{}-year-old", 90 + i % 15), 90 + i % 15),
            (format!("aged {}", 91 + i % 9), 91 + i % 9),
            (format!("{} yo", 95 + i % 5), 95 + i % 5),
        ];
        let (text, age) = &forms[i % forms.len()];
        (text.clone(), age.to_string())
    }

    /// One report with identifiers of every kind planted in one of several forms (chosen by
    /// `i`); returns the report, its context and every planted value.
    fn planted(i: usize) -> (String, Context, Vec<String>) {
        let (first, last, doctor) = (FIRST[i % 6], LAST[(i / 6) % 6], DOCTORS[i % 3]);
        let (date, phone) = (DATES[i % DATES.len()], PHONES[i % PHONES.len()]);
        let (address, contact) = (ADDRESSES[i % ADDRESSES.len()], CONTACTS[i % CONTACTS.len()]);
        let institution = INSTITUTIONS[i % INSTITUTIONS.len()];
        let ((number, mrn), (age, years)) = (record_number(i), old_age(i));
        let text = format!(
            "Patient: {first} {last}. {number}. Exam date {date}. Address: {address}. Contact {phone} or {contact}.\n\
             History: {age} with cough, referred from {institution} by Dr. {doctor}.\n\
             Findings: {CLINICAL} Compared with the study of March 2023.\n\
             Electronically signed by: {doctor}, MD"
        );
        let ctx = Context {
            names: vec![format!("{last}^{first}"), doctor.to_string()],
            identifiers: vec![mrn.clone()],
            institutions: Vec::new(),
            date_shift_days: 30,
        };
        let mut values: Vec<String> = [first, last, doctor, date, phone, address, institution]
            .iter()
            .chain(&[contact, "March 2023"])
            .map(|v| v.to_string())
            .collect();
        values.extend([mrn, years]);
        values.extend(doctor.split(' ').map(str::to_string));
        (text, ctx, values)
    }

    #[test]
    fn every_planted_identifier_of_every_kind_is_removed_and_the_findings_are_kept() {
        let mut planted_total = 0;
        for i in 0..210 {
            let (text, ctx, values) = planted(i);
            let out = scrub(&text, &ctx);
            let lower = out.text.to_lowercase().replace("[age 90+]", "[age]");
            for v in &values {
                planted_total += 1;
                assert!(
                    !lower.contains(&v.to_lowercase()),
                    "report {i}: {v:?} survived in\n{}",
                    out.text
                );
            }
            assert!(
                out.text.contains(CLINICAL),
                "report {i}: findings changed:\n{}",
                out.text
            );
            assert!(
                out.doubts.is_empty(),
                "report {i}: {:?}\n{}",
                out.doubts,
                out.text
            );
            for kind in [
                Kind::Name,
                Kind::Date,
                Kind::RecordNumber,
                Kind::Phone,
                Kind::Address,
                Kind::Age,
                Kind::Institution,
                Kind::Contact,
            ] {
                assert!(
                    out.removed.get(&kind).copied().unwrap_or(0) > 0,
                    "report {i}: no {kind:?} removed:\n{}",
                    out.text
                );
            }
        }
        assert!(planted_total > 2000);
    }

    #[test]
    fn without_context_the_patterns_alone_still_remove_every_planted_identifier() {
        for i in 0..210 {
            let (text, _, values) = planted(i);
            let ctx = Context {
                date_shift_days: 30,
                ..Context::default()
            };
            let out = scrub(&text, &ctx);
            let lower = out.text.to_lowercase().replace("[age 90+]", "[age]");
            for v in &values {
                assert!(
                    !lower.contains(&v.to_lowercase()),
                    "report {i}: {v:?} survived in\n{}",
                    out.text
                );
            }
        }
    }

    #[test]
    fn dates_move_back_by_the_patients_days_so_intervals_survive() {
        let ctx = Context {
            date_shift_days: 40,
            ..Context::default()
        };
        let out = scrub(
            "CT on 2024-03-15, follow-up on 25/04/2024 and on June 3, 2024.",
            &ctx,
        );
        assert_eq!(
            out.text,
            "CT on 2024-02-04, follow-up on 2024-03-16 and on 2024-04-24."
        );
        assert_eq!(out.removed[&Kind::Date], 3);
        let salt = b"site salt";
        let shift = date_shift_days(salt, "patient-1");
        assert!((1..=365).contains(&shift));
        assert_eq!(
            shift,
            date_shift_days(salt, "patient-1"),
            "the same patient, the same shift"
        );
        assert_ne!(date_shift_days(b"another salt", "patient-1"), 0);
    }

    #[test]
    fn young_ages_measurements_and_years_stay() {
        let text = "54-year-old, 12 mm lesion, T2 hyperintense (TR 500 ms TE 20 ms), stable since 2019, aged 7.";
        let out = scrub(text, &Context::default());
        assert_eq!((out.text.as_str(), out.doubts.len()), (text, 0));
    }

    #[test]
    fn what_the_rules_cannot_place_is_a_doubt_naming_its_kind_never_its_text() {
        let out = scrub(
            "Discussed with dr. smith; results 55501 faxed to Dr. jones at 30/02/2024.",
            &Context::default(),
        );
        let kinds: Vec<Kind> = out.doubts.iter().map(|d| d.kind).collect();
        assert!(kinds.contains(&Kind::RecordNumber), "{out:?}");
        let names = kinds.iter().filter(|k| **k == Kind::Name).count();
        assert_eq!(names, 2, "dr. smith and Dr. jones: {out:?}");
        assert!(
            kinds.contains(&Kind::Date),
            "30 February is not a date: {out:?}"
        );
        let shown = serde_json::to_string(&out.doubts).unwrap();
        assert!(
            !shown.contains("55501") && !shown.contains("jones"),
            "{shown}"
        );
    }
}
