//! Image-text calibration (`dataset.coco_captions`): one sample per COCO annotation, in
//! the file's order — the annotation's image and its caption.
//!
//! Tokens per sample: `<|vision_start|>` + n × `<|image_pad|>` + `<|vision_end|>` + the
//! caption's tokens (no special tokens added), n = t·h·w / merge² for the image's patch
//! grid `(t, h, w)` after `Qwen2VLImageProcessor`'s smart resize
//! ([`crate::io::image`], configured by the checkpoint's `preprocessor_config.json`); left
//! padding to `max_length`, truncation on the right (of the caption: image tokens that
//! alone do not fit are an error). Labels are the input ids with the pads and the three
//! vision tokens set to −100 (the loss is the mean causal-LM cross-entropy over the rest).
//!
//! Besides the `.pt` (which also gets `image_grid_thw` [N, 3]), `build-calib` writes
//! `calib_images`: per sample the image file, its blake3 and its grid
//! ([`CalibImages`]). `score` preprocesses the images again from it (checking each file's
//! hash) instead of reading megabytes of pixels per sample out of an intermediate.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::{CalibTokenizer, Params};
use crate::io::calib::CalibSet;
pub use crate::io::calib_images::{load_pixels, CalibImages, ImageRef, FORMAT};
use crate::io::{coco, image};

/// The three vision tokens' ids in a tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct VisionTokens {
    pub start: u32,
    pub end: u32,
    pub image_pad: u32,
}

impl VisionTokens {
    pub fn of(tok: &CalibTokenizer) -> Result<Self> {
        let id = |t: &str| {
            tok.token_id(t).with_context(|| {
                format!(
                    "tokenizer {} has no `{t}` token: image-text calibration needs a Qwen-VL tokenizer with \
                     <|vision_start|>, <|image_pad|> and <|vision_end|>",
                    tok.source().display()
                )
            })
        };
        Ok(VisionTokens { start: id("<|vision_start|>")?, end: id("<|vision_end|>")?, image_pad: id("<|image_pad|>")? })
    }
}

/// The image files of the first `n` samples of a COCO captions file, each once, in order
/// of first use (what a `build-calib` instance reads besides the captions file).
pub fn image_files(captions: &Path, image_dir: Option<&Path>, n: usize) -> Result<Vec<PathBuf>> {
    let samples = coco::read_captions(captions, image_dir)?;
    let mut seen = std::collections::HashSet::new();
    Ok(samples.into_iter().take(n).map(|s| s.image_path).filter(|p| seen.insert(p.clone())).collect())
}

/// Tokens and image references of the first `params.max_samples` samples of `captions`.
pub fn encode(
    tok: &CalibTokenizer,
    captions: &Path,
    image_dir: Option<&Path>,
    processor: &image::ImageProcessorConfig,
    params: &Params,
    root: &Path,
    progress: &dyn qpipe_contract::Progress,
) -> Result<(CalibSet, CalibImages)> {
    ensure!(
        params.pad_left && params.truncate_right,
        "image-text calibration pads on the left and truncates on the right"
    );
    ensure!(params.held_out_after.is_none(), "held-out image-text calibration sets are not supported");
    let vt = VisionTokens::of(tok)?;
    let mut samples = coco::read_captions(captions, image_dir)?;
    if samples.len() < params.max_samples {
        progress.note(&format!(
            "warning: {} has {} annotations, fewer than the {} samples asked for; using {}",
            captions.display(),
            samples.len(),
            params.max_samples,
            samples.len()
        ));
    }
    samples.truncate(params.max_samples);
    let t = params.max_length;
    let merge2 = processor.merge_size * processor.merge_size;
    let n = samples.len();
    let mut set = CalibSet {
        n,
        t,
        input_ids: Vec::with_capacity(n * t),
        attention_mask: Vec::with_capacity(n * t),
        labels: Vec::with_capacity(n * t),
        pad_token_id: tok.pad_id(),
    };
    let mut refs = Vec::with_capacity(n);
    // Each image once (COCO has several captions per image).
    let mut done: std::collections::HashMap<PathBuf, (String, [usize; 3])> = std::collections::HashMap::new();
    progress.phase("reading images and tokenizing captions", Some(n as u64));
    for (i, s) in samples.iter().enumerate() {
        let what = || format!("{}: annotation {} (id {})", captions.display(), i, s.annotation_id);
        let (hash, grid) = match done.get(&s.image_path) {
            Some(v) => v.clone(),
            None => {
                let bytes = std::fs::read(&s.image_path)
                    .with_context(|| format!("cannot read image {}", s.image_path.display()))
                    .with_context(what)?;
                let img = image::load(&s.image_path, processor).with_context(what)?;
                let p = image::preprocess(&img, processor)
                    .with_context(|| format!("preprocessing image {}", s.image_path.display()))
                    .with_context(what)?;
                let v = (blake3::hash(&bytes).to_hex().to_string(), p.grid_thw);
                done.insert(s.image_path.clone(), v.clone());
                v
            }
        };
        let tokens = grid[0] * grid[1] * grid[2] / merge2;
        if tokens + 2 > t {
            bail!(
                "{}: its image {} makes {tokens} image tokens (+2 vision tokens), more than `dataset.calib_seq_len` = \
                 {t}; raise calib_seq_len or lower the preprocessor's max_pixels",
                what(),
                s.image_path.display()
            );
        }
        let mut ids = Vec::with_capacity(t);
        ids.push(vt.start);
        ids.extend(std::iter::repeat_n(vt.image_pad, tokens));
        ids.push(vt.end);
        ids.extend(tok.encode_plain(&s.caption).with_context(what)?);
        ids.truncate(t);
        let pads = t - ids.len();
        for (k, &id) in std::iter::repeat_n(&tok.pad_id(), pads).chain(&ids).enumerate() {
            set.input_ids.push(id);
            let real = k >= pads;
            set.attention_mask.push(u32::from(real));
            let ignored = !real || id == vt.start || id == vt.end || id == vt.image_pad;
            set.labels.push(if ignored { -100 } else { i64::from(id) });
        }
        refs.push(ImageRef {
            annotation_id: s.annotation_id,
            image_id: s.image_id,
            file: workspace_relative(root, &s.image_path),
            blake3: hash,
            grid_thw: grid,
        });
        progress.advance(1);
    }
    Ok((set, CalibImages { format: FORMAT.into(), samples: refs }))
}

