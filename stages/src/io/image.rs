//! Images for Qwen2-VL / Qwen3-VL: decoding PNG and JPEG files and turning them into the
//! `pixel_values` / `image_grid_thw` the vision tower takes, exactly as transformers' slow
//! image processor does (transformers 5.25: `Qwen2VLImageProcessorPil`, the PIL backend; the
//! torchvision one, `Qwen2VLImageProcessor`, formerly `…Fast`, gives slightly different numbers).
//!
//! | step | what transformers + Pillow do | here |
//! |------|-------------------------------|------|
//! | config | `from_pretrained` reads `preprocessor_config.json`; top-level `min_pixels`/`max_pixels` override `size.shortest_edge`/`size.longest_edge`; `null` means the class default | [`ImageProcessorConfig::from_file`] |
//! | decode | `PIL.Image.open`: libjpeg-turbo (ISLOW IDCT, fancy upsampling), zlib PNG; no EXIF rotation, no ICC/gamma | [`decode`]: `png` crate, `libjpeg-turbo-rs` (a pure-Rust port of libjpeg-turbo) |
//! | to RGB | `convert_to_rgb`: an image with an alpha band or a `transparency` entry is composited onto opaque white (`PIL.Image.alpha_composite`, 7-bit fixed point), others `convert("RGB")` | [`decode`] (same integer formula) |
//! | size | `smart_resize(h, w, patch_size * merge_size, shortest_edge, longest_edge)` | [`smart_resize`] |
//! | resize | `PIL.Image.resize((w, h), resample)`, no `reducing_gap`: separable convolution with coefficients in 22-bit fixed point, each 1-D pass rounded and clipped to uint8; horizontal pass first, or vertical first when the height shrinks by more than twice as many pixels as the width (Pillow 13) | [`resize`] ([`Resample`] 0–5) |
//! | rescale | `(uint8 as float64 * rescale_factor) as float32` | [`preprocess`] |
//! | normalize | `(x - float32(mean)) / float32(std)` in float32 | [`preprocess`] |
//! | patchify | `[C, gh/m, m, P, gw/m, m, P]` → `(gh/m, gw/m, m, m, C, T, P, P)`, the frame repeated `temporal_patch_size` times | [`preprocess`] |
//!
//! Measured against transformers 5.25 / Pillow 13.0 (its bundled libjpeg-turbo): decoded RGB,
//! resized uint8 and `pixel_values` are bit-identical (max abs difference 0) and
//! `image_grid_thw` is the same — on the fixture (`stages/tests/fixtures/images`, 8 images x 2
//! configs, checked by `stages/tests/image_preprocess.rs`), and while developing on: decoding
//! 10 more PNGs (RGBA, LA, L, 1-bit, 2/4-bit palette, tRNS on L/RGB/palette) and 15 JPEGs
//! (baseline, progressive, restart markers, 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, 4:4:1, 4:1:0,
//! grayscale); `preprocess` on 20 images x 7 configs (`do_rescale`/`do_normalize`/`do_resize`
//! off, scalar std, odd rescale factor, T = 3, every filter); 1,500 random `resize` calls
//! (1–700 px, all six filters, up and down). The fast torchvision processor is up to 0.015
//! away from the slow one on the fixture.
//!
//! Not supported (an error that says so): 16-bit PNGs, CMYK/YCCK and 12-bit JPEGs, Pillow's
//! MKS2013/MKS2021 filters, other file formats.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

/// The class defaults of `Qwen2VLImageProcessorPil` (transformers 5.25).
const DEFAULT_MIN_PIXELS: usize = 56 * 56;
const DEFAULT_MAX_PIXELS: usize = 28 * 28 * 1280;
/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// A Pillow resampling filter (`PIL.Image.Resampling`, the integer a `preprocessor_config.json`
/// stores in `resample`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Nearest = 0,
    Lanczos = 1,
    Bilinear = 2,
    Bicubic = 3,
    Box = 4,
    Hamming = 5,
}

impl Resample {
    /// The filter PIL numbers `code`.
    pub fn from_pil(code: i64) -> Result<Self> {
        Ok(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            6 | 7 => bail!(
                "resampling filter {code} (Pillow's {}) is not supported; supported: 0 NEAREST, 1 LANCZOS, \
                 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING",
                if code == 6 { "MKS2013" } else { "MKS2021" }
            ),
            _ => bail!(
                "{code} is not a PIL resampling filter (0 NEAREST, 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING)"
            ),
        })
    }

    /// The filter's support radius and kernel, as Pillow's `Resample.c` defines them (`None` for
    /// NEAREST, which Pillow implements as an affine transform instead).
    fn kernel(self) -> Option<(f64, Kernel)> {
        match self {
            Resample::Nearest => None,
            Resample::Box => Some((0.5, box_filter)),
            Resample::Bilinear => Some((1.0, bilinear_filter)),
            Resample::Hamming => Some((1.0, hamming_filter)),
            Resample::Bicubic => Some((2.0, bicubic_filter)),
            Resample::Lanczos => Some((3.0, lanczos_filter)),
        }
    }
}

