//! End-to-end tests of the data path: `radfm ingest` and `radfm synth` through the CLI, shards
//! read back exactly, the de-identification gate on the DICOM files that ship with pydicom, and
//! the Python `webdataset` library reading our shards unchanged.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::path::Path;
use std::process::{Command, Output};

use radfm_data::index::DatasetIndex;
use radfm_data::shard::ShardReader;
use radfm_data::store::Location;
use radfm_data::{Image16, Sample};
use radfm_e2e::{ok, run_python, workspace_bin};

const SALT: &str = "test-salt-0123456789abcdef";

fn radfm(args: &[&str]) -> Output {
    radfm_e2e::radfm(args, &[("RADFM_PSEUDONYM_SALT", SALT)])
}

async fn read_dataset(dir: &Path) -> Vec<Sample> {
    let loc = Location::open(dir.to_str().unwrap()).unwrap();
    let index = DatasetIndex::load(&loc).await.unwrap();
    let mut out = Vec::new();
    for s in &index.shards {
        let bytes = std::fs::read(dir.join(&s.name)).unwrap();
        assert_eq!(bytes.len() as u64, s.bytes);
        let samples = ShardReader::new(&bytes[..], &s.name).read_all().unwrap();
        assert_eq!(samples.len() as u64, s.samples);
        out.extend(samples);
    }
    out
}

fn testdata(name: &str) -> String {
    run_python("from pydicom.data import get_testdata_file; import sys; print(get_testdata_file(sys.argv[1]))", &[name]).trim().to_string()
}

#[tokio::test]
async fn png_ingest_round_trip_keeps_pixels_labels_and_metadata_exact_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    let mut originals = Vec::new();
    for i in 0..6u16 {
        let img = Image16 {
            width: 20 + i as u32,
            height: 10,
            pixels: (0..(20 + i as u32) * 10)
                .map(|p| (p as u16).wrapping_mul(331).wrapping_add(i * 7919))
                .collect(),
        };
        let rel = if i % 2 == 0 {
            format!("img{i}.png")
        } else {
            format!("sub/img{i}.png")
        };
        std::fs::write(input.join(&rel), img.to_png()).unwrap();
        originals.push((rel, img));
    }
    let labels: String = std::iter::once("file,finding,score".to_string())
        .chain(
            originals
                .iter()
                .enumerate()
                .map(|(i, (rel, _))| format!("{rel},{},{}.5", i % 2, i)),
        )
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("labels.csv"), labels).unwrap();
    let out = dir.path().join("ds");
    let labels_csv = dir.path().join("labels.csv");
    // PNG has no metadata to say whether its pixels carry identifiers: refused until the ingest
    // operator states it checked them.
    let unchecked = radfm(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&unchecked.stderr);
    assert!(!unchecked.status.success());
    assert!(
        err.contains("a PNG file has no metadata to say whether its pixels carry identifiers")
            && err.contains("--accept-burned-in-risk"),
        "{err}"
    );
    let args = [
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--site",
        "hospital-a",
        "--labels",
        labels_csv.to_str().unwrap(),
        "--shard-mib",
        "1",
        "--accept-burned-in-risk",
    ];
    let text = ok(&radfm(&args));
    assert!(
        text.contains("6 files, 0 already ingested, 6 samples"),
        "{text}"
    );

    let samples = read_dataset(&out).await;
    assert_eq!(samples.len(), 6);
    for (i, (_, img)) in originals.iter().enumerate() {
        let s = samples
            .iter()
            .find(|s| s.image == *img)
            .unwrap_or_else(|| panic!("image {i} not found exactly"));
        assert_eq!(s.meta.site.as_deref(), Some("hospital-a"));
        assert_eq!(s.meta.labels["finding"], serde_json::json!(i % 2));
        assert_eq!(s.meta.labels["score"], serde_json::json!(i as f64 + 0.5));
        assert_eq!((s.meta.width, s.meta.height), (img.width, img.height));
    }
    // Resumable: a second run finds everything done.
    let text = ok(&radfm(&args));
    assert!(
        text.contains("6 files, 6 already ingested, 0 samples in 0 new shards"),
        "{text}"
    );
    // A new file lands: only it is ingested, in a new shard with the next sequence number.
    std::fs::write(
        input.join("late.png"),
        Image16 {
            width: 4,
            height: 4,
            pixels: vec![9; 16],
        }
        .to_png(),
    )
    .unwrap();
    ok(&radfm(&args));
    let index = DatasetIndex::load(&Location::open(out.to_str().unwrap()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (index.shards.len(), index.since(1).len(), index.samples()),
        (2, 1, 7)
    );
}

