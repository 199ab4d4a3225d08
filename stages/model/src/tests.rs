//! Parity and gradient tests of the model on the committed tiny checkpoint against the
//! transformers outputs in `stages/model/tests/fixtures/model_tiny_expected.safetensors`
//! (made by `scripts/make_model_fixture.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::*;

fn ckpt() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny_qwen3_vl/checkpoint")
}

fn fixture() -> HashMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model_tiny_expected.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>().unwrap().into_iter().map(|r| r.into_iter().map(|x| x as u32).collect()).collect()
}

fn fixture_batch(f: &HashMap<String, Tensor>) -> Batch {
    Batch::new(rows(&f["input_ids"]), rows(&f["attention_mask"])).unwrap()
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m.max(1e-30)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn hidden_logits_loss_match_transformers() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let pad = 0u32;
    for (attn, key) in [(AttnImpl::Sdpa, "hidden_sdpa"), (AttnImpl::Eager, "hidden_eager")] {
        let m = TextModel::load(&ckpt()).unwrap().with_attn_impl(attn);
        let h = m.forward_hidden(&batch, &mut NoTap).unwrap();
        let r = rel(&h, &f[key]);
        eprintln!("{key}: rel diff {r:.3e}");
        assert!(r <= 1e-5, "{key}: relative difference {r} > 1e-5");
        // pad rows (row 0 starts with 5 pads, row 2 with 11) match too
        let pads = h.get(2).unwrap().narrow(0, 0, 11).unwrap();
        let want = f[key].get(2).unwrap().narrow(0, 0, 11).unwrap();
        assert!(rel(&pads, &want) <= 1e-5);
    }
    let m = TextModel::load(&ckpt()).unwrap();
    let g = m.linear_output_grads(&batch, Some(pad), &mut NoTap).unwrap();
    let r = rel(&g.logits, &f["logits_sdpa"]);
    eprintln!("logits: rel diff {r:.3e}");
    assert!(r <= 1e-5, "logits: relative difference {r}");
    let want_loss = f["loss_sdpa"].to_scalar::<f32>().unwrap();
    assert!(((g.loss - want_loss) / want_loss).abs() <= 1e-5, "loss {} vs {want_loss}", g.loss);

    // dL/dy of every linear of layers 0 and 3 against torch's autograd
    let (b, t) = batch.dims();
    let mut checked = 0;
    for (idx, name) in m.linear_names().iter().enumerate() {
        if let Some(want) = f.get(&format!("grad.{name}")) {
            let got = g.grads[idx].reshape(want.dims()).unwrap();
            let r = rel(&got, want);
            eprintln!("grad {name}: rel diff {r:.3e}");
            assert!(r <= 1e-5, "dL/dy of {name}: relative difference {r}");
            assert_eq!(g.grads[idx].dims()[0], b * t);
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}

/// The hand-written backward against candle's autograd: each Linear output gets a zero
/// `Var` added (the "probe"), whose gradient is dL/dy.
#[test]
fn backward_matches_candle_autograd() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let m = TextModel::load(&ckpt()).unwrap();
    let fw = m.forward_for_backward(&batch, &mut NoTap).unwrap();
    let ce = loss::shifted_cross_entropy(fw.logits(), &batch.input_ids, Some(0)).unwrap();
    let mine = m.backward(&fw, &ce.dlogits).unwrap();

    let mut probes: Vec<Var> = Vec::new();
    let mut tap = |_: usize, _: &str, _: &Tensor, _: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
        let p = Var::zeros(y.dims(), y.dtype(), y.device())?;
        let y2 = (y + p.as_tensor())?;
        probes.push(p);
        Ok(Some(y2))
    };
    let logits = m.forward(&batch, &mut tap).unwrap();
    // d(sum(logits · c))/dlogits = c, so the probes' gradients are backward(c).
    let surrogate = (&logits * &ce.dlogits).unwrap().sum_all().unwrap();
    let grads = surrogate.backward().unwrap();
    assert_eq!(probes.len(), m.num_linears());
    for (idx, p) in probes.iter().enumerate() {
        let want = grads.get(p.as_tensor()).unwrap();
        let r = rel(&mine[idx], want);
        assert!(r <= 1e-4, "{}: hand-written vs autograd rel diff {r}", m.linear_names()[idx]);
    }
}