/// A 1-D resampling kernel, `x` in input pixels scaled by the filter scale.
type Kernel = fn(f64) -> f64;

/// The settings of transformers' Qwen2-VL image processor (also used by Qwen2.5-VL and
/// Qwen3-VL checkpoints), as read from a checkpoint's `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Spatial patch side `P` of the vision encoder.
    pub patch_size: usize,
    /// Frames per temporal patch `T`; a single image is repeated `T` times.
    pub temporal_patch_size: usize,
    /// Patches merged per side `m`; resized sides are multiples of `P * m`.
    pub merge_size: usize,
    /// The fewest pixels a resized image may have (`size.shortest_edge`, or `min_pixels`).
    /// 0 only when `do_resize` is off and the file gives none.
    pub min_pixels: usize,
    /// The most pixels a resized image may have (`size.longest_edge`, or `max_pixels`).
    /// 0 only when `do_resize` is off and the file gives none.
    pub max_pixels: usize,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// Convert images to RGB (alpha composited onto white) before processing; when off, only
    /// images that are RGB already can be processed (transformers fails on the others).
    pub do_convert_rgb: bool,
    pub resample: Resample,
}

impl Default for ImageProcessorConfig {
    /// transformers' class defaults (Qwen2-VL's values).
    fn default() -> Self {
        ImageProcessorConfig {
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: DEFAULT_MIN_PIXELS,
            max_pixels: DEFAULT_MAX_PIXELS,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            do_convert_rgb: true,
            resample: Resample::Bicubic,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads a checkpoint's `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{}: not found: the checkpoint has no preprocessor_config.json, and images need it (it holds \
                 the patch size, pixel limits and normalization the vision tower was trained with); copy it \
                 from the model's original repository into the checkpoint folder",
                path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the text of a `preprocessor_config.json`; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).with_context(|| format!("{origin}: not valid JSON"))?;
        let Value::Object(obj) = value else { bail!("{origin}: expected a JSON object at the top level") };
        Self::from_json(&obj).map_err(|e| anyhow::anyhow!("{origin}: {e:#}"))
    }

    /// Reads the fields transformers' `Qwen2VLImageProcessorPil.__init__` takes; others are ignored.
    fn from_json(obj: &Map<String, Value>) -> Result<Self> {
        let d = ImageProcessorConfig::default();
        let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let positive = |k: &str, default: usize| -> Result<usize> {
            match field(k) {
                None => Ok(default),
                Some(v) => positive_int(v).with_context(|| format!("field `{k}`")),
            }
        };
        let boolean = |k: &str, default: bool| -> Result<bool> {
            match field(k) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => bail!("field `{k}`: expected true or false, found {}", describe(v)),
            }
        };
        let triple = |k: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match field(k) {
                None => Ok(default),
                Some(v) => per_channel(v).with_context(|| format!("field `{k}`")),
            }
        };

        // `size` replaces the default {shortest_edge, longest_edge} dict as a whole; then
        // `min_pixels` / `max_pixels`, when set, override its two entries.
        let (mut shortest, mut longest) = match field("size") {
            None => (Some(DEFAULT_MIN_PIXELS), Some(DEFAULT_MAX_PIXELS)),
            Some(Value::Object(size)) => {
                let entry = |k: &str| -> Result<Option<usize>> {
                    match size.get(k).filter(|v| !v.is_null()) {
                        None => Ok(None),
                        Some(v) => positive_int(v).map(Some).with_context(|| format!("field `size.{k}`")),
                    }
                };
                (entry("shortest_edge")?, entry("longest_edge")?)
            }
            // transformers turns an integer `size` into {"shortest_edge": size}.
            Some(v @ Value::Number(_)) => (Some(positive_int(v).context("field `size`")?), None),
            Some(v) => bail!(
                "field `size`: expected an object {{\"shortest_edge\": …, \"longest_edge\": …}}, found {}",
                describe(v)
            ),
        };
        if let Some(v) = field("min_pixels") {
            shortest = Some(positive_int(v).context("field `min_pixels`")?);
        }
        if let Some(v) = field("max_pixels") {
            longest = Some(positive_int(v).context("field `max_pixels`")?);
        }

        let rescale_factor = match field("rescale_factor") {
            None => d.rescale_factor,
            Some(v) => v
                .as_f64()
                .with_context(|| format!("field `rescale_factor`: expected a number, found {}", describe(v)))?,
        };
        let resample = match field("resample") {
            None => d.resample,
            Some(v) => {
                let code = v.as_i64().with_context(|| {
                    format!("field `resample`: expected an integer (PIL filter), found {}", describe(v))
                })?;
                Resample::from_pil(code).context("field `resample`")?
            }
        };
        let do_resize = boolean("do_resize", d.do_resize)?;
        if do_resize {
            ensure!(
                shortest.is_some() && longest.is_some(),
                "the pixel limits are incomplete: Qwen2-VL's processor needs both `size.shortest_edge` and \
                 `size.longest_edge` (or `min_pixels` and `max_pixels`), found {}",
                match (shortest, longest) {
                    (None, None) => "neither".to_string(),
                    (Some(_), None) => "only the minimum".to_string(),
                    _ => "only the maximum".to_string(),
                }
            );
        }
        Ok(ImageProcessorConfig {
            patch_size: positive("patch_size", d.patch_size)?,
            temporal_patch_size: positive("temporal_patch_size", d.temporal_patch_size)?,
            merge_size: positive("merge_size", d.merge_size)?,
            min_pixels: shortest.unwrap_or(0),
            max_pixels: longest.unwrap_or(0),
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
            do_resize,
            do_rescale: boolean("do_rescale", d.do_rescale)?,
            rescale_factor,
            do_normalize: boolean("do_normalize", d.do_normalize)?,
            do_convert_rgb: boolean("do_convert_rgb", d.do_convert_rgb)?,
            resample,
        })
    }

    /// The side multiple resized images have: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