#[tokio::test]
async fn identified_dicom_is_refused_and_deidentify_strips_every_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dicom");
    std::fs::create_dir_all(&input).unwrap();
    for f in ["CT_small.dcm", "MR_small.dcm"] {
        std::fs::copy(testdata(f), input.join(f)).unwrap();
    }
    // What pydicom reads: identifiers and raw pixels.
    let expect = run_python(
        "import sys, json, pydicom\n\
         d = pydicom.dcmread(sys.argv[1])\n\
         print(json.dumps({'name': str(d.PatientName), 'id': str(d.PatientID), 'slope': float(getattr(d, 'RescaleSlope', 1)),\n\
           'intercept': float(getattr(d, 'RescaleIntercept', 0)), 'raw': d.pixel_array.astype('int64').ravel().tolist(),\n\
           'rows': d.Rows, 'cols': d.Columns}))",
        &[input.join("CT_small.dcm").to_str().unwrap()],
    );
    let expect: serde_json::Value = serde_json::from_str(&expect).unwrap();
    let patient_name = expect["name"].as_str().unwrap().to_string();
    let patient_id = expect["id"].as_str().unwrap().to_string();
    assert!(!patient_name.is_empty());

    let out = dir.path().join("ds");
    let refusals = dir.path().join("refused.csv");
    let refused = radfm(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--refusals",
        refusals.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("refused: the file carries direct identifiers (PatientName, PatientID"),
        "{err}"
    );
    // Paths often carry names: messages name the file by its keyed source id; only the local
    // refusals file (this user's) maps ids to paths.
    assert!(
        !err.contains("CT_small") && !err.contains(input.to_str().unwrap()),
        "{err}"
    );
    let listed = std::fs::read_to_string(&refusals).unwrap();
    assert!(listed.contains("\"CT_small.dcm\""), "{listed}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&refusals).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(err.contains("re-run with --deidentify"), "{err}");
    assert!(
        !err.contains(&patient_name) && !err.contains(&patient_id),
        "identifier values never reach messages: {err}"
    );
    assert!(
        read_dataset(&out).await.is_empty(),
        "nothing of a refused file is written"
    );

    let text = ok(&radfm(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--deidentify",
        "--site",
        "h1",
    ]));
    assert!(text.contains("2 samples"), "{text}");
    for entry in std::fs::read_dir(&out).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let hay = String::from_utf8_lossy(&bytes);
        for needle in [patient_name.as_str(), patient_id.as_str()] {
            assert!(!hay.contains(needle), "{needle:?} found in the output");
        }
    }
    let samples = read_dataset(&out).await;
    let ct = samples
        .iter()
        .find(|s| s.meta.modality.as_deref() == Some("CT"))
        .expect("the CT sample");
    assert_eq!(
        (ct.meta.width, ct.meta.height),
        (
            expect["cols"].as_u64().unwrap() as u32,
            expect["rows"].as_u64().unwrap() as u32
        )
    );
    let (slope, intercept) = (
        expect["slope"].as_f64().unwrap(),
        expect["intercept"].as_f64().unwrap(),
    );
    assert_eq!(intercept, -1024.0);
    let raw: Vec<i64> = expect["raw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let ours: Vec<f64> = ct
        .image
        .pixels
        .iter()
        .map(|&p| p as f64 * ct.meta.rescale_slope + ct.meta.rescale_intercept)
        .collect();
    let theirs: Vec<f64> = raw.iter().map(|&r| r as f64 * slope + intercept).collect();
    assert_eq!(
        ours, theirs,
        "physical values equal pydicom's pixel_array with the rescale applied"
    );
    assert_eq!(
        ct.meta.patient.as_ref().map(|p| p.len()),
        Some(32),
        "pseudonym, not the id"
    );
    assert!(samples.iter().all(|s| s.meta.site.as_deref() == Some("h1")));
}

