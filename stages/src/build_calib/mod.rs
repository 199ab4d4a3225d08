//! `build-calib`: tokenizes captions with the checkpoint's tokenizer into a
//! torch-loadable `.pt` calibration set.
//!
//! Deps (plan order): the captions file, the `fetch-model` identity JSON, and for local
//! checkpoints `tokenizer.json` and `tokenizer_config.json` (otherwise they are found
//! through the `checkpoint` locator). Params: `max_samples`, `max_length`,
//! `padding_side` (`left`), `truncation_side` (`right`).
//!
//! Captions are the first `max_samples` lines that are not blank, each without its line
//! ending (fewer when the file has fewer: a note says so; none is an error). They are
//! tokenized as transformers' `tokenizer(captions, padding="max_length", truncation=True,
//! max_length=T)` does (special tokens added as the tokenizer's post-processor says),
//! padded with the `pad_token` of `tokenizer_config.json`. The `.pt` holds int64
//! tensors `input_ids` [N,T], `attention_mask` [N,T] (1 = token, 0 = pad), `labels` [N,T]
//! (= input_ids) and `pad_token_id` [1]. [`crate::io::calib::load_calib`] reads it back.

pub mod images;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::io::calib::CalibSet;
use crate::io::checkpoint;
use crate::io::torch_pt;
use qpipe_contract::{DepSpec, Instance, Job, OutSpec, Stage};

/// The `build-calib` stage.
pub struct BuildCalib;

impl Stage for BuildCalib {
    fn kind(&self) -> &'static str {
        "build-calib"
    }
    fn code_version(&self) -> &'static str {
        env!("QPIPE_CODE_BUILD_CALIB")
    }
    fn run(&self, job: &Job<'_>) -> anyhow::Result<()> {
        let out = job.out("calib")?;
        let params = Params::from_json(job.params).with_context(|| format!("stage `{}`", job.id))?;
        let (captions_path, fetch_json) = (job.dep("captions")?, job.dep("identity")?);
        let vocab_size = model_vocab_size(fetch_json)?;
        let tok_dir = || -> Result<PathBuf> {
            let loc = job.locators.get("checkpoint").context("no `checkpoint` locator")?;
            checkpoint::resolve_dir(job.root, loc)
        };
        // A local checkpoint's tokenizer files are deps (keyed); a hub checkpoint's are
        // found through the locator (keyed through the identity).
        let find = |dep: &str, file: &str| -> Result<PathBuf> {
            match job.dep_opt(dep) {
                Some(p) => Ok(p.to_path_buf()),
                None => Ok(tok_dir()?.join(file)),
            }
        };
        let tokenizer_json = find("tokenizer", "tokenizer.json")?;
        let tokenizer_config = find("tokenizer_config", "tokenizer_config.json")?;

        if params.image_text {
            let tok = CalibTokenizer::load(&tokenizer_json, &tokenizer_config, vocab_size)?;
            let processor = crate::io::image::ImageProcessorConfig::from_file(&find(
                "preprocessor_config",
                "preprocessor_config.json",
            )?)?;
            let image_dir = job.locators.get("image_dir").and_then(Value::as_str).map(|d| job.root.join(d));
            let (set, imgs) =
                images::encode(&tok, captions_path, image_dir.as_deref(), &processor, &params, job.root, job.progress)?;
            let grids: Vec<i64> = imgs.samples.iter().flat_map(|r| r.grid_thw.map(|g| g as i64)).collect();
            let mut pt = set.to_pt()?;
            if let torch_pt::Value::Dict(items) = &mut pt {
                items.push(("image_grid_thw".into(), torch_pt::Tensor::from_i64(&[set.n, 3], &grids)?.into()));
            }
            torch_pt::write(out, &pt)?;
            let text = serde_json::to_string_pretty(&imgs)? + "\n";
            let path = job.out("calib_images")?;
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            return Ok(());
        }
        job.progress.phase("tokenizing captions", None);
        let captions = match params.held_out_after {
            Some(first) => {
                let all = read_captions(captions_path, usize::MAX)?;
                ensure!(
                    all.len() >= first + params.max_samples,
                    "{} has {} captions: holding out the last {} for validation, apart from the first {} used for \
                     calibration, needs {}; add captions or lower `recipe.holdout_samples`",
                    captions_path.display(),
                    all.len(),
                    params.max_samples,
                    first,
                    first + params.max_samples
                );
                all[all.len() - params.max_samples..].to_vec()
            }
            None => read_captions(captions_path, params.max_samples)?,
        };
        if captions.len() < params.max_samples {
            job.progress.note(&format!(
                "warning: {} has {} non-blank lines, fewer than the {} samples asked for; using {}",
                captions_path.display(),
                captions.len(),
                params.max_samples,
                captions.len()
            ));
        }
        let tok = CalibTokenizer::load(&tokenizer_json, &tokenizer_config, vocab_size)?;
        let set = tok.encode(&captions, &params)?;
        torch_pt::write(out, &set.to_pt()?)?;
        Ok(())
    }
}