#[test]
fn backward_linears_gives_every_linear_input_output_and_gradient_bit_for_bit() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let m = TextModel::load(&ckpt()).unwrap();
    let mut seen: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    let mut tap = |_: usize, _: &str, x: &Tensor, _: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
        seen.push((x.flatten_all()?.to_vec1()?, y.flatten_all()?.to_vec1()?));
        Ok(None)
    };
    let fw = m.forward_for_backward(&batch, &mut tap).unwrap();
    let ce = loss::shifted_cross_entropy(fw.logits(), &batch.input_ids, Some(0)).unwrap();
    let grads = m.backward(&fw, &ce.dlogits).unwrap();
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let raw = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let mut order = Vec::new();
    m.backward_linears(fw, &ce.dlogits, &mut |idx, x, y, dy| {
        let name = &m.linear_names()[idx];
        assert_eq!(bits(x), raw(&seen[idx].0), "input of {name}");
        assert_eq!(bits(y), raw(&seen[idx].1), "output of {name}");
        assert_eq!(bits(dy), bits(&grads[idx]), "gradient of {name}");
        order.push(idx);
        Ok(())
    })
    .unwrap();
    // last layer first, module order within a layer
    let l = m.config().num_hidden_layers;
    let want: Vec<usize> = (0..l).rev().flat_map(|l| l * LINEARS_PER_LAYER..(l + 1) * LINEARS_PER_LAYER).collect();
    assert_eq!(order, want);
    let (b, t) = batch.dims();
    assert!(m.forward_cache_bytes(b, t) > 0);
}

#[test]
fn a_forward_resumed_at_a_layer_equals_the_whole_forward() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let m = TextModel::load(&ckpt()).unwrap();
    let (logits, inputs) = m.forward_layer_inputs(&batch, &mut NoTap).unwrap();
    assert_eq!(inputs.len(), m.config().num_hidden_layers);
    assert_eq!(max_abs_diff(&logits, &m.forward(&batch, &mut NoTap).unwrap()), 0.0);
    // Replace layer 2's down_proj (halved weights) in a whole forward and in one resumed at layer 2.
    let mut replace = |_: usize, name: &str, x: &Tensor, w: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
        Ok((name == "layers.2.mlp.down_proj").then(|| matmul_xwt(x, &(w * 0.5).unwrap()).unwrap()))
    };
    let whole = m.forward(&batch, &mut replace).unwrap();
    let mut seen = Vec::new();
    let mut replace_and_log = |i: usize, name: &str, x: &Tensor, w: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
        seen.push(i);
        replace(i, name, x, w, y)
    };
    let resumed = m.forward_from(&batch, 2, &inputs[2], &mut replace_and_log).unwrap();
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed), bits(&whole));
    assert!(max_abs_diff(&whole, &logits) > 0.0);
    assert_eq!(seen.first(), Some(&(2 * LINEARS_PER_LAYER)), "the tap starts at layer 2");
}

#[test]
fn tap_replaces_outputs_and_sees_every_linear_in_order() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let m = TextModel::load(&ckpt()).unwrap();
    let base = m.forward(&batch, &mut NoTap).unwrap();
    let mut seen = Vec::new();
    let mut tap = |idx: usize, name: &str, x: &Tensor, w: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
        assert_eq!(y.dims(), &[x.dims()[0], w.dims()[0]]);
        assert_eq!(x.dims()[1], w.dims()[1]);
        seen.push((idx, name.to_string()));
        // replace down_proj of layer 1 by zero
        Ok((name == "layers.1.mlp.down_proj").then(|| y.zeros_like().unwrap()))
    };
    let changed = m.forward(&batch, &mut tap).unwrap();
    assert_eq!(seen.len(), 28);
    assert!(seen.iter().enumerate().all(|(i, (idx, n))| *idx == i && *n == m.linear_names()[i]));
    assert!(max_abs_diff(&changed, &base) > 1e-3, "replacing an output must change the logits");
    // the identity replacement changes nothing
    let mut ident = |_: usize, _: &str, x: &Tensor, w: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
        Ok(Some(matmul_xwt(x, w)?))
    };
    assert_eq!(max_abs_diff(&m.forward(&batch, &mut ident).unwrap(), &base), 0.0);
    assert_eq!(m.linear_weight_by_name("layers.3.mlp.up_proj").unwrap().dims(), &[384, 128]);
}

