//! Any bytes as a PNG or a JPEG sample image: decoded within the pixel limits, or an error.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(img) = radfm_data::Image16::from_png(data, "fuzz.png") {
        assert_eq!(img.pixels.len() as u64, img.width as u64 * img.height as u64);
        assert!(img.pixels.len() as u64 <= radfm_data::image16::MAX_PIXELS);
    }
    if let Ok(img) = radfm_data::Image16::from_jpeg(data, "fuzz.jpg") {
        assert_eq!(img.pixels.len() as u64, img.width as u64 * img.height as u64);
    }
});