/// build-calib's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub max_samples: usize,
    pub max_length: usize,
    /// Pad on the left (`true`, the pipeline's setting) or the right.
    pub pad_left: bool,
    /// Drop tokens past `max_length` from the right (`true`, the pipeline's setting) or the left.
    pub truncate_right: bool,
    /// Held-out captions (the `recipe` stage's validation set): the *last* `max_samples`
    /// captions of the file, none of them among its first `held_out_after` (the
    /// calibration ones). `None`: the first `max_samples`.
    pub held_out_after: Option<usize>,
    /// Image-text samples from a COCO captions file ([`images`]) rather than caption lines.
    pub image_text: bool,
}

impl Params {
    /// The pipeline's tokenization: left padding, right truncation.
    pub fn pipeline(max_samples: usize, max_length: usize) -> Self {
        Self { max_samples, max_length, pad_left: true, truncate_right: true, held_out_after: None, image_text: false }
    }

    fn to_json(&self) -> Value {
        let side = |left: bool| if left { "left" } else { "right" };
        let mut v = json!({
            "max_samples": self.max_samples,
            "max_length": self.max_length,
            "padding_side": side(self.pad_left),
            "truncation_side": side(!self.truncate_right),
        });
        if let Some(m) = self.held_out_after {
            v["held_out_after"] = json!(m);
        }
        if self.image_text {
            v["samples"] = json!("coco_captions");
        }
        v
    }
}

/// What a `build-calib` instance reads and where it writes.
pub struct CalibFiles<'a> {
    /// The captions file (dep `captions`).
    pub captions: &'a Path,
    /// The `fetch-model` identity of the checkpoint (dep `identity`).
    pub identity: &'a Path,
    /// A local checkpoint's `tokenizer.json` and `tokenizer_config.json` (deps `tokenizer`,
    /// `tokenizer_config`), when it has them; otherwise they are found through the
    /// `checkpoint` locator.
    pub tokenizer: Option<&'a Path>,
    pub tokenizer_config: Option<&'a Path>,
    /// Where the tokens go (out `calib`).
    pub out: &'a Path,
    /// Image-text calibration: a local checkpoint's `preprocessor_config.json` (dep
    /// `preprocessor_config`, else found through the locator), every image file the samples
    /// use (deps `image:<k>`), and where the image references go (out `calib_images`).
    pub images: Option<ImageFiles<'a>>,
}

/// The image side of an image-text `build-calib` instance.
pub struct ImageFiles<'a> {
    pub preprocessor_config: Option<&'a Path>,
    pub files: &'a [PathBuf],
    pub out: &'a Path,
}

/// The `build-calib` instance `id`.
pub fn instance(id: String, params: &Params, files: &CalibFiles<'_>, locators: Value) -> Instance {
    let mut deps = vec![DepSpec::new("captions", files.captions), DepSpec::new("identity", files.identity)];
    deps.extend(files.tokenizer.map(|p| DepSpec::new("tokenizer", p)));
    deps.extend(files.tokenizer_config.map(|p| DepSpec::new("tokenizer_config", p)));
    let mut outs = vec![OutSpec::intermediate("calib", files.out)];
    if let Some(im) = &files.images {
        deps.extend(im.preprocessor_config.map(|p| DepSpec::new("preprocessor_config", p)));
        deps.extend(im.files.iter().enumerate().map(|(k, p)| DepSpec::new(format!("image:{k}"), p)));
        outs.push(OutSpec::intermediate("calib_images", im.out));
    }
    Instance {
        id,
        kind: "build-calib".into(),
        params: params.to_json(),
        locators,
        deps,
        outs,
        description: match params.held_out_after {
            None if params.image_text => format!(
                "read {} images and tokenize {} captions × {} tokens",
                files.images.as_ref().map_or(0, |i| i.files.len()),
                params.max_samples,
                params.max_length
            ),
            Some(_) => {
                format!("tokenize the last {} captions × {} tokens (held out)", params.max_samples, params.max_length)
            }
            None => format!("tokenize {} captions × {} tokens", params.max_samples, params.max_length),
        },
    }
}