/// A report names the patient, the record number and a date: what the header says about the case
/// is removed from it, the date moves back, and a report the rules still doubt is refused until
/// the operator accepts it.
#[tokio::test]
async fn reports_lose_the_headers_identifiers_before_they_are_written_and_doubts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dicom");
    std::fs::create_dir_all(&input).unwrap();
    for f in ["CT_small.dcm", "MR_small.dcm"] {
        std::fs::copy(testdata(f), input.join(f)).unwrap();
    }
    let header = run_python(
        "import sys, json, pydicom\n\
         d = pydicom.dcmread(sys.argv[1])\n\
         print(json.dumps({'name': str(d.PatientName), 'id': str(d.PatientID)}))",
        &[input.join("CT_small.dcm").to_str().unwrap()],
    );
    let header: serde_json::Value = serde_json::from_str(&header).unwrap();
    let (name, id) = (
        header["name"].as_str().unwrap(),
        header["id"].as_str().unwrap(),
    );
    let family = name.split('^').next().unwrap();
    let ct = format!(
        "Patient {family} (record {id}) was scanned on 2004-01-19. FINDINGS: A 6 mm nodule in the right upper lobe."
    );
    let mr = "Discussed with dr. smith. No lesion.";
    let reports = dir.path().join("reports.json");
    std::fs::write(
        &reports,
        serde_json::json!({"CT_small.dcm": ct, "MR_small.dcm": mr}).to_string(),
    )
    .unwrap();
    let out = dir.path().join("ds");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "ingest",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--deidentify",
            "--reports",
            reports.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let first = radfm(&args(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        err.contains("refused: its report may still identify the patient (Name)")
            && !err.contains("smith"),
        "{err}"
    );
    let samples = read_dataset(&out).await;
    assert_eq!(
        samples.len(),
        1,
        "the CT and its report are written, the MR is not"
    );
    let written = samples[0].report.as_deref().unwrap();
    assert!(
        written.ends_with("FINDINGS: A 6 mm nodule in the right upper lobe."),
        "{written}"
    );
    assert!(
        !written.contains(family) && !written.contains(id) && !written.contains("2004-01-19"),
        "{written}"
    );
    assert!(
        written.contains("[NAME]")
            && written.contains("[ID]")
            && written.contains("scanned on 2003-"),
        "{written}"
    );

    ok(&radfm(
        &args(&["--accept-report-doubts"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    let samples = read_dataset(&out).await;
    assert_eq!(samples.len(), 2);
    for entry in std::fs::read_dir(&out).unwrap() {
        let hay =
            String::from_utf8_lossy(&std::fs::read(entry.unwrap().path()).unwrap()).to_string();
        for needle in [name, id, family, "2004-01-19"] {
            assert!(!hay.contains(needle), "{needle:?} found in the output");
        }
    }
}

/// Writes a Basic Text SR of `image`'s study with pydicom (`tests/python/write_sr.py`).
fn write_sr(out: &Path, image: &Path, spec: serde_json::Value) {
    let script = radfm_e2e::repo_root().join("tests/python/write_sr.py");
    let status = Command::new(radfm_e2e::python())
        .args([script.as_os_str(), out.as_os_str(), image.as_os_str()])
        .arg(spec.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "write_sr.py failed");
}

/// `radfm ingest INPUT --deidentify --reports REPORTS` into `out`, refusals listed in `refusals`.
fn ingest_with_reports(input: &Path, reports: &Path, out: &Path, refusals: &Path) -> Output {
    radfm(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--deidentify",
        "--reports",
        reports.to_str().unwrap(),
        "--refusals",
        refusals.to_str().unwrap(),
    ])
}

/// A PACS export holds the images and the radiologists' Structured Reports side by side: each
/// image gets the verified final report of its study (not the later preliminary one), without
/// the names of the patient and the reading radiologist, and an image with two disagreeing final
/// reports is refused until one goes.
#[tokio::test]
async fn structured_reports_beside_the_images_become_their_deidentified_reports() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    for f in ["CT_small.dcm", "MR_small.dcm"] {
        std::fs::copy(testdata(f), export.join(f)).unwrap();
    }
    let (ct, mr) = (export.join("CT_small.dcm"), export.join("MR_small.dcm"));
    // CT_small's header: CompressedSamples^CT1, id 1CT1, JFK IMAGING CENTER, 2004-01-19.
    let final_ct = "Compared with the study of 2004-01-19 for CompressedSamples (1CT1) at JFK \
                    Imaging Center. Meredith Grey reviewed it. A 6 mm nodule in the right upper lobe.";
    write_sr(
        &export.join("report-final.dcm"),
        &ct,
        serde_json::json!({"findings": final_ct, "impression": "Likely benign.",
            "when": "20040120090000", "evidence": true, "recorder": "Bailey^Miranda"}),
    );
    write_sr(
        &export.join("report-preliminary.dcm"),
        &ct,
        serde_json::json!({"findings": "Preliminary read: possible nodule.", "impression": "To be confirmed.",
            "when": "20040121090000", "verified": false, "complete": false, "preliminary": true}),
    );
    for (k, text) in ["No lesion.", "Small lesion in the left lobe."]
        .iter()
        .enumerate()
    {
        write_sr(
            &export.join(format!("mr-{k}.dcm")),
            &mr,
            serde_json::json!({"findings": text, "impression": "-", "when": "20040827100000"}),
        );
    }
    let out = dir.path().join("ds");
    let refusals = dir.path().join("refused.csv");
    let ingest = || ingest_with_reports(&export, &export, &out, &refusals);
    let first = ingest();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr),
    );
    assert!(!first.status.success());
    assert!(
        stdout.contains("4 DICOM files are not images")
            && stdout.contains("4 Structured Reports read"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "refused: 2 equally final Structured Reports with different texts describe it"
        ),
        "{stderr}"
    );
    assert!(
        std::fs::read_to_string(&refusals)
            .unwrap()
            .contains("MR_small.dcm"),
        "the refusals file names the image"
    );
    let samples = read_dataset(&out).await;
    assert_eq!(samples.len(), 1, "the CT is written, the MR is not");
    let written = samples[0].report.as_deref().unwrap();
    assert!(
        written.starts_with("Findings: Compared with the study of 2003-")
            && written.contains("A 6 mm nodule in the right upper lobe.")
            && written.ends_with("\nImpressions: Likely benign."),
        "the verified final report, its sections on their own lines: {written}"
    );
    for needle in [
        "CompressedSamples",
        "1CT1",
        "JFK",
        "Meredith",
        "Grey",
        "2004-01-19",
        "Preliminary",
    ] {
        assert!(!written.contains(needle), "{needle:?} in {written}");
    }

    std::fs::remove_file(export.join("mr-1.dcm")).unwrap();
    let second = ok(&ingest());
    assert!(second.contains("3 Structured Reports read"), "{second}");
    let samples = read_dataset(&out).await;
    assert_eq!(samples.len(), 2);
    let mr_report = samples
        .iter()
        .find_map(|s| s.report.as_deref().filter(|r| r.contains("lesion")));
    assert_eq!(mr_report, Some("Findings: No lesion.\nImpressions: -"));
    for entry in std::fs::read_dir(&out).unwrap() {
        let hay =
            String::from_utf8_lossy(&std::fs::read(entry.unwrap().path()).unwrap()).to_string();
        for needle in [
            "CompressedSamples",
            "Meredith",
            "Bailey",
            "Elsewhere",
            "1.3.6.1.4.1.5962",
        ] {
            assert!(!hay.contains(needle), "{needle:?} found in the output");
        }
    }
}

