//! The file formats the stages read and write, shared by several of them:
//!
//! | module         | what it reads or writes |
//! |----------------|-------------------------|
//! | [`calib`]      | calibration tokens (`build-calib` writes them, `score` reads them) |
//! | [`checkpoint`] | finding, checking and identifying checkpoints (a local folder or the hub cache) |
//! | [`torch_pt`]   | `torch.load`-able `.pt` files (calibration tokens, AutoQuant states) |
//! | [`pyjson`]     | JSON and numbers formatted exactly as Python formats them |

pub mod calib;
pub mod checkpoint;
pub mod pyjson;
pub mod torch_pt;
