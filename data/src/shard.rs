//! WebDataset-compatible tar shards: for each sample `<key>.png` (16-bit grayscale) followed by
//! `<key>.json` ([`SampleMeta`]) and, when the sample has a report, `<key>.txt` (its de-identified
//! text, UTF-8). Keys hold no dots, as WebDataset splits member names at the
//! first dot. Headers are deterministic (mode 0644, mtime 0, no owner), so the same samples give
//! the same bytes and the same sha256.

use std::io::Read;

use crate::image16::Image16;
use crate::meta::SampleMeta;
use crate::{Error, Result};

/// Largest tar member read (an image or metadata file of one sample); a header claiming more
/// breaks the shard before anything is allocated.
pub const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// One training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sample key (no dots, no slashes).
    pub key: String,
    /// The image.
    pub image: Image16,
    /// Its metadata.
    pub meta: SampleMeta,
    /// Its de-identified report (`<key>.txt`, UTF-8), if it has one.
    pub report: Option<String>,
}

/// Largest report accepted in a shard: a radiology report is a few kilobytes.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Builds one shard in memory.
pub struct ShardWriter {
    builder: tar::Builder<Vec<u8>>,
    samples: u64,
}

impl Default for ShardWriter {
    fn default() -> Self {
        ShardWriter {
            builder: tar::Builder::new(Vec::new()),
            samples: 0,
        }
    }
}

impl ShardWriter {
    /// An empty shard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a sample.
    pub fn add(&mut self, sample: &Sample) -> Result<()> {
        if sample.key.is_empty() || sample.key.contains(['.', '/']) {
            return Err(Error::Shard {
                shard: "(writing)".into(),
                reason: format!("invalid sample key {:?}", sample.key),
            });
        }
        let json = serde_json::to_vec(&sample.meta).expect("metadata serializes");
        self.member(&format!("{}.png", sample.key), &sample.image.to_png())?;
        self.member(&format!("{}.json", sample.key), &json)?;
        if let Some(report) = &sample.report {
            self.member(&format!("{}.txt", sample.key), report.as_bytes())?;
        }
        self.samples += 1;
        Ok(())
    }

    pub(crate) fn member(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        self.builder
            .append_data(&mut h, name, data)
            .map_err(|e| Error::Shard {
                shard: "(writing)".into(),
                reason: e.to_string(),
            })
    }

    /// Samples added so far.
    pub fn len(&self) -> u64 {
        self.samples
    }

    /// Whether no sample was added.
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Bytes written so far (approximately the shard size).
    pub fn bytes(&self) -> usize {
        self.builder.get_ref().len()
    }

    /// The finished tar file.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.builder.into_inner().map_err(|e| Error::Shard {
            shard: "(writing)".into(),
            reason: e.to_string(),
        })
    }
}

/// Reads samples from a shard as a stream: members are parsed one by one, never the whole shard
/// at once.
pub struct ShardReader<R: Read> {
    archive: tar::Archive<R>,
    name: String,
}

/// A sample that could not be decoded, with why; the reader goes on with the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct BadSample {
    /// The sample key (or member name).
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl<R: Read> ShardReader<R> {
    /// A reader of the shard `name` (used in messages).
    pub fn new(reader: R, name: &str) -> Self {
        ShardReader {
            archive: tar::Archive::new(reader),
            name: name.to_string(),
        }
    }

    /// Calls `each` for every sample in order: `Ok(sample)` or `Err(BadSample)` for a sample whose
    /// image or metadata is corrupt or missing. A shard whose tar structure is broken or
    /// truncated ends with an error naming the shard.
    pub fn for_each(
        self,
        mut each: impl FnMut(std::result::Result<Sample, BadSample>),
    ) -> Result<()> {
        let name = self.name.clone();
        self.for_each_members(|m| each(decode(&name, m)))
    }

    /// Calls `each` with every sample's members, in order, undecoded.
    fn for_each_members(mut self, mut each: impl FnMut(Members)) -> Result<()> {
        let shard = self.name.clone();
        let broken = |reason: String| Error::Shard {
            shard: shard.clone(),
            reason,
        };
        let mut pending: Option<Members> = None;
        let entries = self.archive.entries().map_err(|e| broken(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| broken(e.to_string()))?;
            let (path, size) = member_header(&entry).map_err(broken)?;
            let mut data = Vec::with_capacity(size.min(1 << 20) as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| broken(format!("member {path}: {e}")))?;
            if let Some(done) = Members::gather(&mut pending, &path, data) {
                each(done);
            }
        }
        if let Some(p) = pending.take() {
            each(p);
        }
        Ok(())
    }

    /// Every sample, failing on the first bad one.
    pub fn read_all(self) -> Result<Vec<Sample>> {
        let name = self.name.clone();
        let mut out = Vec::new();
        let mut bad = None;
        self.for_each(|s| match s {
            Ok(s) => out.push(s),
            Err(b) => {
                bad.get_or_insert(b);
            }
        })?;
        match bad {
            Some(b) => Err(Error::Shard {
                shard: name,
                reason: format!("sample {}: {}", b.key, b.reason),
            }),
            None => Ok(out),
        }
    }
}

