//! 16-bit grayscale images and their PNG encoding (the `.png` member of a sample).

use crate::{Error, Result};

/// Most pixels one decoded image (or DICOM frame) may have: 8192 × 8192. Checked from the header,
/// before the pixels are allocated, so a hostile file cannot make a decoder allocate gigabytes.
pub const MAX_PIXELS: u64 = 8192 * 8192;
/// Longest side of a decoded image.
pub const MAX_SIDE: u32 = 65_535;

/// Whether `w` × `h` (× `frames` × `samples` per pixel) is within [`MAX_PIXELS`] per frame.
pub fn check_size(w: u64, h: u64, source_name: &str) -> Result<()> {
    if w == 0 || h == 0 || w > MAX_SIDE as u64 || h > MAX_SIDE as u64 || w * h > MAX_PIXELS {
        return Err(Error::Image {
            source_name: source_name.to_string(),
            reason: format!(
                "{w}x{h} pixels is outside the limits (1 to {MAX_SIDE} per side, {MAX_PIXELS} in all)"
            ),
        });
    }
    Ok(())
}

/// A 16-bit grayscale image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Image16 {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// width × height stored values.
    pub pixels: Vec<u16>,
}

impl Image16 {
    /// Encodes as a 16-bit grayscale PNG.
    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width, self.height);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Sixteen);
            enc.set_compression(png::Compression::Fast);
            let mut w = enc.write_header().expect("writing to a Vec cannot fail");
            let bytes: Vec<u8> = self.pixels.iter().flat_map(|p| p.to_be_bytes()).collect();
            w.write_image_data(&bytes)
                .expect("the buffer has width x height samples");
        }
        out
    }

    /// Decodes a PNG (8- or 16-bit, gray or color; color is converted to luminance, 8-bit values
    /// are kept as 0..255).
    pub fn from_png(data: &[u8], source_name: &str) -> Result<Image16> {
        let err = |reason: String| Error::Image {
            source_name: source_name.to_string(),
            reason,
        };
        // RGBA at 16 bits is 8 bytes a pixel: what the largest allowed image decodes to.
        let limits = png::Limits {
            bytes: (MAX_PIXELS * 8) as usize,
        };
        let mut dec = png::Decoder::new_with_limits(std::io::Cursor::new(data), limits);
        dec.set_transformations(png::Transformations::EXPAND);
        let mut reader = dec.read_info().map_err(|e| err(e.to_string()))?;
        let header = reader.info();
        check_size(header.width as u64, header.height as u64, source_name)?;
        let mut buf = vec![
            0;
            reader
                .output_buffer_size()
                .ok_or_else(|| err("image too large".into()))?
        ];
        let info = reader
            .next_frame(&mut buf)
            .map_err(|e| err(e.to_string()))?;
        let (w, h) = (info.width, info.height);
        let channels = info.color_type.samples();
        let wide = info.bit_depth == png::BitDepth::Sixteen;
        let sample = |i: usize| -> u16 {
            if wide {
                u16::from_be_bytes([buf[2 * i], buf[2 * i + 1]])
            } else {
                buf[i] as u16
            }
        };
        let n = (w * h) as usize;
        let pixels = match (channels, wide) {
            // Grayscale, the common case, in one pass the compiler can vectorise.
            (1, true) => buf[..2 * n]
                .chunks_exact(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .collect(),
            (1, false) => buf[..n].iter().map(|&b| u16::from(b)).collect(),
            _ => Self::samples(n, channels, sample),
        };
        Ok(Image16 {
            width: w,
            height: h,
            pixels,
        })
    }

    /// Luminance (or the gray channel of gray + alpha) of `n` interleaved pixels.
    fn samples(n: usize, channels: usize, sample: impl Fn(usize) -> u16) -> Vec<u16> {
        (0..n)
            .map(|p| match channels {
                1 | 2 => sample(p * channels),
                _ => luminance(
                    sample(p * channels),
                    sample(p * channels + 1),
                    sample(p * channels + 2),
                ),
            })
            .collect()
    }

    /// Decodes a JPEG (8-bit; color converted to luminance).
    pub fn from_jpeg(data: &[u8], source_name: &str) -> Result<Image16> {
        use zune_jpeg::zune_core::colorspace::ColorSpace;
        use zune_jpeg::zune_core::options::DecoderOptions;
        let err = |reason: String| Error::Image {
            source_name: source_name.to_string(),
            reason,
        };
        let opts = DecoderOptions::default()
            .jpeg_set_out_colorspace(ColorSpace::Luma)
            .set_max_width(8192)
            .set_max_height(8192);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(std::io::Cursor::new(data), opts);
        dec.decode_headers().map_err(|e| err(format!("{e:?}")))?;
        if let Some((w, h)) = dec.dimensions() {
            check_size(w as u64, h as u64, source_name)?;
        }
        let px = dec.decode().map_err(|e| err(format!("{e:?}")))?;
        let (w, h) = dec
            .dimensions()
            .ok_or_else(|| err("no dimensions".into()))?;
        Ok(Image16 {
            width: w as u32,
            height: h as u32,
            pixels: px.into_iter().map(u16::from).collect(),
        })
    }
}

fn luminance(r: u16, g: u16, b: u16) -> u16 {
    (0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64).round() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A valid PNG whose header is rewritten to claim `w` × `h` (checksum fixed).
    fn claiming(w: u32, h: u32) -> Vec<u8> {
        let mut png = Image16 {
            width: 2,
            height: 2,
            pixels: vec![1, 2, 3, 4],
        }
        .to_png();
        // Signature (8), IHDR length (4), "IHDR" (4), width, height, ...; CRC after 13 bytes.
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    #[test]
    fn an_image_header_claiming_gigapixels_is_refused_before_decoding() {
        assert_eq!(
            Image16::from_png(&claiming(2, 2), "ok.png").unwrap().width,
            2
        );
        for (w, h) in [(100_000, 100_000), (9000, 9000), (1, 70_000)] {
            let e = Image16::from_png(&claiming(w, h), "bomb.png").unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("bomb.png") && text.contains("outside the limits"),
                "{w}x{h}: {text}"
            );
        }
    }

    #[test]
    fn png_round_trip_is_exact_over_the_full_16_bit_range() {
        let pixels: Vec<u16> = (0..64 * 48)
            .map(|i| ((i * 2654435761u64 as usize) % 65536) as u16)
            .collect();
        let img = Image16 {
            width: 64,
            height: 48,
            pixels,
        };
        let back = Image16::from_png(&img.to_png(), "t").unwrap();
        assert_eq!(back, img);
    }

    #[test]
    fn corrupt_png_error_names_the_source() {
        let err = Image16::from_png(b"\x89PNG\r\n\x1a\nnot really", "a/b.png")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("a/b.png: "), "{err}");
    }
}