fn copy_checkpoint(to: &Path) {
    for e in std::fs::read_dir(ckpt()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn transformers_457_dialect_gives_same_outputs() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let dir = tempfile::tempdir().unwrap();
    copy_checkpoint(dir.path());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    let cfg457 = config::tests::to_457(cfg.take());
    std::fs::write(dir.path().join("config.json"), serde_json::to_string_pretty(&cfg457).unwrap()).unwrap();
    let m = TextModel::load(dir.path()).unwrap();
    assert_eq!(m.config().dialect, ConfigDialect::Transformers457);
    let h = m.forward_hidden(&batch, &mut NoTap).unwrap();
    let base = TextModel::load(&ckpt()).unwrap().forward_hidden(&batch, &mut NoTap).unwrap();
    assert_eq!(max_abs_diff(&h, &base), 0.0);
}

#[test]
fn sharded_checkpoint_with_f32_shard_gives_same_outputs() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(ckpt().join("config.json"), dir.path().join("config.json")).unwrap();
    let all = candle_core::safetensors::load(ckpt().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part, f32) in
        [("model-00001-of-00002.safetensors", a, false), ("model-00002-of-00002.safetensors", b, true)]
    {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| {
                let t = all[*n].clone();
                ((*n).clone(), if f32 { t.to_dtype(DType::F32).unwrap() } else { t })
            })
            .collect();
        candle_core::safetensors::save(&shard, dir.path().join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(weights::checkpoint_files(dir.path()).unwrap().len(), 2);
    let h = TextModel::load(dir.path()).unwrap().forward_hidden(&batch, &mut NoTap).unwrap();
    let base = TextModel::load(&ckpt()).unwrap().forward_hidden(&batch, &mut NoTap).unwrap();
    assert_eq!(max_abs_diff(&h, &base), 0.0);
}

/// A copy of the checkpoint with one tensor replaced.
fn checkpoint_with(dir: &Path, name: &str, t: Tensor) {
    std::fs::copy(ckpt().join("config.json"), dir.join("config.json")).unwrap();
    let mut all = candle_core::safetensors::load(ckpt().join("model.safetensors"), &Device::Cpu).unwrap();
    all.insert(name.to_string(), t);
    candle_core::safetensors::save(&all, dir.join("model.safetensors")).unwrap();
}

#[test]
fn bad_checkpoints_and_inputs_are_named() {
    let dev = Device::Cpu;
    let name = "model.language_model.layers.2.self_attn.k_proj.weight";
    let dir = tempfile::tempdir().unwrap();
    checkpoint_with(dir.path(), name, Tensor::zeros((60, 128), DType::F32, &dev).unwrap());
    let err = format!("{:#}", TextModel::load(dir.path()).err().unwrap());
    assert!(err.contains(name) && err.contains("[60, 128]") && err.contains("[64, 128]"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let mut v = vec![0.5f32; 384 * 128];
    v[77] = f32::NAN;
    let name = "model.language_model.layers.1.mlp.up_proj.weight";
    checkpoint_with(dir.path(), name, Tensor::from_vec(v, (384, 128), &dev).unwrap());
    let err = format!("{:#}", TextModel::load(dir.path()).err().unwrap());
    assert!(err.contains(name) && err.contains("non-finite"), "{err}");

    let m = TextModel::load(&ckpt()).unwrap();
    let long = Batch::unpadded(vec![vec![5; 1025]]).unwrap();
    let err = format!("{:#}", m.forward(&long, &mut NoTap).unwrap_err());
    assert!(err.contains("1025") && err.contains("max_position_embeddings"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", TextModel::load(dir.path()).err().unwrap());
    assert!(err.contains("config.json"), "{err}");

    // a non-finite activation names the layer
    let batch = fixture_batch(&fixture());
    let mut tap = |_: usize, name: &str, _: &Tensor, _: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
        Ok((name == "layers.2.mlp.up_proj").then(|| (y * f64::INFINITY).unwrap()))
    };
    let err = format!("{:#}", m.forward(&batch, &mut tap).unwrap_err());
    assert!(err.contains("layers.2") && err.contains("non-finite"), "{err}");
}

/// Timing of the mid-size synthetic model (hidden 512, 8 layers, 8/4 heads, intermediate
/// 1536, vocab 4096; batch 8 × 128 tokens, some left padding):
/// `cargo test -p qpipe-model --lib tests::bench_midsize -- --ignored --nocapture`
#[test]
#[ignore]
fn bench_midsize() {
    let cfg = TextConfig::synthetic(512, 8, 8, 4, 1536, 4096);
    let w = LmWeights::synthetic(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
    let m = TextModel::from_parts(cfg, w, DType::F32, &Device::Cpu);
    let (b, t) = (8usize, 128usize);
    let ids: Vec<Vec<u32>> = (0..b).map(|r| (0..t).map(|i| ((r * 131 + i * 17) % 4000 + 3) as u32).collect()).collect();
    let mask: Vec<Vec<u32>> = (0..b).map(|r| (0..t).map(|i| u32::from(i >= r * 9)).collect()).collect();
    let ids: Vec<Vec<u32>> =
        ids.into_iter().zip(&mask).map(|(r, m)| r.iter().zip(m).map(|(x, k)| x * k).collect()).collect();
    let batch = Batch::new(ids, mask).unwrap();
    let _ = m.forward(&batch, &mut NoTap).unwrap();
    // minimum over repetitions: robust against other processes on a shared machine
    let (mut fwd, mut fce, mut bwd) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        let _ = m.forward(&batch, &mut NoTap).unwrap();
        fwd = fwd.min(t0.elapsed().as_secs_f64());
        let t0 = std::time::Instant::now();
        let fw = m.forward_for_backward(&batch, &mut NoTap).unwrap();
        let ce = loss::shifted_cross_entropy(fw.logits(), &batch.input_ids, Some(0)).unwrap();
        fce = fce.min(t0.elapsed().as_secs_f64());
        let t0 = std::time::Instant::now();
        let g = m.backward(&fw, &ce.dlogits).unwrap();
        bwd = bwd.min(t0.elapsed().as_secs_f64());
        assert_eq!(g.len(), 56);
    }
    eprintln!("midsize 8x128 (min of 5): forward {fwd:.3} s; forward+CE {fce:.3} s; backward {bwd:.3} s");
}

#[test]
#[ignore]
fn bench_matmul() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1024, 512), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1536, 512), &dev).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    for (name, rhs) in [("w.t()", w.t().unwrap()), ("wt contiguous", wt.clone())] {
        let mut s = f64::MAX;
        for _ in 0..20 {
            let t0 = std::time::Instant::now();
            let _ = x.matmul(&rhs).unwrap();
            s = s.min(t0.elapsed().as_secs_f64());
        }
        eprintln!(
            "matmul 1024x512x1536 {name}: {:.2} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * 1024.0 * 512.0 * 1536.0 / s / 1e9
        );
    }
    for (name, layout, rhs) in
        [("qpipe x·wᵀ", gemm::RhsLayout::Transposed, w.clone()), ("qpipe x·wt", gemm::RhsLayout::Normal, wt.clone())]
    {
        let mut s = f64::MAX;
        for _ in 0..20 {
            let t0 = std::time::Instant::now();
            assert!(gemm::matmul(&x, &rhs, layout).is_some(), "{name}: the GEMM takes contiguous f32");
            s = s.min(t0.elapsed().as_secs_f64());
        }
        eprintln!(
            "matmul 1024x512x1536 {name}: {:.2} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * 1024.0 * 512.0 * 1536.0 / s / 1e9
        );
    }
    let y = Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        let _ = (&y * &y).unwrap();
    }
    eprintln!("mul 1024x1536: {:.2} ms", t0.elapsed().as_secs_f64() / 10.0 * 1e3);
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        let _ = candle_nn::ops::silu(&y).unwrap();
    }
    eprintln!("silu 1024x1536: {:.2} ms", t0.elapsed().as_secs_f64() / 10.0 * 1e3);
}