/// pydicom's own Comprehensive SR test file, with by-reference items, coordinates and nested
/// containers, reads into its text.
#[test]
fn pydicoms_comprehensive_sr_test_file_reads_into_its_text() {
    let path = testdata("test-SR.dcm");
    let sr = radfm_data::structured_report::read(Path::new(&path), "test-SR")
        .unwrap()
        .expect("a Structured Report");
    assert!(
        sr.text.starts_with("A mass of Code: Sample Code 1.")
            && sr.text.contains("Diameter: 3 cm. was detected.")
            && sr.text.contains("Inferred Sample Text New line."),
        "{}",
        sr.text
    );
}

/// A truncated Structured Report stops the ingest before anything is written, named by its
/// source id; its path is only in the refusals file.
#[test]
fn an_unreadable_structured_report_stops_the_ingest_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (input, reports) = (dir.path().join("in"), dir.path().join("reports"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(&reports).unwrap();
    let ct = input.join("CT_small.dcm");
    std::fs::copy(testdata("CT_small.dcm"), &ct).unwrap();
    let sr = reports.join("Doe_Jane.dcm");
    write_sr(
        &sr,
        &ct,
        serde_json::json!({"findings": "No lesion.", "impression": "-", "when": "20040120090000"}),
    );
    let bytes = std::fs::read(&sr).unwrap();
    std::fs::write(&sr, &bytes[..bytes.len() - 40]).unwrap();
    let out = dir.path().join("ds");
    let refusals = dir.path().join("refused.csv");
    let run = ingest_with_reports(&input, &reports, &out, &refusals);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains("Structured Report: malformed")
            && err.contains("1 unreadable Structured Report(s) in all, nothing was ingested")
            && !err.contains("Doe_Jane"),
        "{err}"
    );
    assert!(
        std::fs::read_to_string(&refusals)
            .unwrap()
            .contains("Doe_Jane.dcm")
    );
    assert!(!out.join("index.json").exists(), "nothing written");
}