/// A tar member's path and size; a member that claims more than [`MAX_MEMBER_BYTES`] breaks
/// the shard (the reason is returned) before anything of that size is read.
pub(crate) fn member_header<R: Read>(
    entry: &tar::Entry<'_, R>,
) -> std::result::Result<(String, u64), String> {
    let path = entry
        .path()
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .to_string();
    let size = entry.size();
    if size > MAX_MEMBER_BYTES {
        return Err(format!(
            "member {path} claims {size} bytes (more than the limit of {MAX_MEMBER_BYTES})"
        ));
    }
    Ok((path, size))
}

/// The members of one sample seen so far: their bytes, or where they are (the loader's spool).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Members<T = Vec<u8>> {
    pub(crate) key: String,
    pub(crate) png: Option<T>,
    pub(crate) json: Option<T>,
    pub(crate) txt: Option<T>,
}

impl<T> Members<T> {
    /// Adds member `path`'s `value` to the sample gathered in `pending`, as WebDataset groups
    /// members: by the base name up to its first dot, consecutive members of one key being one
    /// sample. Returns the previous sample when `path` starts a new one; a member without an
    /// extension is skipped, one of another extension ignored.
    pub(crate) fn gather(pending: &mut Option<Self>, path: &str, value: T) -> Option<Self> {
        let base = path.rsplit('/').next().unwrap_or(path);
        let (key, ext) = base.split_once('.')?;
        let done = pending.take_if(|p| p.key != key);
        let p = pending.get_or_insert_with(|| Members {
            key: key.to_string(),
            png: None,
            json: None,
            txt: None,
        });
        match ext {
            "png" => p.png = Some(value),
            "json" => p.json = Some(value),
            "txt" => p.txt = Some(value),
            _ => {}
        }
        done
    }
}

