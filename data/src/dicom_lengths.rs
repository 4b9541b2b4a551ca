//! Declared lengths of a DICOM file checked against its size, before a parser allocates them.
//!
//! A DICOM element declares its value's length (up to 4 GiB) ahead of the value; parsers reserve
//! that much before reading. A file of a few hundred bytes can thus make the ingest reserve
//! gigabytes per file, on every decoding thread at once (found by `make fuzz`). This walk reads
//! only tags and lengths, descends into sequences and items, and refuses any length larger than
//! what is left of its enclosing value or of the file, and nesting deeper than [`MAX_DEPTH`].
//! What it cannot read (deflated data sets, unknown layouts) it leaves to the parser.

/// Deepest nesting of sequences accepted.
pub const MAX_DEPTH: usize = 32;

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);

/// Bytes per value of the binary VRs whose values have a fixed size.
fn value_size(vr: [u8; 2]) -> Option<usize> {
    match &vr {
        b"SS" | b"US" | b"OW" => Some(2),
        b"SL" | b"UL" | b"FL" | b"AT" | b"OF" | b"OL" => Some(4),
        b"FD" | b"SV" | b"UV" | b"OD" | b"OV" => Some(8),
        _ => None,
    }
}

/// How the data set is encoded.
#[derive(Clone, Copy)]
struct Syntax {
    explicit: bool,
    big_endian: bool,
}

struct Walk<'a> {
    bytes: &'a [u8],
}

impl Walk<'_> {
    fn u16_at(&self, pos: usize, big_endian: bool) -> Option<u16> {
        let b: [u8; 2] = self.bytes.get(pos..pos + 2)?.try_into().ok()?;
        Some(if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32_at(&self, pos: usize, big_endian: bool) -> Option<u32> {
        let b: [u8; 4] = self.bytes.get(pos..pos + 4)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// Elements from `pos` to `end` (or to an item end, when `until_item_end`); returns where
    /// the walk stopped.
    fn elements(
        &self,
        mut pos: usize,
        end: usize,
        syntax: Syntax,
        depth: usize,
        until_item_end: bool,
    ) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_DEPTH}"));
        }
        while pos < end {
            let tag = self
                .u16_at(pos, syntax.big_endian)
                .zip(self.u16_at(pos + 2, syntax.big_endian))
                .ok_or("truncated element tag")?;
            if tag == ITEM_END && until_item_end {
                return Ok(pos + 8);
            }
            let (vr, len, header) = self.header(pos, tag, syntax)?;
            let value = pos + header;
            if len == UNDEFINED {
                pos = self.undefined(value, end, tag, vr, syntax, depth)?;
                continue;
            }
            let len = len as usize;
            if let Some(size) = vr.and_then(value_size)
                && !len.is_multiple_of(size)
            {
                // Parsers read whole values and would lose their place in the file.
                return Err(format!(
                    "element ({:04X},{:04X}) declares {len} bytes, not a multiple of its {size}-byte values",
                    tag.0, tag.1
                ));
            }
            if len > end.saturating_sub(value) {
                return Err(format!(
                    "element ({:04X},{:04X}) declares {len} bytes but {} remain",
                    tag.0,
                    tag.1,
                    end.saturating_sub(value)
                ));
            }
            let items_inside = vr == Some(*b"SQ")
                || (vr.is_none()
                    && self.u16_at(value, syntax.big_endian) == Some(ITEM.0)
                    && self.u16_at(value + 2, syntax.big_endian) == Some(ITEM.1));
            if items_inside {
                self.items(value, value + len, syntax, depth + 1, true)?;
            }
            pos = value + len;
        }
        if until_item_end {
            return Err("an item of undefined length has no end".into());
        }
        Ok(pos)
    }

    /// (VR where explicit, declared length, header size) of the element at `pos`.
    fn header(
        &self,
        pos: usize,
        tag: (u16, u16),
        syntax: Syntax,
    ) -> Result<(Option<[u8; 2]>, u32, usize), String> {
        let truncated = || format!("element ({:04X},{:04X}) is truncated", tag.0, tag.1);
        if !syntax.explicit || tag.0 == 0xFFFE {
            let len = self
                .u32_at(pos + 4, syntax.big_endian)
                .ok_or_else(truncated)?;
            return Ok((None, len, 8));
        }
        let vr: [u8; 2] = self
            .bytes
            .get(pos + 4..pos + 6)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(truncated)?;
        const SHORT: [&[u8; 2]; 21] = [
            b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
            b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
        ];
        let long = matches!(
            &vr,
            b"OB"
                | b"OD"
                | b"OF"
                | b"OL"
                | b"OV"
                | b"OW"
                | b"SQ"
                | b"SV"
                | b"UC"
                | b"UN"
                | b"UR"
                | b"UT"
                | b"UV"
        );
        if !long && !SHORT.contains(&&vr) {
            // Parsers read an unknown VR as UN, with a 4-byte length: refuse rather than guess.
            return Err(format!(
                "element ({:04X},{:04X}) has no valid value representation",
                tag.0, tag.1
            ));
        }
        if long {
            let len = self
                .u32_at(pos + 8, syntax.big_endian)
                .ok_or_else(truncated)?;
            Ok((Some(vr), len, 12))
        } else {
            let len = self
                .u16_at(pos + 6, syntax.big_endian)
                .ok_or_else(truncated)?;
            Ok((Some(vr), len as u32, 8))
        }
    }

    /// A value of undefined length: a sequence of items, or encapsulated pixel data (fragments),
    /// up to its sequence end.
    fn undefined(
        &self,
        value: usize,
        end: usize,
        tag: (u16, u16),
        vr: Option<[u8; 2]>,
        syntax: Syntax,
        depth: usize,
    ) -> Result<usize, String> {
        let fragments = tag == PIXEL_DATA || matches!(vr.as_ref(), Some(b"OB" | b"OW"));
        // A sequence written as UN of undefined length holds implicit VR little endian items.
        let inner = match vr.as_ref() {
            Some(b"UN") => Syntax {
                explicit: false,
                big_endian: false,
            },
            _ => syntax,
        };
        self.items(value, end, inner, depth + 1, !fragments)
            .map(|stop| stop.max(value))
    }

    /// Items from `pos`: each an item tag and length, its content a data set (`datasets`) or
    /// raw bytes (fragments). Stops at a sequence end, or at `end`.
    fn items(
        &self,
        mut pos: usize,
        end: usize,
        syntax: Syntax,
        depth: usize,
        datasets: bool,
    ) -> Result<usize, String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_DEPTH}"));
        }
        while pos < end {
            let tag = self
                .u16_at(pos, syntax.big_endian)
                .zip(self.u16_at(pos + 2, syntax.big_endian))
                .ok_or("truncated item")?;
            let len = self
                .u32_at(pos + 4, syntax.big_endian)
                .ok_or("truncated item")?;
            if tag == SEQUENCE_END {
                return Ok(pos + 8);
            }
            if tag != ITEM {
                return Err(format!(
                    "({:04X},{:04X}) where a sequence item belongs",
                    tag.0, tag.1
                ));
            }
            let value = pos + 8;
            if len == UNDEFINED {
                if !datasets {
                    return Err("a pixel data fragment of undefined length".into());
                }
                pos = self.elements(value, end, syntax, depth, true)?;
                continue;
            }
            let len = len as usize;
            if len > end.saturating_sub(value) {
                return Err(format!(
                    "an item declares {len} bytes but {} remain",
                    end.saturating_sub(value)
                ));
            }
            if datasets {
                self.elements(value, value + len, syntax, depth, false)?;
            }
            pos = value + len;
        }
        Ok(pos)
    }
}