fn describe(v: &Value) -> String {
    let text = v.to_string();
    let text =
        if text.chars().count() > 40 { format!("{}…", text.chars().take(40).collect::<String>()) } else { text };
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{kind} ({text})")
}

fn positive_int(v: &Value) -> Result<usize> {
    match v.as_u64() {
        Some(n) if n > 0 => usize::try_from(n).context("too large"),
        _ => bail!("expected a positive integer, found {}", describe(v)),
    }
}

/// A number for all three channels, or a list of three.
fn per_channel(v: &Value) -> Result<[f64; 3]> {
    if let Some(x) = v.as_f64() {
        return Ok([x; 3]);
    }
    let items = v.as_array().with_context(|| format!("expected a number or a list of 3, found {}", describe(v)))?;
    ensure!(items.len() == 3, "expected 3 values (one per RGB channel), found {}", items.len());
    let mut out = [0.0; 3];
    for (o, item) in out.iter_mut().zip(items) {
        *o = item.as_f64().with_context(|| format!("expected numbers, found {}", describe(item)))?;
    }
    Ok(out)
}

/// An 8-bit RGB image, rows top to bottom, pixels `[r, g, b]` left to right (numpy's `HWC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, pixels: Vec<u8>) -> Result<Self> {
        ensure!(width > 0 && height > 0, "an image needs at least one pixel, got {width}x{height}");
        ensure!(
            pixels.len() == width * height * 3,
            "a {width}x{height} RGB image has {} bytes, got {}",
            width * height * 3,
            pixels.len()
        );
        Ok(RgbImage { width, height, pixels })
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// What a file held before conversion to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Three colour channels, no alpha, no transparency entry: PIL mode "RGB".
    Rgb,
    /// Anything [`convert_to_rgb`] had to convert (grayscale, palette, alpha, tRNS).
    Converted(&'static str),
}

/// Decodes a PNG or JPEG file to RGB the way transformers prepares it for the processor:
/// `PIL.Image.open` then `convert_to_rgb` (grayscale and palette expanded, alpha or a tRNS
/// transparency composited onto opaque white). EXIF orientation is not applied (as
/// `Image.open`; transformers' `load_image` for a path would apply it). The format is told by
/// the file's first bytes, not its name.
pub fn decode(path: &Path) -> Result<RgbImage> {
    Ok(decode_file(path)?.0)
}

/// [`decode`], honouring `cfg.do_convert_rgb`: when it is off, transformers takes the pixels as
/// they are, and only RGB images work; the others are an error here.
pub fn load(path: &Path, cfg: &ImageProcessorConfig) -> Result<RgbImage> {
    let (image, source) = decode_file(path)?;
    if let (false, Source::Converted(what)) = (cfg.do_convert_rgb, source) {
        bail!(
            "image {} is {what}, and the checkpoint's preprocessor_config.json sets `do_convert_rgb` to false: \
             transformers would not convert it to RGB and fails on it; convert the file to 8-bit RGB",
            path.display()
        );
    }
    Ok(image)
}

