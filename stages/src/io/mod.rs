//! The file formats the stages read and write, shared by several of them:
//!
//! | module         | what it reads or writes |
//! |----------------|-------------------------|
//! | [`calib`]      | calibration tokens (`build-calib` writes them, `score` reads them) |
//! | [`calib_images`] | the images of an image-text calibration set (file, hash, grid per sample) |
//! | [`checkpoint`] | finding, checking and identifying checkpoints (a local folder or the hub cache) |
//! | [`coco`]       | COCO captions files (`images[]`, `annotations[]`): image-text calibration samples |
//! | [`image`]      | PNG/JPEG decoding and Qwen2-VL's image preprocessing (`preprocessor_config.json`) |
//! | [`torch_pt`]   | `torch.load`-able `.pt` files (calibration tokens, AutoQuant states) |
//! | [`pyjson`]     | JSON and numbers formatted exactly as Python formats them |

pub mod calib;
pub mod calib_images;
pub mod checkpoint;
pub mod coco;
pub mod image;
pub mod pyjson;
pub mod torch_pt;