/// Checks a DICOM Part 10 file (preamble, `DICM`, file meta group, data set): every declared
/// length fits in what encloses it. Ok for what this walk does not read (no `DICM` marker at
/// byte 128, which the ingest's parser then refuses too; a deflated data set).
pub fn check(bytes: &[u8]) -> Result<(), String> {
    if bytes.get(128..132) != Some(b"DICM".as_slice()) {
        return Ok(());
    }
    let meta = Syntax {
        explicit: true,
        big_endian: false,
    };
    let walk = Walk { bytes };
    // The meta group: explicit VR little endian. Parsers read as far as its group length says
    // (whatever the groups inside), then any further group 2 elements.
    let mut pos = 132;
    let mut meta_end = None;
    if walk.u16_at(pos, false) == Some(0x0002)
        && walk.u16_at(pos + 2, false) == Some(0x0000)
        && let Some(len) = walk.u32_at(pos + 8, false)
    {
        meta_end = Some(pos + 12 + len as usize);
        pos += 12;
    }
    let mut transfer_syntax = String::new();
    while meta_end.map_or(walk.u16_at(pos, false) == Some(0x0002), |end| pos < end)
        || walk.u16_at(pos, false) == Some(0x0002)
    {
        let tag = walk
            .u16_at(pos, false)
            .zip(walk.u16_at(pos + 2, false))
            .ok_or("truncated meta element")?;
        let (_, len, header) = walk.header(pos, tag, meta)?;
        let value = pos + header;
        if len == UNDEFINED || len as usize > bytes.len().saturating_sub(value) {
            return Err(format!(
                "meta element ({:04X},{:04X}) declares {len} bytes but {} remain",
                tag.0,
                tag.1,
                bytes.len().saturating_sub(value)
            ));
        }
        if tag == (0x0002, 0x0010) {
            transfer_syntax = String::from_utf8_lossy(&bytes[value..value + len as usize])
                .trim_end_matches(['\0', ' '])
                .to_string();
        }
        pos = value + len as usize;
    }
    let mut syntax = match transfer_syntax.as_str() {
        "1.2.840.10008.1.2" => Syntax {
            explicit: false,
            big_endian: false,
        },
        "1.2.840.10008.1.2.2" => Syntax {
            explicit: true,
            big_endian: true,
        },
        // Deflated: the data set is compressed; the parser inflates it.
        "1.2.840.10008.1.2.1.99" => return Ok(()),
        _ => Syntax {
            explicit: true,
            big_endian: false,
        },
    };
    // Some writers declare explicit VR and write implicit; readers (pydicom, dicom-rs) look.
    let looks_explicit = bytes
        .get(pos + 4..pos + 6)
        .is_none_or(|vr| vr.iter().all(u8::is_ascii_uppercase));
    if syntax.explicit && !syntax.big_endian && !looks_explicit {
        syntax.explicit = false;
    }
    let walk = Walk { bytes };
    walk.elements(pos, bytes.len(), syntax, 0, false)
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data_set: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        let ts = b"1.2.840.10008.1.2.1\0";
        f.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        f.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        f.extend_from_slice(ts);
        f.extend_from_slice(data_set);
        f
    }

    fn element(
        group: u16,
        elem: u16,
        vr: &[u8; 2],
        value: &[u8],
        declared: Option<u32>,
    ) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&group.to_le_bytes());
        e.extend_from_slice(&elem.to_le_bytes());
        e.extend_from_slice(vr);
        let len = declared.unwrap_or(value.len() as u32);
        if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
            e.extend_from_slice(&[0, 0]);
            e.extend_from_slice(&len.to_le_bytes());
        } else {
            e.extend_from_slice(&(len as u16).to_le_bytes());
        }
        e.extend_from_slice(value);
        e
    }

    fn item(content: &[u8], declared: Option<u32>) -> Vec<u8> {
        let mut i = vec![0xFE, 0xFF, 0x00, 0xE0];
        i.extend_from_slice(&declared.unwrap_or(content.len() as u32).to_le_bytes());
        i.extend_from_slice(content);
        i
    }

    #[test]
    fn honest_files_pass_and_lengths_beyond_their_enclosure_are_refused() {
        let name = element(0x0010, 0x0010, b"PN", b"ANON", None);
        let pixels = element(0x7FE0, 0x0010, b"OW", &[0; 8], None);
        assert_eq!(
            check(&file(&[name.clone(), pixels.clone()].concat())),
            Ok(())
        );
        let nested = element(0x0008, 0x1140, b"SQ", &item(&name, None), None);
        assert_eq!(check(&file(&nested)), Ok(()));

        let huge = element(0x7FE0, 0x0010, b"OW", &[0; 8], Some(1 << 30));
        assert!(
            check(&file(&huge))
                .unwrap_err()
                .contains("declares 1073741824 bytes")
        );
        // Inside a sequence whose own length is honest.
        let liar = element(0x0010, 0x0010, b"UT", b"x", Some(0x7FFF_FFFF));
        let hidden = element(0x0008, 0x1140, b"SQ", &item(&liar, None), None);
        assert!(check(&file(&hidden)).is_err());
        // In an item of undefined length, in a sequence of undefined length.
        let mut open = item(&liar, Some(UNDEFINED));
        open.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        open.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let undefined = element(0x0008, 0x1140, b"SQ", &open, Some(UNDEFINED));
        assert!(check(&file(&undefined)).is_err());
    }

    #[test]
    fn the_file_the_fuzzer_found_is_refused_before_the_parser_reserves_a_gibibyte() {
        // Found by `make fuzz` (dicom_ingest): 460 bytes whose OB element declares about 1 GiB;
        // and a file whose meta group length covers an element of another group, so that the
        // data set (with an element of no valid VR, read as UN, 1.4 GiB) starts elsewhere than
        // a walk stopping at the first non-group-2 tag thought.
        for found in [
            include_bytes!("../testdata/fuzz-oom-declared-length.dcm").as_slice(),
            include_bytes!("../testdata/fuzz-oom-meta-group-length.dcm").as_slice(),
            // An SL of 2 bytes: dicom-rs reads no value, loses its place by 2 bytes and reads
            // the next bytes as an element of unknown VR declaring 1.9 GiB.
            include_bytes!("../testdata/fuzz-oom-odd-value-length.dcm").as_slice(),
        ] {
            let e = check(found).unwrap_err();
            assert!(
                e.contains("remain")
                    || e.contains("no valid value representation")
                    || e.contains("not a multiple"),
                "{e}"
            );
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut inner = element(0x0010, 0x0010, b"PN", b"A", None);
        for _ in 0..(MAX_DEPTH + 2) {
            inner = element(0x0008, 0x1140, b"SQ", &item(&inner, None), None);
        }
        assert!(check(&file(&inner)).unwrap_err().contains("deeper"));
    }
}