#[test]
fn untied_lm_head_is_used_and_absent_one_falls_back_to_embeddings() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let base = TextModel::load(&ckpt()).unwrap().forward(&batch, &mut NoTap).unwrap();
    let all = candle_core::safetensors::load(ckpt().join("model.safetensors"), &Device::Cpu).unwrap();
    let embed = all["model.language_model.embed_tokens.weight"].to_dtype(DType::F32).unwrap();
    let untie = |dir: &Path| {
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt().join("config.json")).unwrap()).unwrap();
        cfg["tie_word_embeddings"] = false.into();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    };
    // untied, lm_head = 2 × embed_tokens → logits double
    let dir = tempfile::tempdir().unwrap();
    checkpoint_with(dir.path(), "lm_head.weight", (&embed * 2.0).unwrap());
    untie(dir.path());
    let m = TextModel::load(dir.path()).unwrap();
    assert!(m.weights().lm_head.is_some());
    let l = m.forward(&batch, &mut NoTap).unwrap();
    assert!(rel(&l, &(&base * 2.0).unwrap()) < 1e-6);
    // untied in config but no lm_head.weight → tied
    let dir = tempfile::tempdir().unwrap();
    copy_checkpoint(dir.path());
    untie(dir.path());
    let m = TextModel::load(dir.path()).unwrap();
    assert!(m.weights().lm_head.is_none());
    assert_eq!(max_abs_diff(&m.forward(&batch, &mut NoTap).unwrap(), &base), 0.0);
}

