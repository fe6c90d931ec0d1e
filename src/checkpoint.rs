//! Checkpoints: safetensors files, f32, whose tensor names and layouts are the `state_dict` of
//!
//! ```text
//! Sequential(conv=Conv2d(1, 20, 9, bias=B), relu, AvgPool2d(2), Flatten(),
//!            fc1=Linear(2000, 100, bias=B), relu, fc2=Linear(100, 10, bias=B))
//! ```
//! (`conv.weight` `[20,1,9,9]`, `fc1.weight` `[100,2000]`, `fc2.weight` `[10,100]`, and the biases
//! when present), so that PyTorch's `load_state_dict` takes them as they are. The metadata map
//! holds `format` = `mnistconv`, `format_version`, and the architecture as JSON under `config`.
//! A file without that metadata (e.g. saved from PyTorch) is read as the default architecture,
//! with biases if it has `conv.bias`.

use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::fsutil::{atomic_write, atomic_write_with, fault_pause};
use crate::params::{Params, tensor_shape};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::HashMap;
use std::path::Path;

/// The checkpoint format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A network: its architecture and its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// The architecture.
    pub cfg: NetConfig,
    /// The weights.
    pub params: Params<f32>,
    /// Free-form metadata kept with the checkpoint (e.g. `recipe`, `dataset`).
    pub meta: HashMap<String, String>,
}

/// Serialises a model to safetensors bytes.
pub fn to_bytes(model: &Model) -> Result<Vec<u8>> {
    let mut meta = model.meta.clone();
    meta.insert("format".into(), "mnistconv".into());
    meta.insert("format_version".into(), FORMAT_VERSION.to_string());
    meta.insert(
        "config".into(),
        serde_json::to_string(&model.cfg).expect("config serialises"),
    );
    let bytes: Vec<(&str, Vec<u8>)> = model
        .params
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(&str, TensorView)> = bytes
        .iter()
        .map(|(n, b)| {
            let shape = tensor_shape(&model.cfg, n).expect("known tensor");
            (
                *n,
                TensorView::new(Dtype::F32, shape, b).expect("sizes agree"),
            )
        })
        .collect();
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Data(format!("cannot serialise checkpoint: {e}")))
}

/// Saves a model atomically (temporary file, fsync, rename).
pub fn save(path: &Path, model: &Model) -> Result<()> {
    atomic_write(path, &to_bytes(model)?)
}

/// Loads and checks a model: names, dtypes, shapes, agreement with the metadata's config, and
/// that every weight is finite.
pub fn load(path: &Path) -> Result<Model> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path)
}