fn workspace_relative(root: &Path, p: &Path) -> String {
    let abs = if p.is_absolute() { p.to_path_buf() } else { root.join(p) };
    match abs.strip_prefix(root) {
        Ok(r) => r.to_string_lossy().replace('\\', "/"),
        Err(_) => abs.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qpipe_contract::Silent;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    fn ckpt() -> PathBuf {
        root().join("models/tiny_qwen3_vl/checkpoint")
    }

    fn tok(dir: &Path) -> CalibTokenizer {
        CalibTokenizer::load(&dir.join("tokenizer.json"), &ckpt().join("tokenizer_config.json"), 516).unwrap()
    }

    fn processor() -> image::ImageProcessorConfig {
        image::ImageProcessorConfig::from_file(&ckpt().join("preprocessor_config.json")).unwrap()
    }

    fn encode_with(t: &CalibTokenizer, n: usize, len: usize) -> Result<(CalibSet, CalibImages)> {
        let coco = root().join("data/coco/captions_tiny.json");
        let images = root().join("data/coco/images");
        encode(t, &coco, Some(&images), &processor(), &Params::pipeline(n, len), &root(), &Silent)
    }

    #[test]
    fn samples_are_vision_tokens_then_the_caption_left_padded() {
        let t = tok(&ckpt());
        let vt = VisionTokens::of(&t).unwrap();
        let (set, imgs) = encode_with(&t, 4, 128).unwrap();
        assert_eq!((set.n, set.t, imgs.samples.len()), (4, 128, 4));
        for (i, r) in imgs.samples.iter().enumerate() {
            let row = &set.input_ids[i * 128..(i + 1) * 128];
            let mask = &set.attention_mask[i * 128..(i + 1) * 128];
            let labels = &set.labels[i * 128..(i + 1) * 128];
            let first = mask.iter().position(|&m| m == 1).unwrap();
            assert!(row[..first].iter().all(|&x| x == t.pad_id()));
            let n = r.grid_thw.iter().product::<usize>() / 4;
            assert_eq!(row[first], vt.start);
            assert!(row[first + 1..first + 1 + n].iter().all(|&x| x == vt.image_pad));
            assert_eq!(row[first + 1 + n], vt.end);
            assert!(first + 2 + n < 128, "a caption follows");
            // labels: -100 at pads and vision tokens, the ids elsewhere
            for (k, &label) in labels.iter().enumerate() {
                let ignored = k < first + 2 + n;
                assert_eq!(label == -100, ignored, "row {i} position {k}");
            }
            assert_eq!(r.blake3.len(), 64);
            assert!(r.file.starts_with("data/coco/images/"), "{}", r.file);
        }
        // What score reads back: the same grids, the hashes checked.
        let pixels = load_pixels(&imgs, &processor(), &root()).unwrap();
        assert_eq!(pixels[0].grid_thw, imgs.samples[0].grid_thw);
    }

    #[test]
    fn bad_inputs_name_what_is_wrong() {
        let t = tok(&ckpt());
        // Image tokens alone longer than the sequence.
        let e = format!("{:#}", encode_with(&t, 4, 8).unwrap_err());
        assert!(e.contains("calib_seq_len") && e.contains("annotation 0"), "{e}");
        // A tokenizer without the vision tokens.
        let dir = tempfile::tempdir().unwrap();
        let mut tj: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ckpt().join("tokenizer.json")).unwrap()).unwrap();
        tj["added_tokens"].as_array_mut().unwrap().retain(|a| !a["content"].as_str().unwrap().contains("vision"));
        std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
        let e = format!("{:#}", encode_with(&tok(dir.path()), 4, 128).unwrap_err());
        assert!(e.contains("<|vision_start|>") && e.contains("Qwen-VL tokenizer"), "{e}");
        // A checkpoint without preprocessor_config.json.
        let e = format!(
            "{:#}",
            image::ImageProcessorConfig::from_file(&dir.path().join("preprocessor_config.json")).unwrap_err()
        );
        assert!(e.contains("preprocessor_config.json"), "{e}");
        // An image that changed after the calibration set was built.
        let (_, mut imgs) = encode_with(&t, 1, 128).unwrap();
        imgs.samples[0].blake3 = "0".repeat(64);
        let e = format!("{:#}", load_pixels(&imgs, &processor(), &root()).unwrap_err());
        assert!(e.contains("changed after the calibration set was built"), "{e}");
    }
}
