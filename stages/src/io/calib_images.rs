//! The image side of an image-text calibration set (`build-calib` writes it beside the
//! tokens, `score` reads it): per sample the image file, its blake3 and its patch grid,
//! and the images preprocessed again from it with their hashes checked.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::io::image;

/// The `calib_images` file's format tag.
pub const FORMAT: &str = "qpipe.calib-images/1";

/// The images of an image-text calibration set, one per sample (row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibImages {
    pub format: String,
    pub samples: Vec<ImageRef>,
}

/// One sample's image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    pub annotation_id: u64,
    pub image_id: u64,
    /// The image file (relative to the workspace when inside it).
    pub file: String,
    /// blake3 of the file's bytes.
    pub blake3: String,
    /// The patch grid `(t, h, w)` after preprocessing.
    pub grid_thw: [usize; 3],
}

impl CalibImages {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: CalibImages = serde_json::from_slice(&text).with_context(|| {
            format!("{} is not a calibration images file; rebuild it (build-calib)", path.display())
        })?;
        ensure!(v.format == FORMAT, "{}: format `{}`, expected `{FORMAT}`; rebuild it", path.display(), v.format);
        Ok(v)
    }
}

/// The preprocessed image of each sample of `images`, checked against the hashes and grids
/// `build-calib` recorded (`root` resolves relative files).
pub fn load_pixels(
    images: &CalibImages,
    processor: &image::ImageProcessorConfig,
    root: &Path,
) -> Result<Vec<image::Processed>> {
    let mut cache: std::collections::HashMap<&str, image::Processed> = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(images.samples.len());
    for r in &images.samples {
        if let Some(p) = cache.get(r.file.as_str()) {
            out.push(p.clone());
            continue;
        }
        let path = root.join(&r.file);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read image {}", path.display()))?;
        if blake3::hash(&bytes).to_hex().as_str() != r.blake3 {
            bail!(
                "image {} changed after the calibration set was built (annotation {}); run `qpipe build` again so \
                 that build-calib re-reads it",
                path.display(),
                r.annotation_id
            );
        }
        let img = image::load(&path, processor)?;
        let p =
            image::preprocess(&img, processor).with_context(|| format!("preprocessing image {}", path.display()))?;
        ensure!(
            p.grid_thw == r.grid_thw,
            "image {}: grid {:?} now, {:?} when the calibration set was built (a changed preprocessor_config.json?)",
            path.display(),
            p.grid_thw,
            r.grid_thw
        );
        cache.insert(r.file.as_str(), p.clone());
        out.push(p);
    }
    Ok(out)
}