#[tokio::test]
async fn python_webdataset_reads_our_shards_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let text = ok(&radfm(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--samples",
        "24",
        "--size",
        "32",
        "--shard-mib",
        "1",
        "--sites",
        "a,b,c",
        "--shift-site",
        "c",
    ]));
    assert!(text.contains("24 samples"), "{text}");
    let ours = read_dataset(&out).await;
    let shards: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path().display().to_string()))
        .filter(|p| p.ends_with(".tar"))
        .collect();
    const READ_WITH_WEBDATASET: &str = r#"
import sys, json, io, numpy as np, webdataset as wds
from PIL import Image
rows = []
for s in wds.WebDataset(sys.argv[1:], shardshuffle=False):
    img = np.array(Image.open(io.BytesIO(s["png"])))
    meta = json.loads(s["json"])
    rows.append([s["__key__"], str(img.dtype), int(img.astype("int64").sum()), meta["site"], meta["labels"]["lesion"], s["txt"].decode("utf-8")])
print(json.dumps(rows))
"#;
    let theirs = run_python(
        READ_WITH_WEBDATASET,
        &shards.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let rows: Vec<(String, String, i64, String, u8, String)> =
        serde_json::from_str(&theirs).unwrap();
    assert_eq!(rows.len(), ours.len());
    for (key, dtype, sum, site, lesion, report) in rows {
        let s = ours
            .iter()
            .find(|s| s.key == key)
            .unwrap_or_else(|| panic!("{key} unknown"));
        assert_eq!(dtype, "uint16");
        assert_eq!(
            sum,
            s.image.pixels.iter().map(|&p| p as i64).sum::<i64>(),
            "{key}"
        );
        assert_eq!(Some(site.as_str()), s.meta.site.as_deref());
        assert_eq!(serde_json::json!(lesion), s.meta.labels["lesion"]);
        assert_eq!(Some(report.as_str()), s.report.as_deref(), "{key}");
    }
}