impl Params {
    pub fn from_json(v: &Value) -> Result<Self> {
        let num = |k: &str| -> Result<usize> {
            let n = v.get(k).and_then(Value::as_u64).with_context(|| format!("parameter `{k}` is not a number"))?;
            ensure!(n > 0, "parameter `{k}` must be at least 1");
            Ok(n as usize)
        };
        let side = |k: &str, default: &str| -> Result<bool> {
            match v.get(k).and_then(Value::as_str).unwrap_or(default) {
                "left" => Ok(true),
                "right" => Ok(false),
                other => bail!("parameter `{k}`: `{other}` is not a side (valid: left, right)"),
            }
        };
        Ok(Self {
            max_samples: num("max_samples")?,
            max_length: num("max_length")?,
            pad_left: side("padding_side", "left")?,
            truncate_right: !side("truncation_side", "right")?,
            held_out_after: match v.get("held_out_after") {
                None | Some(Value::Null) => None,
                Some(x) => Some(x.as_u64().context("parameter `held_out_after` is not a number")? as usize),
            },
            image_text: match v.get("samples").and_then(Value::as_str) {
                None => false,
                Some("coco_captions") => true,
                Some(other) => bail!("parameter `samples`: `{other}` (valid: coco_captions)"),
            },
        })
    }
}

/// The first `max` non-blank lines of a captions file, without line endings.
pub fn read_captions(path: &Path, max: usize) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read captions file {}", path.display()))?;
    let captions: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .take(max)
        .map(String::from)
        .collect();
    if captions.is_empty() {
        bail!("captions file {} is empty (no non-blank lines); put one caption per line in it", path.display());
    }
    Ok(captions)
}

fn model_vocab_size(fetch_json: &Path) -> Result<usize> {
    let text = std::fs::read(fetch_json).with_context(|| format!("cannot read {}", fetch_json.display()))?;
    let v: Value = serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", fetch_json.display()))?;
    v.pointer("/summary/vocab_size")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .with_context(|| format!("{} has no summary.vocab_size; re-run fetch-model", fetch_json.display()))
}

/// A checkpoint's tokenizer with its pad token, checked against the model's vocabulary.
pub struct CalibTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    pad_token: String,
    vocab_size: usize,
    source: PathBuf,
}