/// As [`load`], from bytes; `path` names the source in errors.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Model> {
    let bad = |r: String| Error::checkpoint(path, r);
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors checkpoint ({e})")))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a safetensors checkpoint ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if let Some(v) = meta.get("format_version") {
        let v: u32 = v
            .parse()
            .map_err(|_| bad(format!("format_version {v:?} is not a number")))?;
        if v > FORMAT_VERSION {
            return Err(bad(format!(
                "format version {v} is newer than this build reads ({FORMAT_VERSION})"
            )));
        }
    }
    let from_meta = meta.contains_key("config");
    let cfg: NetConfig = match meta.get("config") {
        Some(c) => serde_json::from_str(c)
            .map_err(|e| bad(format!("metadata config is not valid: {e}")))?,
        None => NetConfig {
            bias: st.names().contains(&"conv.bias"),
            ..NetConfig::default()
        },
    };
    cfg.validate()
        .map_err(|e| bad(format!("metadata config: {e}")))?;
    let mut params = Params::<f32>::zeros(&cfg);
    let expected: Vec<&str> = params.tensors().iter().map(|t| t.0).collect();
    for name in st.names() {
        if !expected.contains(&name) {
            return Err(bad(format!(
                "unexpected tensor {name:?} (the model has {})",
                expected.join(", ")
            )));
        }
    }
    for (name, dst) in params.tensors_mut() {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("missing tensor {name:?}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor {name}: dtype {:?}, expected F32",
                t.dtype()
            )));
        }
        let want = tensor_shape(&cfg, name).expect("known tensor");
        if t.shape() != want.as_slice() {
            let why = if from_meta {
                " (as the metadata's config says)"
            } else {
                ""
            };
            return Err(bad(format!(
                "tensor {name}: shape {:?}, expected {want:?}{why}",
                t.shape()
            )));
        }
        for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "tensor {name}: element {i} is {} (not finite)",
                dst[i]
            )));
        }
    }
    let meta = meta
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "format" | "format_version" | "config"))
        .collect();
    Ok(Model { cfg, params, meta })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Init;

    #[test]
    fn round_trip_with_and_without_bias() {
        for bias in [false, true] {
            let cfg = NetConfig {
                bias,
                hidden: 7,
                ..NetConfig::default()
            };
            let mut params = Params::init(&cfg, Init::He, 3);
            params.b_m1.iter_mut().for_each(|b| *b = 0.5);
            let m = Model {
                cfg,
                params,
                meta: [("recipe".to_string(), "default".to_string())].into(),
            };
            let back = from_bytes(&to_bytes(&m).unwrap(), Path::new("m")).unwrap();
            assert_eq!(back, m);
        }
    }

    /// A file whose tensors do not match the model it claims to be is refused, naming the tensor.
    #[test]
    fn refuses_missing_extra_and_misshapen_tensors() {
        let cfg = NetConfig::default();
        let p = Params::init(&cfg, Init::He, 3);
        let raw = |tensors: Vec<(&str, Vec<usize>, Vec<f32>)>,
                   meta: Option<HashMap<String, String>>| {
            let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
                .into_iter()
                .map(|(n, s, v)| {
                    (
                        n.to_string(),
                        s,
                        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    )
                })
                .collect();
            let views: Vec<(String, TensorView)> = bytes
                .iter()
                .map(|(n, s, b)| {
                    (
                        n.clone(),
                        TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            safetensors::serialize(views, meta).unwrap()
        };
        let good = || {
            vec![
                ("conv.weight", vec![20, 1, 9, 9], p.k.to_vec()),
                ("fc1.weight", vec![100, 2000], p.w_m1.to_vec()),
                ("fc2.weight", vec![10, 100], p.w.to_vec()),
            ]
        };
        // As PyTorch would save it (no metadata): loads as the default network.
        let m = from_bytes(&raw(good(), None), Path::new("pt")).unwrap();
        assert_eq!(m.params, p);
        let mut missing = good();
        missing.remove(1);
        let e = from_bytes(&raw(missing, None), Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing tensor \"fc1.weight\""), "{e}");
        let mut extra = good();
        extra.push(("fc3.weight", vec![1], vec![0.0]));
        let e = from_bytes(&raw(extra, None), Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected tensor \"fc3.weight\""), "{e}");
        let mut shape = good();
        shape[2] = ("fc2.weight", vec![100, 10], p.w.to_vec());
        let e = from_bytes(&raw(shape, None), Path::new("s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc2.weight") && e.contains("[10, 100]"), "{e}");
        // A config in the metadata that contradicts the tensors.
        let small = NetConfig {
            hidden: 50,
            ..NetConfig::default()
        };
        let meta = [("config".to_string(), serde_json::to_string(&small).unwrap())].into();
        let e = from_bytes(&raw(good(), Some(meta)), Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("metadata"), "{e}");
    }

    /// Resuming removes the temporary files of unfinished checkpoint writes, and nothing else.
    #[test]
    fn remove_unfinished_takes_only_checkpoint_temporaries() {
        let dir = std::env::temp_dir().join(format!("mnistconv-unfinished-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let names = [
            ".ckpt-e0002-s000003.safetensors.tmp4242", // removed
            ".ckpt-e0003-s000000.safetensors.tmp7",    // removed
            "ckpt-e0002-s000000.safetensors",
            ".model.safetensors.tmp99",
            ".ckpt-e0002-s000003.safetensors.tmpx",
            "notes.txt",
        ];
        for n in names {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        let removed = remove_unfinished(&dir).unwrap();
        assert_eq!(removed, vec![dir.join(names[0]), dir.join(names[1])]);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = names[2..].iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(left, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_garbage_and_nan() {
        let e = from_bytes(b"hello world, not safetensors", Path::new("g"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a safetensors"), "{e}");
        let cfg = NetConfig::default();
        let mut params = Params::init(&cfg, Init::He, 3);
        params.w[5] = f32::NAN;
        let b = to_bytes(&Model {
            cfg,
            params,
            meta: HashMap::new(),
        })
        .unwrap();
        let e = from_bytes(&b, Path::new("n")).unwrap_err().to_string();
        assert!(e.contains("fc2.weight") && e.contains("not finite"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// training checkpoints (resume)

use crate::train::{EpochStats, TrainConfig, TrainState};
use std::path::PathBuf;

/// Where a training checkpoint stands, besides the tensors.
#[derive(serde::Serialize, serde::Deserialize)]
struct Position {
    epoch: usize,
    step: usize,
    loss_sum: f64,
    correct: usize,
    seconds: f64,
}

/// Everything a training checkpoint holds.
#[derive(Clone, Debug)]
pub struct TrainCheckpoint {
    /// The architecture.
    pub cfg: NetConfig,
    /// The run's settings.
    pub tc: TrainConfig,
    /// Fingerprint of the training data it was made on.
    pub data: String,
    /// Weights, momentum, position, history.
    pub state: TrainState,
}

fn ckpt_name(state: &TrainState) -> String {
    format!("ckpt-e{:04}-s{:06}.safetensors", state.epoch, state.step)
}

/// Saves a training checkpoint into `dir` atomically, then removes all but the two newest.
/// Returns the file written.
pub fn save_training(dir: &Path, ck: &TrainCheckpoint) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let s = &ck.state;
    let mut names: Vec<String> = Vec::new();
    let mut bytes: Vec<Vec<u8>> = Vec::new();
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    for (prefix, p) in [("", &s.params), ("momentum.", &s.mom)] {
        for (n, t) in p.tensors() {
            names.push(format!("{prefix}{n}"));
            shapes.push(tensor_shape(&ck.cfg, n).expect("known tensor"));
            bytes.push(t.iter().flat_map(|v| v.to_le_bytes()).collect());
        }
    }
    let views: Vec<(String, TensorView)> = names
        .iter()
        .zip(&shapes)
        .zip(&bytes)
        .map(|((n, sh), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, sh.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    let pos = Position {
        epoch: s.epoch,
        step: s.step,
        loss_sum: s.loss_sum,
        correct: s.correct,
        seconds: s.seconds,
    };
    let json = |v: &dyn erased::Ser| v.to_json();
    let meta: HashMap<String, String> = [
        ("format".to_string(), "mnistconv-train".to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("config".to_string(), json(&ck.cfg)),
        ("train_config".to_string(), json(&ck.tc)),
        ("position".to_string(), json(&pos)),
        ("history".to_string(), json(&s.history)),
        ("data".to_string(), ck.data.clone()),
    ]
    .into();
    let out = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Data(format!("cannot serialise checkpoint: {e}")))?;
    let path = dir.join(ckpt_name(s));
    // (The fault-injection hook of the tests that kill a run mid-write; inert unless
    // MNISTCONV_FAULT_PAUSE is set: see `fsutil::fault_pause`.)
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let at = |stage: &str| fault_pause(stage, write);
    atomic_write_with(&path, &out, &at)?;
    at("after-rename-before-prune");
    // Keep the two newest complete checkpoints.
    let mut all = list_training(dir)?;
    all.sort();
    for (_, old) in all.iter().rev().skip(2) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// `ckpt-e…-s….safetensors` files of `dir`, with their (epoch, step).
fn list_training(dir: &Path) -> Result<Vec<((usize, usize), PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("ckpt-e")
            .and_then(|r| r.strip_suffix(".safetensors"))
        else {
            continue;
        };
        let Some((e, s)) = rest.split_once("-s") else {
            continue;
        };
        if let (Ok(e), Ok(s)) = (e.parse(), s.parse()) {
            v.push(((e, s), entry.path()));
        }
    }
    Ok(v)
}

/// Removes from `dir` the temporary files of training checkpoints whose writing never finished
/// (`.ckpt-e…-s….safetensors.tmpPID`, left by a run killed in the middle of a write), and
/// returns them. For resuming: they are never read, only removed. (A run still writing into
/// `dir` would lose its write, so call it only when no run is using `dir`.)
pub fn remove_unfinished(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut removed = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_ckpt = crate::fsutil::temp_target(&name)
            .is_some_and(|t| t.starts_with("ckpt-e") && t.ends_with(".safetensors"));
        if is_ckpt && entry.file_type().is_ok_and(|t| t.is_file()) {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            removed.push(p);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Loads the newest training checkpoint of `dir` that reads back whole (a damaged one is skipped,
/// and named in the returned list of skipped files).
pub fn load_newest_training(dir: &Path) -> Result<(TrainCheckpoint, PathBuf, Vec<String>)> {
    let mut all = list_training(dir)?;
    all.sort();
    let mut skipped = Vec::new();
    for (_, path) in all.iter().rev() {
        match load_training(path) {
            Ok(ck) => return Ok((ck, path.clone(), skipped)),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Err(Error::checkpoint(
        dir,
        "no complete training checkpoint (ckpt-e…-s….safetensors) here",
    ))
}

/// Loads one training checkpoint.
pub fn load_training(path: &Path) -> Result<TrainCheckpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |r: String| Error::checkpoint(path, r);
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors checkpoint ({e})")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors checkpoint ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some("mnistconv-train") {
        return Err(bad("not a mnistconv training checkpoint".into()));
    }
    let get = |k: &str| {
        meta.get(k)
            .ok_or_else(|| bad(format!("metadata lacks {k:?}")))
    };
    let parse = |k: &str| -> Result<serde_json::Value> {
        serde_json::from_str(get(k)?).map_err(|e| bad(format!("metadata {k:?}: {e}")))
    };
    let cfg: NetConfig =
        serde_json::from_value(parse("config")?).map_err(|e| bad(format!("config: {e}")))?;
    cfg.validate().map_err(|e| bad(format!("config: {e}")))?;
    let tc: TrainConfig = serde_json::from_value(parse("train_config")?)
        .map_err(|e| bad(format!("train_config: {e}")))?;
    let pos: Position =
        serde_json::from_value(parse("position")?).map_err(|e| bad(format!("position: {e}")))?;
    let history: Vec<EpochStats> =
        serde_json::from_value(parse("history")?).map_err(|e| bad(format!("history: {e}")))?;
    let mut params = Params::<f32>::zeros(&cfg);
    let mut mom = Params::<f32>::zeros(&cfg);
    for (prefix, p) in [("", &mut params), ("momentum.", &mut mom)] {
        for (n, dst) in p.tensors_mut() {
            let name = format!("{prefix}{n}");
            let t = st
                .tensor(&name)
                .map_err(|_| bad(format!("missing tensor {name:?}")))?;
            let want = tensor_shape(&cfg, n).expect("known tensor");
            if t.dtype() != Dtype::F32 || t.shape() != want.as_slice() {
                return Err(bad(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {want:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            if dst.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!("tensor {name} is not finite")));
            }
        }
    }
    let state = TrainState {
        params,
        mom,
        epoch: pos.epoch,
        step: pos.step,
        loss_sum: pos.loss_sum,
        correct: pos.correct,
        seconds: pos.seconds,
        history,
    };
    Ok(TrainCheckpoint {
        cfg,
        tc,
        data: get("data")?.clone(),
        state,
    })
}

mod erased {
    /// JSON of anything serialisable, behind a trait object (the metadata map holds strings).
    pub trait Ser {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).expect("serialises")
        }
    }
}