#[test]
fn cli_errors_name_the_flag_or_path() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["ingest", "/nonexistent/folder", "--out", "/tmp/x"],
            "/nonexistent/folder: not a folder",
        ),
        (
            &["synth", "--out", "/tmp/x", "--lesion-prevalence", "1.5"],
            "--lesion-prevalence must be within 0..1, got 1.5",
        ),
        (
            &[
                "synth",
                "--out",
                "/tmp/x",
                "--sites",
                "a,b",
                "--shift-site",
                "c",
            ],
            "--shift-site c is not one of --sites a,b",
        ),
        (&["synth", "--out", "ftp://host/x"], "ftp://host/x: "),
    ];
    for (args, want) in cases {
        let out = radfm(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let weak = Command::new(workspace_bin("radfm").unwrap())
        .args(["ingest", "/tmp", "--out", "/tmp/x", "--salt", "short"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&weak.stderr).contains("must be at least 16 characters"));
}

#[tokio::test]
async fn s3_path_end_to_end_survives_a_server_outage_mid_read() {
    use radfm_data::loader::{Cursor, Loader, LoaderConfig, keys_from};
    let s3 = radfm_e2e::S3Server::start().unwrap();
    // `radfm synth` writes to s3:// with credentials from the environment, as in a pod.
    let out = Command::new(workspace_bin("radfm").unwrap())
        .args([
            "synth",
            "--out",
            "s3://radfm/cohort",
            "--samples",
            "96",
            "--size",
            "32",
            "--shard-mib",
            "0.02",
        ])
        .envs(s3.env())
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("96 samples"), "{text}");
    let written: Vec<String> = std::fs::read_dir(s3.bucket_dir().join("cohort"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(written.iter().any(|n| n == "index.json"), "{written:?}");

    let loc = Location::open_with("s3://radfm/cohort", s3.env()).unwrap();
    let index = DatasetIndex::load(&loc).await.unwrap();
    assert_eq!(index.samples(), 96);
    // Many small shards so fetches happen during the outage.
    assert!(index.shards.len() >= 8, "{} shards", index.shards.len());
    let cfg = LoaderConfig {
        batch_size: 8,
        image_size: 16,
        prefetch: 1,
        augment: false,
        fetch_retries: 10,
        ..Default::default()
    };
    let mut loader = Loader::open_at(loc.clone(), cfg.clone()).await.unwrap();
    let s3 = std::sync::Arc::new(std::sync::Mutex::new(s3));
    let mut keys = Vec::new();
    let mut restarter = None;
    // The restarted server dies with the thread that started it (PDEATHSIG), so that thread
    // lives until the test is done with the server.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut done_rx = Some(done_rx);
    loader
        .run_epoch(Cursor::default(), |b| {
            keys.extend(b.keys);
            if restarter.is_none() {
                // Outage: the server goes away for two seconds while most shards are still to come.
                s3.lock().unwrap().stop();
                let s3 = s3.clone();
                let done = done_rx.take().unwrap();
                restarter = Some(std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_secs(2));
                    s3.lock().unwrap().restart().unwrap();
                    let _ = done.recv();
                }));
            }
            true
        })
        .await
        .unwrap();
    let retries = loader
        .fetch_retries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(retries > 0, "the outage was noticed and retried");
    let shard_entries = index.shards.clone();
    let expected: Vec<String> = {
        let mut local = Vec::new();
        for (s, i) in keys_from(&shard_entries, &cfg, Cursor::default()) {
            local.push((s, i));
        }
        let mut names = Vec::new();
        for (s, i) in local {
            let bytes = loc.get_opt(&shard_entries[s].name).await.unwrap().unwrap();
            let samples = ShardReader::new(&bytes[..], &shard_entries[s].name)
                .read_all()
                .unwrap();
            names.push(samples[i as usize].key.clone());
        }
        names
    };
    assert_eq!(
        keys, expected,
        "nothing lost, nothing repeated, same order ({retries} retries)"
    );
    drop(done_tx);
    restarter.unwrap().join().unwrap();
}

#[tokio::test]
async fn rle_jpeg2000_and_multi_frame_dicom_decode_like_pydicom() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dicom");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(testdata("MR_small_RLE.dcm"), input.join("rle.dcm")).unwrap();
    std::fs::copy(testdata("MR_small_jp2klossless.dcm"), input.join("j2k.dcm")).unwrap();
    // A 3-frame file written by pydicom from MR_small: frame k holds the image + 100k.
    const MULTI: &str = r#"