/// One sample from its members, or why it is bad.
pub(crate) fn decode(shard: &str, m: Members) -> std::result::Result<Sample, BadSample> {
    let key = m.key;
    let bad = |reason: String| BadSample {
        key: key.clone(),
        reason,
    };
    let png = m.png.ok_or_else(|| bad("no .png member".into()))?;
    let json = m.json.ok_or_else(|| bad("no .json member".into()))?;
    let report = match m.txt {
        Some(t) if t.len() > MAX_REPORT_BYTES => {
            return Err(bad(format!(
                "report of {} bytes, more than the limit of {MAX_REPORT_BYTES}",
                t.len()
            )));
        }
        Some(t) => Some(String::from_utf8(t).map_err(|_| bad("report is not UTF-8".into()))?),
        None => None,
    };
    let meta: SampleMeta =
        serde_json::from_slice(&json).map_err(|e| bad(format!("metadata: {e}")))?;
    let image =
        Image16::from_png(&png, &format!("{shard}/{key}.png")).map_err(|e| bad(e.to_string()))?;
    if (image.width, image.height) != (meta.width, meta.height) {
        return Err(bad(format!(
            "image is {}x{} but metadata says {}x{}",
            image.width, image.height, meta.width, meta.height
        )));
    }
    Ok(Sample {
        key,
        image,
        meta,
        report,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_member_claiming_gigabytes_breaks_the_shard_before_anything_is_allocated() {
        let mut header = tar::Header::new_gnu();
        header.set_path("x.png").unwrap();
        header.set_size(8 << 30);
        header.set_mode(0o644);
        header.set_cksum();
        let mut tar = header.as_bytes().to_vec();
        tar.extend_from_slice(&[0; 4096]);
        let reader = ShardReader::new(std::io::Cursor::new(tar), "hostile.tar");
        let e = reader.for_each(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains("hostile.tar") && e.contains("more than the limit"),
            "{e}"
        );
    }

    #[test]
    fn a_report_travels_as_the_txt_member_and_a_bad_one_names_its_sample() {
        let mut with = sample("a", 3);
        with.report = Some("FINDINGS: A 12 mm nodule. IMPRESSION: Lesion.".into());
        let mut w = ShardWriter::new();
        w.add(&with).unwrap();
        w.add(&sample("b", 4)).unwrap();
        w.member("c.png", &sample("c", 5).image.to_png()).unwrap();
        w.member("c.json", &serde_json::to_vec(&sample("c", 5).meta).unwrap())
            .unwrap();
        w.member("c.txt", &[0xff, 0xfe, 0x00]).unwrap();
        w.member("d.png", &sample("d", 6).image.to_png()).unwrap();
        w.member("d.json", &serde_json::to_vec(&sample("d", 6).meta).unwrap())
            .unwrap();
        w.member("d.txt", &vec![b'x'; MAX_REPORT_BYTES + 1])
            .unwrap();
        let mut seen = Vec::new();
        ShardReader::new(std::io::Cursor::new(w.finish().unwrap()), "r.tar")
            .for_each(|s| seen.push(s))
            .unwrap();
        assert_eq!(seen[0].as_ref().unwrap(), &with);
        assert_eq!(seen[1].as_ref().unwrap().report, None);
        let bad: Vec<String> = seen[2..]
            .iter()
            .map(|s| s.as_ref().unwrap_err().reason.clone())
            .collect();
        assert_eq!(bad[0], "report is not UTF-8");
        assert!(
            bad[1].contains("more than the limit of 65536"),
            "{}",
            bad[1]
        );
    }

    pub fn sample(key: &str, seed: u16) -> Sample {
        let pixels = (0..16 * 12)
            .map(|i| (i as u16).wrapping_mul(seed).wrapping_add(seed))
            .collect();
        Sample {
            key: key.into(),
            image: Image16 {
                width: 16,
                height: 12,
                pixels,
            },
            meta: SampleMeta {
                width: 16,
                height: 12,
                rescale_slope: 1.0,
                site: Some("A".into()),
                ..Default::default()
            },
            report: None,
        }
    }

    #[test]
    fn shard_round_trip_keeps_pixels_and_metadata_exact_and_bytes_deterministic() {
        let samples: Vec<Sample> = (0..5)
            .map(|i| sample(&format!("s{i:03}"), i * 977 + 1))
            .collect();
        let write = || {
            let mut w = ShardWriter::new();
            samples.iter().for_each(|s| w.add(s).unwrap());
            w.finish().unwrap()
        };
        let tar = write();
        assert_eq!(tar, write(), "deterministic bytes");
        let back = ShardReader::new(&tar[..], "shard-000000.tar")
            .read_all()
            .unwrap();
        assert_eq!(back, samples);
    }

    #[test]
    fn corrupt_sample_is_reported_and_reading_goes_on_but_truncation_names_the_shard() {
        let mut w = ShardWriter::new();
        w.add(&sample("a", 3)).unwrap();
        w.member("b.png", b"not a png").unwrap();
        w.member(
            "b.json",
            br#"{"width":16,"height":12,"rescale_slope":1.0,"rescale_intercept":0.0}"#,
        )
        .unwrap();
        w.add(&sample("c", 5)).unwrap();
        let tar = w.finish().unwrap();
        let mut seen = Vec::new();
        ShardReader::new(&tar[..], "x.tar")
            .for_each(|s| seen.push(s.map(|s| s.key).map_err(|b| b.key)))
            .unwrap();
        assert_eq!(
            seen,
            [
                Ok("a".to_string()),
                Err("b".to_string()),
                Ok("c".to_string())
            ]
        );

        let cut = &tar[..tar.len() / 2 + 100];
        let err = ShardReader::new(cut, "shard-000007.tar")
            .read_all()
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("shard shard-000007.tar: "), "{err}");
    }

    #[test]
    fn keys_with_dots_are_refused() {
        assert!(ShardWriter::new().add(&sample("a.b", 1)).is_err());
    }
}