fn decode_file(path: &Path) -> Result<(RgbImage, Source)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("image {} does not exist", path.display()),
        Err(e) => return Err(e).with_context(|| format!("cannot read image {}", path.display())),
    };
    decode_bytes(&bytes).with_context(|| format!("cannot decode image {}", path.display()))
}

fn decode_bytes(bytes: &[u8]) -> Result<(RgbImage, Source)> {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.starts_with(PNG) {
        decode_png(bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        decode_jpeg(bytes)
    } else {
        let what = match bytes {
            [] => "the file is empty".to_string(),
            [b'G', b'I', b'F', b'8', ..] => "it is a GIF".to_string(),
            [b'B', b'M', ..] => "it is a BMP".to_string(),
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => "it is a WebP".to_string(),
            [b'I', b'I', 42, 0, ..] | [b'M', b'M', 0, 42, ..] => "it is a TIFF".to_string(),
            _ => "its first bytes are neither PNG's nor JPEG's signature".to_string(),
        };
        bail!("unsupported format: only PNG and JPEG are read, and {what}")
    }
}

fn decode_png(bytes: &[u8]) -> Result<(RgbImage, Source)> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    // Palette → RGB(A), 1/2/4-bit gray scaled to 8 bits (PIL: mode "1", "L"), tRNS → alpha.
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().context("not a valid PNG")?;
    let info = reader.info();
    if info.bit_depth == png::BitDepth::Sixteen {
        bail!("unsupported: 16-bit PNG (only 8-bit and lower bit depths are read)");
    }
    let source = match (info.color_type, info.trns.is_some()) {
        (png::ColorType::Rgb, false) => Source::Rgb,
        (png::ColorType::Rgb, true) => Source::Converted("RGB with a tRNS transparent colour"),
        (png::ColorType::Rgba, _) => Source::Converted("RGBA"),
        (png::ColorType::Grayscale, false) => Source::Converted("grayscale"),
        (png::ColorType::Grayscale, true) => Source::Converted("grayscale with a tRNS transparent value"),
        (png::ColorType::GrayscaleAlpha, _) => Source::Converted("grayscale with alpha"),
        (png::ColorType::Indexed, false) => Source::Converted("palette-based"),
        (png::ColorType::Indexed, true) => Source::Converted("palette-based with transparency"),
    };
    let size = reader.output_buffer_size().context("image too large")?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).context("corrupt or truncated PNG data")?;
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    ensure!(frame.bit_depth == png::BitDepth::Eight, "unexpected {:?}-bit output", frame.bit_depth);
    let mut rgb = Vec::with_capacity(width * height * 3);
    for row in buf.chunks_exact(frame.line_size).take(height) {
        for px in row[..width * channels].chunks_exact(channels) {
            match channels {
                1 => rgb.extend_from_slice(&[px[0]; 3]),
                2 => rgb.extend_from_slice(&[over_white(px[0], px[1]); 3]),
                3 => rgb.extend_from_slice(px),
                _ => rgb.extend_from_slice(&[px[0], px[1], px[2]].map(|c| over_white(c, px[3]))),
            }
        }
    }
    Ok((RgbImage::new(width, height, rgb)?, source))
}

/// One channel of `PIL.Image.alpha_composite(white, image)` (Pillow's `AlphaComposite.c`: the
/// blend weights in 7-bit fixed point, divisions by 255 done as `(x + (x >> 8)) >> 8`).
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (c, a, dst) = (u32::from(c), u32::from(a), 255u32);
    let out_a255 = a * 255 + 255 * (255 - a); // destination alpha is 255
    let coef1 = a * 255 * 255 * (1 << BITS) / out_a255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let t = c * coef1 + dst * coef2 + (0x80 << BITS);
    ((((t >> 8) + t) >> 8) >> BITS) as u8
}

fn decode_jpeg(bytes: &[u8]) -> Result<(RgbImage, Source)> {
    use libjpeg_turbo_rs::{ColorSpace, Decoder, PixelFormat};
    let decoder = Decoder::new(bytes).map_err(|e| anyhow::anyhow!("not a valid JPEG: {e}"))?;
    let precision = decoder.header().precision;
    ensure!(precision == 8, "unsupported: {precision}-bit JPEG (only 8-bit samples are read)");
    let source = match decoder.jpeg_color_space() {
        ColorSpace::YCbCr | ColorSpace::Rgb => Source::Rgb,
        ColorSpace::Grayscale => Source::Converted("grayscale"),
        ColorSpace::Cmyk => bail!("unsupported: CMYK JPEG (only grayscale and YCbCr/RGB JPEGs are read)"),
        ColorSpace::Ycck => bail!("unsupported: YCCK JPEG (only grayscale and YCbCr/RGB JPEGs are read)"),
        other => bail!("unsupported: JPEG colour space {other:?} (only grayscale and YCbCr/RGB JPEGs are read)"),
    };
    drop(decoder);
    // libjpeg's defaults, as Pillow leaves them: ISLOW IDCT, fancy upsampling; grayscale → RGB
    // replicates the channel, as PIL's convert("RGB") does.
    let img = Decoder::decode_to(bytes, PixelFormat::Rgb).map_err(|e| anyhow::anyhow!("corrupt JPEG data: {e}"))?;
    ensure!(img.data.len() == img.width * img.height * 3, "the JPEG decoder returned a short buffer");
    Ok((RgbImage::new(img.width, img.height, img.data)?, source))
}