/// Every Linear's `(input, output, gradient)` bits from a backward, by index.
type Seen = Vec<Option<(Vec<u32>, Vec<u32>, Vec<u32>)>>;

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|f| f.to_bits())
        .collect()
}

fn seen_by(m: &TextModel, run: impl FnOnce(&mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<()>)) -> Seen {
    let mut seen: Seen = vec![None; m.num_linears()];
    run(&mut |idx, x, y, dy| {
        seen[idx] = Some((bits(x), bits(y), bits(dy)));
        Ok(())
    });
    seen
}

#[test]
fn a_checkpointed_backward_with_a_chunked_head_gives_the_kept_backward_bits() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let (b, t) = batch.dims();
    let m = TextModel::load(&ckpt()).unwrap();
    // The reference: every activation kept, the whole batch's logits.
    let fw = m.forward_for_backward(&batch, &mut NoTap).unwrap();
    let ce = loss::shifted_cross_entropy(fw.logits(), &batch.input_ids, Some(0)).unwrap();
    let kept = seen_by(&m, |sink| m.backward_linears(fw, &ce.dlogits, sink).unwrap());
    // Each layer recomputed from its input; the head over chunks of 7 positions (not a
    // divisor of N), one chunk, and a chunk larger than N; a vocabulary (512) larger than
    // the chunk.
    assert!(m.config().vocab_size > 7 && (b * t) % 7 != 0);
    for head_rows in [7, b * t, 10 * b * t] {
        let mut observed = 0;
        let mut observe = |_: usize, _: &str, _: &Tensor, _: &Tensor, _: &Tensor| -> Result<Option<Tensor>> {
            observed += 1;
            Ok(None)
        };
        let fw = m.forward_checkpointed(&batch, &mut observe).unwrap();
        assert_eq!(observed, m.num_linears());
        let mut loss = 0.0;
        let recomputed = seen_by(&m, |sink| {
            loss = m.backward_linears_ce(fw, &batch.input_ids, Some(0), 1.0, head_rows, sink).unwrap();
        });
        assert!((loss - f64::from(ce.loss)).abs() <= 1e-6 * loss.abs(), "loss {loss} vs {}", ce.loss);
        for (i, (a, b)) in kept.iter().zip(&recomputed).enumerate() {
            assert!(a == b, "head chunks of {head_rows}: linear {} differs", m.linear_names()[i]);
        }
    }
    // Less memory: the checkpoints against every activation.
    let needs = m.memory_needs(b, t);
    assert!(needs.checkpoints * 3 < m.forward_cache_bytes(b, t), "{needs:?}");
    // A replaced output cannot be recomputed: refused.
    let mut replace =
        |_: usize, _: &str, _: &Tensor, _: &Tensor, y: &Tensor| -> Result<Option<Tensor>> { Ok(Some(y.clone())) };
    let e = m.forward_checkpointed(&batch, &mut replace).err().unwrap();
    assert!(format!("{e:#}").contains("cannot take replaced"), "{e:#}");
}