import sys, json, numpy as np, pydicom
from pydicom.data import get_testdata_file
d = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
base = d.pixel_array.astype(np.int16)
frames = np.stack([base + 100 * k for k in range(3)])
d.NumberOfFrames = 3
d.PixelData = frames.tobytes()
d.save_as(sys.argv[1])
rle = pydicom.dcmread(sys.argv[2]).pixel_array.astype("int64").ravel().tolist()
plain = base.astype("int64").ravel().tolist()
print(json.dumps({"frames": [f.astype("int64").ravel().tolist() for f in frames], "rle": rle, "plain": plain}))
"#;
    let multi = input.join("multi.dcm");
    let expect = run_python(
        MULTI,
        &[
            multi.to_str().unwrap(),
            input.join("rle.dcm").to_str().unwrap(),
        ],
    );
    let expect: serde_json::Value = serde_json::from_str(&expect).unwrap();
    let out = dir.path().join("ds");
    let text = ok(&radfm(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--deidentify",
    ]));
    assert!(
        text.contains("3 files, 0 already ingested, 5 samples"),
        "{text}"
    );
    let samples = read_dataset(&out).await;
    let physical = |s: &Sample| -> Vec<i64> {
        s.image
            .pixels
            .iter()
            .map(|&p| (p as f64 * s.meta.rescale_slope + s.meta.rescale_intercept).round() as i64)
            .collect()
    };
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let mut framed: Vec<&Sample> = samples.iter().filter(|s| s.meta.frame.is_some()).collect();
    framed.sort_by_key(|s| s.meta.frame);
    assert_eq!(framed.len(), 3);
    for (k, s) in framed.iter().enumerate() {
        assert_eq!(s.meta.frame, Some(k as u32));
        assert!(s.key.ends_with(&format!("-f{k:04}")), "{}", s.key);
        assert_eq!(physical(s), ints(&expect["frames"][k]), "frame {k}");
    }
    // RLE Lossless and JPEG 2000 Lossless hold the same MR_small image.
    let singles: Vec<&Sample> = samples.iter().filter(|s| s.meta.frame.is_none()).collect();
    assert_eq!(singles.len(), 2);
    assert_eq!(ints(&expect["rle"]), ints(&expect["plain"]));
    for s in singles {
        assert_eq!(
            physical(s),
            ints(&expect["rle"]),
            "{} decodes exactly",
            s.key
        );
    }
}

#[tokio::test]
async fn ingest_reads_an_s3_prefix_and_writes_to_s3() {
    let s3 = radfm_e2e::S3Server::start().unwrap();
    // Objects under s3://radfm/incoming/ (the POSIX gateway serves the bucket folder's files as objects).
    let incoming = s3.bucket_dir().join("incoming/ct");
    std::fs::create_dir_all(&incoming).unwrap();
    std::fs::copy(testdata("CT_small.dcm"), incoming.join("a.dcm")).unwrap();
    std::fs::write(
        incoming.join("b.png"),
        Image16 {
            width: 8,
            height: 8,
            pixels: (0..64).collect(),
        }
        .to_png(),
    )
    .unwrap();
    std::fs::write(incoming.join("notes.txt"), "not an image").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "ingest",
            "s3://radfm/incoming",
            "--out",
            "s3://radfm/ds",
            "--site",
            "h2",
            "--accept-burned-in-risk",
        ];
        args.extend_from_slice(extra);
        Command::new(workspace_bin("radfm").unwrap())
            .args(&args)
            .env("RADFM_PSEUDONYM_SALT", SALT)
            .envs(s3.env())
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(": refused: the file carries direct identifiers") && !err.contains("a.dcm"),
        "named by source id, not by its object path: {err}"
    );
    let text = ok(&run(&["--deidentify"]));
    assert!(
        text.contains("2 files, 1 already ingested, 1 samples"),
        "the PNG landed in the first run: {text}"
    );
    let loc = Location::open_with("s3://radfm/ds", s3.env()).unwrap();
    let index = DatasetIndex::load(&loc).await.unwrap();
    assert_eq!((index.shards.len(), index.samples()), (2, 2));
    let bytes = loc.get_opt(&index.shards[1].name).await.unwrap().unwrap();
    let ct = ShardReader::new(&bytes[..], "s1").read_all().unwrap();
    assert_eq!(
        (ct[0].meta.modality.as_deref(), ct[0].meta.site.as_deref()),
        (Some("CT"), Some("h2"))
    );
}

#[tokio::test]
async fn jpeg_ingest_decodes_like_pil() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("jpg");
    std::fs::create_dir_all(&input).unwrap();
    const WRITE_JPEG: &str = r#"