/// transformers' `smart_resize`: the `(height, width)` nearest `(height, width)` whose sides are
/// multiples of `factor` and whose area is within `[min_pixels, max_pixels]`, keeping the aspect
/// ratio (Python's float64 arithmetic, `round` half to even, `floor`/`ceil`). Errors, as
/// transformers does, for an aspect ratio over 200.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    ensure!(height > 0 && width > 0, "cannot resize an empty ({width}x{height}) image");
    ensure!(factor > 0, "the resize factor must be positive");
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        // `{:?}` writes 201.0 as Python does.
        bail!("absolute aspect ratio must be smaller than 200, got {ratio:?} (image {width}x{height})");
    }
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    let area = (height * width) as f64;
    if h_bar * w_bar > max_pixels {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        return 1.0;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let x = x * std::f64::consts::PI;
    // Pillow writes the constants as C floats (0.54f, 0.46f).
    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Fixed-point bits of Pillow's 8-bit convolution coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output pixel, the
/// first input pixel and the integer weights of the input pixels it reads.
struct Coeffs {
    ksize: usize,
    /// `(first input index, count)` per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output pixel (zeros past `count`).
    weights: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize, support: f64, filter: Kernel) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) conversion truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (out, &kx) in row.iter_mut().zip(&k).take(xmax) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let scaled = kx * f64::from(1u32 << PRECISION_BITS);
            *out = if kx < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { ksize, bounds, weights }
}

/// Pillow's `clip8`: the accumulator (with its rounding half already added) to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((width, height), resample)` of an RGB image, bit for bit (Pillow 13,
/// `reducing_gap=None`). The convolution filters run as two 1-D passes, each rounding and
/// clipping to uint8: horizontal then vertical, except that Pillow 13 runs the vertical pass
/// first when the height shrinks by more than twice as many pixels as the width does
/// (`in_h - out_h > 2 * (in_w - out_w)`); a pass whose side keeps its size is skipped. NEAREST is
/// Pillow's affine scale. The same size returns a copy.
pub fn resize(img: &RgbImage, width: usize, height: usize, resample: Resample) -> Result<RgbImage> {
    ensure!(width > 0 && height > 0, "cannot resize to {width}x{height}: height and width must be > 0");
    if (width, height) == (img.width, img.height) {
        return Ok(img.clone());
    }
    let Some((support, filter)) = resample.kernel() else {
        return Ok(resize_nearest(img, width, height));
    };
    let vert = coeffs(img.height, height, support, filter);
    let (in_w, in_h) = (img.width as i64, img.height as i64);
    let vertical_first = height < img.height && in_h - height as i64 > 2 * (in_w - width as i64);
    let pixels = if width == img.width {
        vertical_pass(&img.pixels, img.width, 0, &vert)
    } else if height == img.height {
        horizontal_pass(&img.pixels, img.width, 0..img.height, &coeffs(img.width, width, support, filter))
    } else if vertical_first {
        let tall = vertical_pass(&img.pixels, img.width, 0, &vert);
        horizontal_pass(&tall, img.width, 0..height, &coeffs(img.width, width, support, filter))
    } else {
        // Only the input rows the vertical pass reads.
        let first = vert.bounds[0].0;
        let last = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
        let wide = horizontal_pass(&img.pixels, img.width, first..last, &coeffs(img.width, width, support, filter));
        vertical_pass(&wide, width, first, &vert)
    };
    RgbImage::new(width, height, pixels)
}

