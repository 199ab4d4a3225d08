//! COCO captions files (`captions_train2017.json`, `captions_val2014.json`, …): the
//! `{"images": [{"id", "file_name", …}], "annotations": [{"id", "image_id", "caption"}, …]}`
//! layout the COCO API reads, one sample per caption annotation, in the file's annotation order.
//!
//! Other keys (`info`, `licenses`, image sizes, URLs) are ignored. Captions are kept verbatim
//! (COCO's have stray spaces and newlines; whoever tokenizes them decides what to strip). A
//! file that is not shaped like this is an error naming the JSON path that is wrong
//! (`annotations[3].caption: invalid type: null, expected a string`); so are an annotation whose
//! `image_id` no image has, two images with one id, and a caption that is empty or only
//! whitespace, each naming the annotation's index and id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// One caption of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The annotation's `id`.
    pub annotation_id: u64,
    /// The annotation's `image_id` (an `images[].id`).
    pub image_id: u64,
    /// The image's `file_name` under the image folder.
    pub image_path: PathBuf,
    /// The caption, verbatim.
    pub caption: String,
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    annotations: Vec<CocoAnnotation>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoAnnotation {
    id: u64,
    image_id: u64,
    caption: String,
}

/// Reads a COCO captions file: one [`Sample`] per annotation, in annotation order, with
/// `image_path` = `image_dir` (default: the JSON file's folder) joined with the image's
/// `file_name`. Image files are not opened here.
pub fn read_captions(path: &Path, image_dir: Option<&Path>) -> Result<Vec<Sample>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("COCO captions file {} does not exist", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read COCO captions file {}", path.display())),
    };
    let default_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parse_captions(&bytes, image_dir.unwrap_or(default_dir))
        .with_context(|| format!("in COCO captions file {}", path.display()))
}

fn parse_captions(bytes: &[u8], image_dir: &Path) -> Result<Vec<Sample>> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let file: CocoFile = match serde_path_to_error::deserialize(&mut de) {
        Ok(f) => f,
        Err(e) => {
            let at = e.path().to_string();
            let at = if at == "." { "the top level".to_string() } else { format!("`{at}`") };
            bail!("not a COCO captions file: at {at}: {}", e.into_inner());
        }
    };

    let mut files: HashMap<u64, (usize, &str)> = HashMap::with_capacity(file.images.len());
    for (i, image) in file.images.iter().enumerate() {
        if let Some((first, _)) = files.insert(image.id, (i, &image.file_name)) {
            bail!("images[{i}] has id {}, as images[{first}] does: image ids must be unique", image.id);
        }
        if image.file_name.is_empty() {
            bail!("images[{i}] (id {}) has an empty `file_name`", image.id);
        }
    }

    file.annotations
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let Some(&(_, file_name)) = files.get(&a.image_id) else {
                bail!(
                    "annotations[{i}] (id {}) refers to image_id {}, which no entry of `images` has",
                    a.id,
                    a.image_id
                );
            };
            if a.caption.trim().is_empty() {
                bail!("annotations[{i}] (id {}) has an empty caption", a.id);
            }
            Ok(Sample {
                annotation_id: a.id,
                image_id: a.image_id,
                image_path: image_dir.join(file_name),
                caption: a.caption.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("captions.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    fn err(json: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        format!("{:#}", read_captions(&write(dir.path(), json), None).unwrap_err())
    }

    const GOOD: &str = r#"{
        "info": {"year": 2014}, "licenses": [],
        "images": [
            {"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "height": 480, "width": 640},
            {"id": 25, "file_name": "COCO_val2014_000000000025.jpg"}
        ],
        "annotations": [
            {"image_id": 25, "id": 7, "caption": "A giraffe eating leaves from a tree. "},
            {"image_id": 9, "id": 3, "caption": "Closeup of bins of food."},
            {"image_id": 25, "id": 1, "caption": "A tall giraffe\n"}
        ]
    }"#;

    #[test]
    fn reads_samples_in_annotation_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), GOOD);
        let samples = read_captions(&path, None).unwrap();
        let ids: Vec<(u64, u64)> = samples.iter().map(|s| (s.annotation_id, s.image_id)).collect();
        assert_eq!(ids, [(7, 25), (3, 9), (1, 25)]);
        assert_eq!(samples[0].image_path, dir.path().join("COCO_val2014_000000000025.jpg"));
        assert_eq!(samples[0].caption, "A giraffe eating leaves from a tree. ");
        assert_eq!(samples[2].caption, "A tall giraffe\n");

        let elsewhere = Path::new("/data/coco/val2014");
        let samples = read_captions(&path, Some(elsewhere)).unwrap();
        assert_eq!(samples[1].image_path, elsewhere.join("COCO_val2014_000000000009.jpg"));

        let empty = read_captions(&write(dir.path(), r#"{"images": [], "annotations": []}"#), None).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn shape_errors_name_the_json_path() {
        let e = err(r#"{"images": []}"#);
        assert!(e.contains("captions.json") && e.contains("at the top level: missing field `annotations`"), "{e}");
        let e = err(r#"{"annotations": [], "images": {}}"#);
        assert!(e.contains("at `images`: invalid type: map, expected a sequence"), "{e}");
        let e = err(r#"{"images": [{"id": 1, "file_name": "a.jpg"}],
                       "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 1, "caption": null}]}"#);
        assert!(e.contains("at `annotations[1].caption`: invalid type: null, expected a string"), "{e}");
        let e = err(r#"{"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}"#);
        assert!(e.contains("at `images[0].id`: invalid type: string"), "{e}");
        let e = err("not json");
        assert!(e.contains("not a COCO captions file") && e.contains("expected ident"), "{e}");
        let e = format!("{:#}", read_captions(Path::new("/no/such/captions.json"), None).unwrap_err());
        assert!(e.contains("COCO captions file /no/such/captions.json does not exist"), "{e}");
    }

    #[test]
    fn content_errors_name_the_annotation() {
        let e = err(r#"{"images": [{"id": 1, "file_name": "a.jpg"}],
                       "annotations": [{"id": 5, "image_id": 1, "caption": "x"}, {"id": 6, "image_id": 2, "caption": "y"}]}"#);
        assert!(e.contains("annotations[1] (id 6) refers to image_id 2, which no entry of `images` has"), "{e}");
        let e =
            err(r#"{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}"#);
        assert!(e.contains("images[1] has id 1, as images[0] does"), "{e}");
        let e = err(
            r#"{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 9, "image_id": 1, "caption": " \n"}]}"#,
        );
        assert!(e.contains("annotations[0] (id 9) has an empty caption"), "{e}");
    }
}