#[test]
fn head_logits_of_a_chunk_are_the_whole_forward_rows() {
    let f = fixture();
    let batch = fixture_batch(&f);
    let (b, t) = batch.dims();
    let m = TextModel::load(&ckpt()).unwrap();
    let logits = m.forward(&batch, &mut NoTap).unwrap().reshape((b * t, m.config().vocab_size)).unwrap();
    let (hidden, inputs) = m.hidden_and_layer_inputs(&batch, &mut NoTap).unwrap();
    let chunk = m.head_logits(&hidden, 5..18).unwrap();
    assert_eq!(bits(&chunk), bits(&logits.narrow(0, 5, 13).unwrap()));
    // Resumed at a layer: the same hidden states.
    let resumed = m.hidden_from(&batch, 2, &inputs[2], &mut NoTap).unwrap();
    assert_eq!(bits(&resumed), bits(&hidden));
}

#[test]
fn half_precision_weights_are_held_as_stored_and_give_the_f32_copy_s_bits() {
    let f = fixture();
    let batch = fixture_batch(&f);
    // The committed checkpoint is bf16: its matrices stay bf16 in an f32 model.
    let m = TextModel::load(&ckpt()).unwrap();
    assert_eq!(m.linear_weight(0).dtype(), DType::BF16);
    assert_eq!(m.weights().norm.dtype(), DType::F32);
    // The same checkpoint widened to f32 on disk: f32 matrices, the same bits everywhere.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(ckpt().join("config.json"), dir.path().join("config.json")).unwrap();
    let all = candle_core::safetensors::load(ckpt().join("model.safetensors"), &Device::Cpu).unwrap();
    let wide: HashMap<String, Tensor> = all.into_iter().map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap())).collect();
    candle_core::safetensors::save(&wide, dir.path().join("model.safetensors")).unwrap();
    let w = TextModel::load(dir.path()).unwrap();
    assert_eq!(w.linear_weight(0).dtype(), DType::F32);
    // Held once as stored: 2 bytes less per matrix value than the f32 copy.
    let ww = w.weights();
    let matrices: u64 = ww.linears.iter().map(|t| t.elem_count() as u64).sum::<u64>()
        + ww.embed_tokens.elem_count() as u64
        + ww.lm_head.as_ref().map_or(0, |t| t.elem_count() as u64);
    assert_eq!(ww.bytes() - m.weights().bytes(), 2 * matrices);
    let (a, b) = (m.forward(&batch, &mut NoTap).unwrap(), w.forward(&batch, &mut NoTap).unwrap());
    assert_eq!(bits(&a), bits(&b));
    let ga = m.linear_output_grads(&batch, Some(0), &mut NoTap).unwrap();
    let gb = w.linear_output_grads(&batch, Some(0), &mut NoTap).unwrap();
    for (x, y) in ga.grads.iter().zip(&gb.grads) {
        assert_eq!(bits(x), bits(y));
    }
}

#[test]
fn a_truncated_or_malformed_safetensors_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(ckpt().join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(ckpt().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let e = format!("{:#}", TextModel::load(dir.path()).err().unwrap());
    assert!(e.contains("model.safetensors") && e.contains("fetch the checkpoint again"), "{e}");
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..5]).unwrap();
    let e = format!("{:#}", TextModel::load(dir.path()).err().unwrap());
    assert!(e.contains("not a complete safetensors file"), "{e}");
}
