//! Any bytes as a DICOM file through the ingest's reader and de-identification gate, and as a
//! Structured Report through the report reader and the report de-identification.
#![no_main]
use std::io::Write;

#[global_allocator]
static ALLOCATOR: radfm_data::alloc_cap::Capped = radfm_data::alloc_cap::Capped;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut file = tempfile_in_shm();
    file.write_all(data).unwrap();
    let gate = radfm_data::dicom::Gate {
        deidentify: true,
        accept_burned_in_risk: true,
    };
    if let Ok(img) = radfm_data::dicom::read_named(file.path(), "fuzz.dcm", gate, b"salt") {
        for f in &img.frames {
            assert_eq!(f.pixels.len() as u64, f.width as u64 * f.height as u64);
        }
    }
    if let Ok(Some(sr)) = radfm_data::structured_report::read(file.path(), "fuzz.dcm") {
        assert!(sr.text.len() <= radfm_data::shard::MAX_REPORT_BYTES);
        radfm_data::report_deid::scrub(&sr.text, &sr.identifiers);
    }
});

/// A file in memory-backed /dev/shm where it exists (the reader opens a path).
fn tempfile_in_shm() -> NamedFile {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("radfm-fuzz-{}.dcm", std::process::id()));
    NamedFile {
        file: std::fs::File::create(&path).unwrap(),
        path,
    }
}

struct NamedFile {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl NamedFile {
    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Write for NamedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