/// Pillow's `ImagingResampleHorizontal_8bpc` over `rows` of an RGB image `src_w` pixels wide.
fn horizontal_pass(src: &[u8], src_w: usize, rows: std::ops::Range<usize>, k: &Coeffs) -> Vec<u8> {
    let out_w = k.bounds.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (out_row, y) in out.chunks_exact_mut(out_w * 3).zip(rows) {
        let in_row = &src[y * src_w * 3..][..src_w * 3];
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = k.bounds[xx];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &w) in k.weights[xx * k.ksize..][..n].iter().enumerate() {
                let p = &in_row[(xmin + x) * 3..][..3];
                for c in 0..3 {
                    acc[c] += i32::from(p[c]) * w;
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// Pillow's `ImagingResampleVertical_8bpc` of an RGB image `w` pixels wide whose first row is
/// input row `row_offset`.
fn vertical_pass(src: &[u8], w: usize, row_offset: usize, k: &Coeffs) -> Vec<u8> {
    let out_h = k.bounds.len();
    let mut out = vec![0u8; out_h * w * 3];
    for (yy, out_row) in out.chunks_exact_mut(w * 3).enumerate() {
        let (ymin, n) = k.bounds[yy];
        let weights = &k.weights[yy * k.ksize..][..n];
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut acc = 1i32 << (PRECISION_BITS - 1);
            for (y, &wt) in weights.iter().enumerate() {
                acc += i32::from(src[(ymin + y - row_offset) * w * 3 + i]) * wt;
            }
            *o = clip8(acc);
        }
    }
    out
}

/// Pillow's NEAREST resize (`ImagingScaleAffine`): source coordinate `(x + 0.5) * in/out`,
/// accumulated in float64, truncated.
fn resize_nearest(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let positions = |in_size: usize, out_size: usize| -> Vec<usize> {
        let step = in_size as f64 / out_size as f64;
        let mut pos = step * 0.5;
        (0..out_size)
            .map(|_| {
                let i = (pos as usize).min(in_size - 1);
                pos += step;
                i
            })
            .collect()
    };
    let (xs, ys) = (positions(img.width, width), positions(img.height, height));
    let mut out = Vec::with_capacity(width * height * 3);
    for &y in &ys {
        for &x in &xs {
            out.extend_from_slice(&img.pixels[(y * img.width + x) * 3..][..3]);
        }
    }
    RgbImage { width, height, pixels: out }
}

/// The image the processor resizes `img` to: `smart_resize` of its size with
/// `cfg.factor()` and the pixel limits, by `cfg.resample` (`img` itself when `do_resize` is off).
pub fn resized(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<RgbImage> {
    if !cfg.do_resize {
        return Ok(img.clone());
    }
    let (h, w) = smart_resize(img.height, img.width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    resize(img, w, h, cfg.resample)
}

/// One image as the vision tower takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// `image_grid_thw`: `[1, grid_h, grid_w]`, in patches.
    pub grid_thw: [usize; 3],
    /// `pixel_values`, row-major `[grid_t * grid_h * grid_w, 3 * temporal_patch_size *
    /// patch_size * patch_size]` float32; rows in merge-window order (see [`preprocess`]).
    pub pixel_values: Vec<f32>,
}

impl Processed {
    /// Rows of `pixel_values`: one per patch.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Columns of `pixel_values`: `3 * temporal_patch_size * patch_size^2`.
    pub fn patch_dim(&self) -> usize {
        self.pixel_values.len() / self.num_patches().max(1)
    }
}

/// `Qwen2VLImageProcessorPil` on one RGB image: [`resized`], then per byte value
/// `v` and channel `c` (float64 then float32 as transformers' numpy code):
/// `x = f32(f64(v) * rescale_factor)` if `do_rescale`, then `(x - f32(mean[c])) / f32(std[c])`
/// in float32 if `do_normalize`; then the patch layout of `_preprocess`:
/// row `((bh * gw/m + bw) * m + mh) * m + mw`, column `((c * T + t) * P + ph) * P + pw` holds
/// pixel `(y, x) = ((bh * m + mh) * P + ph, (bw * m + mw) * P + pw)` of channel `c`, the same
/// for every frame `t < T`.
pub fn preprocess(img: &RgbImage, cfg: &ImageProcessorConfig) -> Result<Processed> {
    let img = resized(img, cfg)?;
    let (p, m, t_len) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    ensure!(
        img.height % (p * m) == 0 && img.width % (p * m) == 0,
        "a {}x{} image cannot be cut into {p}x{p} patches merged {m}x{m} (sides must be multiples of {}); \
         transformers fails the same way when `do_resize` is off",
        img.width,
        img.height,
        p * m
    );
    let (gh, gw) = (img.height / p, img.width / p);

    // Each output value depends only on (channel, byte): a 3 x 256 table.
    let mut table = [[0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        let (mean, std) = (cfg.image_mean[c] as f32, cfg.image_std[c] as f32);
        for (v, out) in row.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale { (v as f64 * cfg.rescale_factor) as f32 } else { v as f32 };
            if cfg.do_normalize {
                x = (x - mean) / std;
            }
            *out = x;
        }
    }

    let patch_dim = 3 * t_len * p * p;
    let mut values = vec![0f32; gh * gw * patch_dim];
    let mut rows = values.chunks_exact_mut(patch_dim);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let row = rows.next().expect("one row per patch");
                    let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                    for (c, lut) in table.iter().enumerate() {
                        let frame = &mut row[c * t_len * p * p..][..t_len * p * p];
                        let (first, rest) = frame.split_at_mut(p * p);
                        for ph in 0..p {
                            let src = &img.pixels[((y0 + ph) * img.width + x0) * 3 + c..];
                            for (pw, out) in first[ph * p..(ph + 1) * p].iter_mut().enumerate() {
                                *out = lut[usize::from(src[pw * 3])];
                            }
                        }
                        for copy in rest.chunks_exact_mut(p * p) {
                            copy.copy_from_slice(first);
                        }
                    }
                }
            }
        }
    }
    Ok(Processed { grid_thw: [1, gh, gw], pixel_values: values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers() {
        // Values from transformers 5.25's smart_resize.
        let cases = [
            // (h, w, factor, min, max) -> (h, w)
            ((91, 37, 16, 1024, 16384), (96, 32)),
            ((45, 120, 16, 1024, 16384), (48, 128)),
            ((160, 200, 16, 1024, 16384), (112, 128)),
            ((23, 19, 16, 1024, 16384), (48, 32)),
            ((251, 317, 32, 4096, 65536), (224, 256)),
            ((23, 19, 32, 4096, 65536), (96, 64)),
            ((480, 640, 28, 3136, 1003520), (476, 644)),
            ((1080, 1920, 28, 3136, 1003520), (728, 1316)),
            ((8, 8, 28, 3136, 1003520), (56, 56)),
            ((24, 40, 16, 1, 1 << 30), (32, 32)), // 1.5 and 2.5 round half to even
            ((2, 400, 28, 3136, 1003520), (28, 812)),
            ((1, 200, 28, 3136, 1003520), (28, 812)),
            ((42, 14, 28, 3136, 1003520), (112, 56)),
            ((3000, 4000, 28, 3136, 1003520), (840, 1148)),
            ((14, 14, 28, 1, 1_000_000_000), (28, 28)), // rounds to 0x0, then the min branch
        ];
        for ((h, w, f, lo, hi), want) in cases {
            assert_eq!(smart_resize(h, w, f, lo, hi).unwrap(), want, "smart_resize({h}, {w}, {f}, {lo}, {hi})");
        }
        let err = smart_resize(1, 201, 28, 3136, 1003520).unwrap_err().to_string();
        assert!(err.contains("absolute aspect ratio must be smaller than 200, got 201.0"), "{err}");
        assert!(smart_resize(1, 200, 28, 3136, 1003520).is_ok());
    }

    #[test]
    fn alpha_composite_onto_white_matches_pillow() {
        // (c, a) -> PIL.Image.alpha_composite(white, (c, c, c, a)).convert("RGB")
        for ((c, a), want) in [((0, 0), 255), ((0, 255), 0), ((200, 255), 200), ((0, 128), 127), ((100, 1), 254)] {
            assert_eq!(over_white(c, a), want, "c={c} a={a}");
        }
        for c in 0..=255u8 {
            assert_eq!(over_white(c, 255), c);
        }
    }

    #[test]
    fn config_defaults_precedence_and_errors() {
        let cfg = ImageProcessorConfig::from_json_str("{}", "p.json").unwrap();
        assert_eq!(cfg, ImageProcessorConfig::default());
        let cfg = ImageProcessorConfig::from_json_str(
            r#"{"size": {"shortest_edge": 10, "longest_edge": 1000}, "min_pixels": 20, "patch_size": 16,
                "image_mean": 0.5, "image_std": [0.5, 0.5, 0.5], "resample": 2, "merge_size": null}"#,
            "p.json",
        )
        .unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels, cfg.patch_size, cfg.merge_size), (20, 1000, 16, 2));
        assert_eq!((cfg.image_mean, cfg.resample), ([0.5; 3], Resample::Bilinear));

        let err = |json: &str| ImageProcessorConfig::from_json_str(json, "ckpt/preprocessor_config.json").unwrap_err();
        let e = format!("{:#}", err(r#"{"patch_size": "16"}"#));
        assert!(e.starts_with("ckpt/preprocessor_config.json: field `patch_size`: expected a positive integer"), "{e}");
        let e = format!("{:#}", err(r#"{"patch_size": 16.0}"#));
        assert!(e.contains("field `patch_size`: expected a positive integer, found a float (16.0)"), "{e}");
        let e = format!("{:#}", err(r#"{"resample": 7}"#));
        assert!(e.contains("field `resample`: resampling filter 7 (Pillow's MKS2021) is not supported"), "{e}");
        let e = format!("{:#}", err(r#"{"size": {"min_pixels": 1, "max_pixels": 2}}"#));
        assert!(e.contains("needs both `size.shortest_edge` and `size.longest_edge`"), "{e}");
        assert!(ImageProcessorConfig::from_json_str(
            r#"{"size": {"min_pixels": 1}, "min_pixels": 5, "max_pixels": 9}"#,
            "p"
        )
        .is_ok());
        let e = format!("{:#}", err(r#"{"image_std": [1, 2]}"#));
        assert!(e.contains("field `image_std`: expected 3 values"), "{e}");
        let e = format!("{:#}", err(r#"{"do_resize": 1}"#));
        assert!(e.contains("field `do_resize`: expected true or false"), "{e}");
        let e = format!("{:#}", err("[1]"));
        assert!(e.contains("expected a JSON object"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let e =
            format!("{:#}", ImageProcessorConfig::from_file(&dir.path().join("preprocessor_config.json")).unwrap_err());
        assert!(e.contains("the checkpoint has no preprocessor_config.json, and images need it"), "{e}");
    }

    /// A 2x3 image through resize (to 4x6, identity-sized channels checked by hand) and patchify.
    #[test]
    fn tiny_image_through_the_whole_path() {
        // 4x4 RGB: r = 16 * x, g = 16 * y, b = 7.
        let px: Vec<u8> = (0..4).flat_map(|y| (0..4).flat_map(move |x| [16 * x, 16 * y, 7])).collect();
        let img = RgbImage::new(4, 4, px).unwrap();
        let cfg = ImageProcessorConfig {
            patch_size: 1,
            merge_size: 2,
            temporal_patch_size: 2,
            min_pixels: 1,
            max_pixels: 1 << 20,
            image_mean: [0.5, 0.25, 0.0],
            image_std: [0.5, 0.5, 2.0],
            ..ImageProcessorConfig::default()
        };
        let out = preprocess(&img, &cfg).unwrap();
        assert_eq!(out.grid_thw, [1, 4, 4]);
        assert_eq!((out.num_patches(), out.patch_dim()), (16, 6));
        let value = |c: usize, v: u8| {
            let x = (f64::from(v) * (1.0 / 255.0)) as f32;
            (x - cfg.image_mean[c] as f32) / cfg.image_std[c] as f32
        };
        // Row 3 is merge window (0, 0), position (mh, mw) = (1, 1): pixel (y, x) = (1, 1).
        let row = &out.pixel_values[3 * 6..4 * 6];
        assert_eq!(row, [value(0, 16), value(0, 16), value(1, 16), value(1, 16), value(2, 7), value(2, 7)]);
        // Row 4 starts window (0, 1): pixel (0, 2).
        assert_eq!(out.pixel_values[4 * 6], value(0, 32));

        // Upscaling 4x4 -> 8x8 (min_pixels 64) keeps a constant channel constant and the
        // ramp monotonic; bicubic overshoot is clipped.
        let cfg = ImageProcessorConfig { min_pixels: 64, ..cfg };
        let big = resized(&img, &cfg).unwrap();
        assert_eq!((big.width, big.height), (8, 8));
        assert!((0..8).all(|y| (0..8).all(|x| big.pixel(x, y)[2] == 7)));
        assert!((0..7).all(|x| big.pixel(x, 3)[0] <= big.pixel(x + 1, 3)[0]));
        assert_eq!(preprocess(&img, &cfg).unwrap().grid_thw, [1, 8, 8]);

        // Without resizing, sides must already be multiples of patch * merge.
        let odd = RgbImage::new(3, 2, vec![0; 18]).unwrap();
        let cfg = ImageProcessorConfig { do_resize: false, ..cfg };
        let e = preprocess(&odd, &cfg).unwrap_err().to_string();
        assert!(e.contains("cannot be cut into 1x1 patches merged 2x2"), "{e}");
    }

    #[test]
    fn decode_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jpg");
        let e = format!("{:#}", decode(&missing).unwrap_err());
        assert!(e.contains("nope.jpg does not exist"), "{e}");
        let gif = dir.path().join("a.png");
        std::fs::write(&gif, b"GIF89a....").unwrap();
        let e = format!("{:#}", decode(&gif).unwrap_err());
        assert!(e.contains("a.png") && e.contains("unsupported format") && e.contains("GIF"), "{e}");
        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, [0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J']).unwrap();
        let e = format!("{:#}", decode(&bad).unwrap_err());
        assert!(e.contains("cannot decode image") && e.contains("bad.jpg") && e.contains("JPEG"), "{e}");
    }
}