impl CalibTokenizer {
    /// Loads `tokenizer.json` and the pad token named by `tokenizer_config.json`. Errors
    /// when there is no pad token, or when the tokenizer's ids do not fit a model
    /// vocabulary of `vocab_size` (the tokenizer belongs to another model).
    pub fn load(tokenizer_json: &Path, tokenizer_config: &Path, vocab_size: usize) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot load tokenizer {}", tokenizer_json.display()))?;
        let n = tokenizer.get_vocab_size(true);
        if n > vocab_size {
            bail!(
                "tokenizer {} has {n} tokens but the model's vocabulary (config.json vocab_size) has {vocab_size}: \
                 the tokenizer does not belong to this checkpoint — use the checkpoint's own tokenizer.json",
                tokenizer_json.display()
            );
        }
        let config: Value = match std::fs::read(tokenizer_config) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not valid JSON", tokenizer_config.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", tokenizer_config.display())),
        };
        let pad_token = match config.get("pad_token") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let Some(pad_token) = pad_token else {
            bail!(
                "tokenizer has no pad token: {} sets no `pad_token` (left padding needs one); add \
                 `\"pad_token\": \"<token>\"` naming a token of {}",
                tokenizer_config.display(),
                tokenizer_json.display()
            );
        };
        let pad_id = tokenizer.token_to_id(&pad_token).with_context(|| {
            format!(
                "{}: pad_token `{pad_token}` is not a token of {}",
                tokenizer_config.display(),
                tokenizer_json.display()
            )
        })?;
        Ok(Self { tokenizer, pad_id, pad_token, vocab_size, source: tokenizer_json.to_path_buf() })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of a token (a special one such as `<|image_pad|>`), if the tokenizer has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The ids of `text` with no special tokens, no truncation and no padding, checked
    /// against the model's vocabulary.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let mut tok = self.tokenizer.clone();
        tok.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
        tok.with_padding(None);
        let e = tok
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("tokenizing with {} failed", self.source.display()))?;
        if let Some(&bad) = e.get_ids().iter().find(|&&id| id as usize >= self.vocab_size) {
            bail!(
                "tokenizer {} gives id {bad}, outside the model's vocabulary of {}",
                self.source.display(),
                self.vocab_size
            );
        }
        Ok(e.get_ids().to_vec())
    }

    /// Tokenizes, truncates and pads `captions` to `params.max_length`.
    pub fn encode(&self, captions: &[String], params: &Params) -> Result<CalibSet> {
        let mut tok = self.tokenizer.clone();
        let t = params.max_length;
        tok.with_truncation(Some(TruncationParams {
            max_length: t,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: if params.truncate_right { TruncationDirection::Right } else { TruncationDirection::Left },
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(t),
            direction: if params.pad_left { PaddingDirection::Left } else { PaddingDirection::Right },
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let inputs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encodings = tok
            .encode_batch(inputs, true)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("tokenizing with {} failed", self.source.display()))?;
        let n = encodings.len();
        let mut set = CalibSet {
            n,
            t,
            input_ids: Vec::with_capacity(n * t),
            attention_mask: Vec::with_capacity(n * t),
            labels: Vec::with_capacity(n * t),
            pad_token_id: self.pad_id,
        };
        for (i, e) in encodings.iter().enumerate() {
            ensure!(e.get_ids().len() == t, "caption {} encoded to {} tokens, not {t}", i + 1, e.get_ids().len());
            if let Some(&bad) = e.get_ids().iter().find(|&&id| id as usize >= self.vocab_size) {
                bail!(
                    "tokenizer {} gives id {bad} for caption {}, outside the model's vocabulary of {}",
                    self.source.display(),
                    i + 1,
                    self.vocab_size
                );
            }
            set.input_ids.extend_from_slice(e.get_ids());
            set.attention_mask.extend_from_slice(e.get_attention_mask());
            set.labels.extend(e.get_ids().iter().map(|&id| i64::from(id)));
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::calib::load_calib;
    use candle_core::Device;
    use qpipe_contract::{JobFile, Progress, Silent};
    use serde_json::json;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }
    fn ckpt() -> PathBuf {
        root().join("models/tiny_qwen3_vl/checkpoint")
    }
    fn fixture() -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calib_tiny_ids.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }

    /// Collects notes.
    struct Notes(std::sync::Mutex<Vec<String>>);
    impl Progress for Notes {
        fn phase(&self, _: &str, _: Option<u64>) {}
        fn advance(&self, _: u64) {}
        fn note(&self, m: &str) {
            self.0.lock().unwrap().push(m.to_string());
        }
    }

    /// Writes the fetch-model identity of the tiny checkpoint into `dir`.
    fn fetch_json(dir: &Path) -> PathBuf {
        let info = checkpoint::check_dir(&ckpt()).unwrap();
        let id = crate::fetch_model::identity(&ckpt(), &info, json!({"source": "local"}), &Silent).unwrap();
        let p = dir.join("fetch.json");
        std::fs::write(&p, id.to_string()).unwrap();
        p
    }

    fn run(captions: &Path, n: usize, t: usize, tok_dir: &Path, progress: &dyn Progress) -> Result<PathBuf> {
        let dir = captions.parent().unwrap();
        let out = dir.join("calib.pt");
        let deps = [
            JobFile::new("captions", captions),
            JobFile::new("identity", fetch_json(dir)),
            JobFile::new("tokenizer", tok_dir.join("tokenizer.json")),
            JobFile::new("tokenizer_config", tok_dir.join("tokenizer_config.json")),
        ];
        let job = Job {
            id: "build-calib@t",
            root: &root(),
            params: &json!({"max_samples": n, "max_length": t, "padding_side": "left", "truncation_side": "right"}),
            locators: &json!({"checkpoint": {"source": "local", "path": "models/tiny_qwen3_vl/checkpoint"}}),
            deps: &deps,
            outs: &[JobFile::new("calib", &out)],
            final_outs: &[JobFile::new("calib", "tmp/calib.pt")],
            progress,
        };
        BuildCalib.run(&job)?;
        Ok(out)
    }

    #[test]
    fn ids_match_transformers() {
        let fx = fixture();
        let n = fx["max_samples"].as_u64().unwrap() as usize;
        let t = fx["max_length"].as_u64().unwrap() as usize;
        // The stage reads the project's captions file itself.
        let dir = tempfile::tempdir().unwrap();
        let captions = dir.path().join("captions.txt");
        std::fs::copy(root().join(fx["captions_path"].as_str().unwrap()), &captions).unwrap();
        assert_eq!(
            read_captions(&captions, n).unwrap(),
            serde_json::from_value::<Vec<String>>(fx["captions"].clone()).unwrap()
        );
        let pt = run(&captions, n, t, &ckpt(), &Silent).unwrap();
        let set = load_calib(&pt).unwrap();
        assert_eq!((set.n, set.t), (n, t));
        let rows =
            |v: &[u32]| v.chunks(t).map(|r| r.iter().map(|&x| i64::from(x)).collect()).collect::<Vec<Vec<i64>>>();
        let want_ids: Vec<Vec<i64>> = serde_json::from_value(fx["input_ids"].clone()).unwrap();
        let want_mask: Vec<Vec<i64>> = serde_json::from_value(fx["attention_mask"].clone()).unwrap();
        assert_eq!(rows(&set.input_ids), want_ids);
        assert_eq!(rows(&set.attention_mask), want_mask);
        assert_eq!(set.labels, set.input_ids.iter().map(|&x| i64::from(x)).collect::<Vec<_>>());
        assert_eq!(i64::from(set.pad_token_id), fx["pad_token_id"].as_i64().unwrap());
        // Same inputs, same bytes.
        let again = std::fs::read(&pt).unwrap();
        run(&captions, n, t, &ckpt(), &Silent).unwrap();
        assert_eq!(std::fs::read(&pt).unwrap(), again);
    }

    /// Every caption of the project's file, at the pipeline's length, against
    /// transformers itself (skips loudly without python3 + transformers).
    #[test]
    fn ids_match_transformers_on_every_caption() {
        let probe = std::process::Command::new("python3").args(["-c", "import transformers"]).output();
        if !probe.is_ok_and(|o| o.status.success()) {
            eprintln!("SKIP: python3 with transformers is not available; full-file tokenizer check not run");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let captions = dir.path().join("captions.txt");
        std::fs::copy(root().join("data/calibration/captions.txt"), &captions).unwrap();
        let (n, t) = (10_000, 32);
        let set = load_calib(&run(&captions, n, t, &ckpt(), &Silent).unwrap()).unwrap();
        let code = r#"
import sys, json
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.padding_side, tok.truncation_side = "left", "right"
lines = [l.rstrip("\r\n") for l in open(sys.argv[2], encoding="utf-8").read().splitlines(keepends=True)]
caps = [l for l in lines if l.strip()]
enc = tok(caps, padding="max_length", truncation=True, max_length=int(sys.argv[3]))
print(json.dumps([enc["input_ids"], enc["attention_mask"]]))
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", code])
            .arg(ckpt())
            .arg(&captions)
            .arg(t.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (ids, mask): (Vec<Vec<u32>>, Vec<Vec<u32>>) = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(set.n, ids.len());
        assert!(set.n > 500, "the whole file: {}", set.n);
        assert_eq!(set.input_ids, ids.concat());
        assert_eq!(set.attention_mask, mask.concat());
    }

    #[test]
    fn torch_opens_the_calibration_file() {
        let dir = tempfile::tempdir().unwrap();
        let captions = dir.path().join("c.txt");
        std::fs::write(&captions, "a dog\r\n\n  \nA cat on a mat.\n").unwrap();
        let pt = run(&captions, 8, 6, &ckpt(), &Silent).unwrap();
        let set = load_calib(&pt).unwrap();
        assert_eq!((set.n, set.t), (2, 6));
        let code = r#"
import sys, torch
d = torch.load(sys.argv[1], weights_only=True)
assert list(d) == ["input_ids", "attention_mask", "labels", "pad_token_id"], list(d)
for k in d: assert d[k].dtype == torch.int64, k
assert d["input_ids"].shape == (2, 6) and torch.equal(d["labels"], d["input_ids"])
assert d["pad_token_id"].tolist() == [0]
m = d["attention_mask"]
assert m[0, 0] == 0 and m[:, -1].tolist() == [1, 1], "left padding"
print("OK", d["input_ids"].tolist(), m.tolist())
"#;
        let Some(out) = crate::io::torch_pt::python_torch(code, &[pt.as_os_str()]) else { return };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && stdout.contains("OK"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let ids: Vec<Vec<i64>> = set.input_ids.chunks(6).map(|r| r.iter().map(|&x| x.into()).collect()).collect();
        assert!(stdout.contains(&format!("{ids:?}").replace(' ', "").replace(',', ", ")), "{stdout} vs {ids:?}");
    }

    #[test]
    fn short_files_warn_and_empty_files_fail() {
        let dir = tempfile::tempdir().unwrap();
        let captions = dir.path().join("c.txt");
        std::fs::write(&captions, "one\ntwo").unwrap();
        let notes = Notes(Default::default());
        let set = load_calib(&run(&captions, 5, 4, &ckpt(), &notes).unwrap()).unwrap();
        assert_eq!(set.n, 2);
        let notes = notes.0.into_inner().unwrap();
        assert!(notes.iter().any(|n| n.starts_with("warning:") && n.contains("fewer than the 5")), "{notes:?}");

        std::fs::write(&captions, "\n  \r\n").unwrap();
        let e = format!("{:#}", run(&captions, 5, 4, &ckpt(), &Silent).unwrap_err());
        assert!(e.contains("captions file") && e.contains("c.txt") && e.contains("is empty"), "{e}");
    }

    #[test]
    fn bad_tokenizers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let captions = dir.path().join("c.txt");
        std::fs::write(&captions, "a dog\n").unwrap();
        let tok = tempfile::tempdir().unwrap();
        std::fs::copy(ckpt().join("tokenizer.json"), tok.path().join("tokenizer.json")).unwrap();

        // No pad token.
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(ckpt().join("tokenizer_config.json")).unwrap()).unwrap();
        cfg["pad_token"] = Value::Null;
        std::fs::write(tok.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let e = format!("{:#}", run(&captions, 1, 4, tok.path(), &Silent).unwrap_err());
        assert!(e.contains("tokenizer has no pad token") && e.contains("tokenizer_config.json"), "{e}");

        // A pad token the tokenizer does not know.
        cfg["pad_token"] = json!({"content": "<pad>"});
        std::fs::write(tok.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let e = format!("{:#}", run(&captions, 1, 4, tok.path(), &Silent).unwrap_err());
        assert!(e.contains("pad_token `<pad>` is not a token"), "{e}");

        // A tokenizer with more tokens than the model has embeddings.
        cfg["pad_token"] = json!("<|endoftext|>");
        std::fs::write(tok.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let mut tj: Value = serde_json::from_slice(&std::fs::read(ckpt().join("tokenizer.json")).unwrap()).unwrap();
        tj["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": 600, "content": "<|extra|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        std::fs::write(tok.path().join("tokenizer.json"), tj.to_string()).unwrap();
        let e = format!("{:#}", run(&captions, 1, 4, tok.path(), &Silent).unwrap_err());
        assert!(e.contains("does not belong to this checkpoint") && e.contains("vocab_size) has 516"), "{e}");
    }

    #[test]
    fn calib_sets_slice_into_batches_and_tensors() {
        let tok =
            CalibTokenizer::load(&ckpt().join("tokenizer.json"), &ckpt().join("tokenizer_config.json"), 516).unwrap();
        let params = Params::from_json(&json!({"max_samples": 3, "max_length": 5})).unwrap();
        assert!(params.pad_left && params.truncate_right);
        let caps: Vec<String> = ["a", "b c d e f g h", "c"].iter().map(|s| s.to_string()).collect();
        let set = tok.encode(&caps, &params).unwrap();
        let b = set.slice(1..3);
        assert_eq!((b.n, b.t), (2, 5));
        assert_eq!(b.input_ids, set.input_ids[5..15]);
        let ids = b.input_ids_tensor(&Device::Cpu).unwrap();
        assert_eq!(ids.dims(), [2, 5]);
        assert_eq!(ids.dtype(), candle_core::DType::U32);
        assert_eq!(b.attention_mask_tensor(&Device::Cpu).unwrap().to_vec2::<u32>().unwrap()[0], [1, 1, 1, 1, 1]);
        assert_eq!(b.labels_tensor(&Device::Cpu).unwrap().dtype(), candle_core::DType::I64);
        let right = Params { pad_left: false, ..params };
        assert_eq!(tok.encode(&caps, &right).unwrap().attention_mask[..5], [1, 0, 0, 0, 0]);
        let e = Params::from_json(&json!({"max_samples": 3, "max_length": 5, "padding_side": "top"})).unwrap_err();
        assert!(e.to_string().contains("`top` is not a side"));
    }
}