import sys, json, numpy as np
from PIL import Image
y, x = np.mgrid[0:48, 0:64]
gray = ((x * 3 + y * 2) % 256).astype(np.uint8)
Image.fromarray(gray, mode="L").save(sys.argv[1] + "/gray.jpg", quality=90)
rgb = np.stack([gray, 255 - gray, (gray // 2)], axis=-1)
Image.fromarray(rgb, mode="RGB").save(sys.argv[1] + "/color.jpeg", quality=90)
print(json.dumps({n: np.asarray(Image.open(sys.argv[1] + "/" + n).convert("L")).astype(int).ravel().tolist() for n in ["gray.jpg", "color.jpeg"]}))
"#;
    let expect: serde_json::Value =
        serde_json::from_str(&run_python(WRITE_JPEG, &[input.to_str().unwrap()])).unwrap();
    let out = dir.path().join("ds");
    ok(&radfm(&[
        "ingest",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--accept-burned-in-risk",
    ]));
    let samples = read_dataset(&out).await;
    assert_eq!(samples.len(), 2);
    for name in ["gray.jpg", "color.jpeg"] {
        let pil: Vec<i64> = expect[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        // Which sample is which: compare against both and take the closer one.
        let worst = samples
            .iter()
            .map(|s| {
                s.image
                    .pixels
                    .iter()
                    .zip(&pil)
                    .map(|(&a, &b)| (a as i64 - b).abs())
                    .max()
                    .unwrap()
            })
            .min()
            .unwrap();
        // JPEG decoders may differ by rounding in the inverse DCT and color conversion.
        assert!(worst <= 3, "{name}: max difference to PIL {worst}");
    }
}

#[test]
fn a_dicom_header_declaring_an_enormous_image_is_refused_before_its_pixels_are_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("huge.dcm");
    // A real CT file whose header now declares 60000 × 60000 pixels in 2000 frames.
    run_python(
        "import sys; from pydicom import dcmread; from pydicom.data import get_testdata_file\n\
         ds = dcmread(get_testdata_file('CT_small.dcm'))\n\
         ds.Rows = 60000; ds.Columns = 60000; ds.NumberOfFrames = 2000\n\
         ds.save_as(sys.argv[1])",
        &[out.to_str().unwrap()],
    );
    let gate = radfm_data::dicom::Gate {
        deidentify: true,
        accept_burned_in_risk: true,
    };
    let e = radfm_data::dicom::read_named(&out, "huge", gate, b"salt")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge") && e.contains("outside the limits"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingests_on_s3_keep_every_shard() {
    let s3 = radfm_e2e::S3Server::start().unwrap();
    let loc = Location::open_with("s3://radfm/concurrent", s3.env()).unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let loc = loc.clone();
            tokio::spawn(async move {
                for k in 0..3 {
                    let body = format!("writer {w} shard {k}").into_bytes();
                    DatasetIndex::append_shard(&loc, body, 0, Default::default(), &[])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let index = DatasetIndex::load(&loc).await.unwrap();
    let seqs: Vec<u64> = index.shards.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (0..12).collect::<Vec<u64>>());
    let mut bodies = Vec::new();
    for s in &index.shards {
        let b = loc.get_opt(&s.name).await.unwrap().unwrap();
        assert_eq!(
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&b)),
            s.sha256,
            "{}",
            s.name
        );
        bodies.push(String::from_utf8(b.to_vec()).unwrap());
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 12, "{bodies:?}");
}

#[test]
fn the_length_check_refuses_only_the_truncated_files_among_pydicoms_test_files() {
    let dir = run_python(
        "import os; from pydicom.data import get_testdata_file; \
         print(os.path.dirname(get_testdata_file('CT_small.dcm')))",
        &[],
    );
    let mut refused = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.trim()).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        checked += 1;
        if radfm_data::dicom_lengths::check(&std::fs::read(&path).unwrap()).is_err() {
            refused.push(path.file_name().unwrap().to_string_lossy().to_string());
        }
    }
    refused.sort();
    assert!(checked > 50, "{checked}");
    assert_eq!(refused, ["MR_truncated.dcm", "rtplan_truncated.dcm"]);
}
