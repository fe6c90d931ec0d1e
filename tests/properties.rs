//! Property tests (proptest): round trips through the crate's own readers and writers, and the
//! picture normalisation's guarantees, on random inputs. Case counts are set per block so the
//! whole file runs in a few seconds in release; a failure prints the shrunk input.

use flate2::{Compression, write::GzEncoder};
use mnistconv::checkpoint::{self, Model, TrainCheckpoint};
use mnistconv::config::{Activation, Pooling};
use mnistconv::mnist::{self, Dataset, Split};
use mnistconv::preprocess::{center_of_mass, mnist_normalize};
use mnistconv::train::{EpochStats, Recipe, Schedule, TrainConfig, TrainState};
use mnistconv::{Init, NetConfig, Params};
use proptest::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh empty directory for one case.
fn case_dir(what: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "mnistconv-prop-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A dataset of random size: 0–12 images of 1–40 × 1–40 pixels, any bytes, any labels.
fn dataset() -> impl Strategy<Value = Dataset> {
    (0usize..=12, 1usize..=40, 1usize..=40).prop_flat_map(|(n, rows, cols)| {
        (
            prop::collection::vec(any::<u8>(), n * rows * cols),
            prop::collection::vec(any::<u8>(), n),
        )
            .prop_map(move |(images, labels)| Dataset {
                images,
                labels,
                rows,
                cols,
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// IDX write → read: the crate's writer, saved plain or gzip-compressed (any level) under
    /// MNIST's file names, read back by `load_split` (which detects gzip by its magic bytes) is
    /// the same dataset; and every truncation of the file, and the file with a byte appended,
    /// is an `Err`, never a panic or a wrong `Ok`.
    #[test]
    fn idx_write_read_round_trip(d in dataset(), gz in any::<bool>(), level in 0u32..=9,
                                 cut in any::<prop::sample::Index>()) {
        let images = mnist::write_images(d.len(), d.rows, d.cols, &d.images);
        let labels = mnist::write_labels(&d.labels);
        let dir = case_dir("idx");
        let suffix = if gz { ".gz" } else { "" };
        let enc = |b: &[u8]| if gz { gzip(b, level) } else { b.to_vec() };
        std::fs::write(dir.join(format!("train-images-idx3-ubyte{suffix}")), enc(&images)).unwrap();
        std::fs::write(dir.join(format!("train-labels-idx1-ubyte{suffix}")), enc(&labels)).unwrap();
        let back = mnist::load_split(&dir, Split::Train).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        prop_assert_eq!(&back, &d);

        // Cut short anywhere (header or data), or one byte too many: refused.
        let p = Path::new("cut");
        let k = cut.index(images.len());
        prop_assert!(mnist::parse_images(&images[..k], p).is_err(), "images cut at {}", k);
        let k = cut.index(labels.len());
        prop_assert!(mnist::parse_labels(&labels[..k], p).is_err(), "labels cut at {}", k);
        let mut longer = images.clone();
        longer.push(0);
        prop_assert!(mnist::parse_images(&longer[..], p).is_err());
    }
}

/// A small valid network: image 5–16, any kernel that fits, a pool dividing the conv map,
/// 1–4 kernels, 1–8 hidden units, 2–6 classes, any activations, pooling and bias.
fn net_config() -> impl Strategy<Value = NetConfig> {
    (5usize..=16)
        .prop_flat_map(|img| (Just(img), 1..=img))
        .prop_flat_map(|(img, ksize)| {
            let conv = img + 1 - ksize;
            let pools: Vec<usize> = (1..=conv).filter(|p| conv % p == 0).collect();
            (
                Just((img, ksize)),
                prop::sample::select(pools),
                1usize..=4,
                1usize..=8,
                2usize..=6,
                prop::sample::select(Activation::ALL.to_vec()),
                prop::sample::select(Activation::ALL.to_vec()),
                prop::sample::select(Pooling::ALL.to_vec()),
                any::<bool>(),
            )
        })
        .prop_map(
            |((img, ksize), pool, n_kernels, hidden, classes, conv_act, act, pooling, bias)| {
                NetConfig {
                    img,
                    ksize,
                    n_kernels,
                    pool,
                    hidden,
                    classes,
                    conv_act,
                    act,
                    pooling,
                    bias,
                }
            },
        )
}

/// Any finite f32, from its bits (subnormals, −0.0, the extremes included): a NaN or an
/// infinity loses one exponent bit and becomes a finite number.
fn finite_f32() -> impl Strategy<Value = f32> {
    any::<u32>().prop_map(|b| {
        let v = f32::from_bits(b);
        if v.is_finite() {
            v
        } else {
            f32::from_bits(b & !0x0080_0000)
        }
    })
}

/// Any finite f64, likewise.
fn finite_f64() -> impl Strategy<Value = f64> {
    any::<u64>().prop_map(|b| {
        let v = f64::from_bits(b);
        if v.is_finite() {
            v
        } else {
            f64::from_bits(b & !0x0010_0000_0000_0000)
        }
    })
}

/// Tensors of `cfg`'s sizes filled with random finite values.
fn params_for(cfg: NetConfig) -> impl Strategy<Value = Params<f32>> {
    let n = Params::<f32>::zeros(&cfg)
        .tensors()
        .iter()
        .map(|t| t.1.len())
        .sum::<usize>();
    prop::collection::vec(finite_f32(), n).prop_map(move |v| {
        let mut p = Params::<f32>::zeros(&cfg);
        let mut it = v.into_iter();
        for (_, t) in p.tensors_mut() {
            for x in t.iter_mut() {
                *x = it.next().expect("enough values");
            }
        }
        p
    })
}

fn bits(p: &Params<f32>) -> Vec<(String, Vec<u32>)> {
    p.tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

fn model() -> impl Strategy<Value = Model> {
    net_config().prop_flat_map(|cfg| {
        (
            Just(cfg),
            params_for(cfg),
            prop::collection::hash_map("[a-z_]{1,10}", "\\PC{0,24}", 0..4),
        )
            .prop_map(|(cfg, params, meta)| Model {
                cfg,
                params,
                // The reserved keys (format, format_version, config) are the writer's own.
                meta: meta
                    .into_iter()
                    .map(|(k, v)| (format!("x_{k}"), v))
                    .collect(),
            })
    })
}

fn epoch_stats() -> impl Strategy<Value = EpochStats> {
    (
        1usize..1000,
        prop::array::uniform4(finite_f64()),
        prop::option::of(finite_f64()),
        prop::option::of(finite_f64()),
        finite_f32(),
    )
        .prop_map(|(epoch, [a, b, c, d], val, test, lr)| EpochStats {
            epoch,
            train_loss: a,
            train_accuracy: b,
            val_accuracy: val,
            test_accuracy: test,
            seconds: c,
            images_per_second: d,
            lr,
        })
}

fn train_config() -> impl Strategy<Value = TrainConfig> {
    (
        (any::<bool>(), 1usize..1000, 1usize..10_000),
        (finite_f32(), finite_f32(), finite_f32()),
        (any::<bool>(), any::<bool>(), any::<bool>(), 0usize..5),
        (any::<bool>(), any::<u64>(), 0usize..64),
    )
        .prop_map(
            |(
                (book, epochs, batch),
                (lr, momentum, weight_decay),
                (cosine, momentum_reset, shuffle, shift),
                (he, seed, threads),
            )| TrainConfig {
                recipe: if book { Recipe::Book } else { Recipe::Default },
                epochs,
                batch,
                lr,
                momentum,
                weight_decay,
                schedule: if cosine {
                    Schedule::Cosine
                } else {
                    Schedule::Constant
                },
                momentum_reset,
                shuffle,
                shift,
                init: if he { Init::He } else { Init::Book },
                seed,
                threads,
            },
        )
}

fn train_checkpoint() -> impl Strategy<Value = TrainCheckpoint> {
    net_config().prop_flat_map(|cfg| {
        (
            Just(cfg),
            train_config(),
            "\\PC{0,40}",
            (params_for(cfg), params_for(cfg)),
            (1usize..1000, 0usize..100_000, 0usize..1_000_000),
            (finite_f64(), finite_f64()),
            prop::collection::vec(epoch_stats(), 0..4),
        )
            .prop_map(
                |(
                    cfg,
                    tc,
                    data,
                    (params, mom),
                    (epoch, step, correct),
                    (loss_sum, seconds),
                    history,
                )| {
                    TrainCheckpoint {
                        cfg,
                        tc,
                        data,
                        state: TrainState {
                            params,
                            mom,
                            epoch,
                            step,
                            loss_sum,
                            correct,
                            seconds,
                            history,
                        },
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Model checkpoint → bytes → model: the same architecture and metadata, and every weight
    /// bit-identical (−0.0 and subnormals included).
    #[test]
    fn checkpoint_round_trip(m in model()) {
        let bytes = checkpoint::to_bytes(&m).unwrap();
        let back = checkpoint::from_bytes(&bytes, Path::new("prop")).unwrap();
        prop_assert_eq!(back.cfg, m.cfg);
        prop_assert_eq!(&back.meta, &m.meta);
        prop_assert_eq!(bits(&back.params), bits(&m.params));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Training checkpoint → file → training checkpoint: architecture, run settings, data
    /// fingerprint, position, history, weights and momentum all come back exactly (the f32
    /// and f64 numbers kept as JSON in the metadata too, bit for bit).
    #[test]
    fn training_checkpoint_round_trip(ck in train_checkpoint()) {
        let dir = case_dir("train-ck");
        let path = checkpoint::save_training(&dir, &ck).unwrap();
        let back = checkpoint::load_training(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        prop_assert_eq!(back.cfg, ck.cfg);
        prop_assert_eq!(&back.data, &ck.data);
        prop_assert_eq!(bits(&back.state.params), bits(&ck.state.params));
        prop_assert_eq!(bits(&back.state.mom), bits(&ck.state.mom));
        // Bit-level comparison of the numbers kept as JSON (== would call −0.0 and 0.0 equal).
        let f32b = |v: f32| v.to_bits();
        let f64b = |v: f64| v.to_bits();
        let tc = |t: &TrainConfig| {
            (format!("{:?}", TrainConfig { lr: 0.0, momentum: 0.0, weight_decay: 0.0, ..t.clone() }),
             f32b(t.lr), f32b(t.momentum), f32b(t.weight_decay))
        };
        prop_assert_eq!(tc(&back.tc), tc(&ck.tc));
        let s = |t: &TrainState| (t.epoch, t.step, t.correct, f64b(t.loss_sum), f64b(t.seconds));
        prop_assert_eq!(s(&back.state), s(&ck.state));
        let h = |v: &[EpochStats]| -> Vec<_> {
            v.iter()
                .map(|e| (e.epoch, f64b(e.train_loss), f64b(e.train_accuracy),
                          e.val_accuracy.map(f64b), e.test_accuracy.map(f64b),
                          f64b(e.seconds), f64b(e.images_per_second), f32b(e.lr)))
                .collect()
        };
        prop_assert_eq!(h(&back.state.history), h(&ck.state.history));
    }
}

/// A picture with ink: a background level, then 1–6 strokes (rectangles and single pixels)
/// of an ink level far from it, on a canvas of 1–80 × 1–80.
#[derive(Clone, Debug)]
struct Picture {
    img: image::GrayImage,
    bg: u8,
}

fn picture() -> impl Strategy<Value = Picture> {
    (1u32..=80, 1u32..=80, any::<bool>(), 0u8..=40, 0u8..=60).prop_flat_map(
        |(w, h, light, bg_off, ink_off)| {
            let stroke = (0..w, 0..h, 1u32..=30, 1u32..=30, 0u8..=20);
            prop::collection::vec(stroke, 1..=6).prop_map(move |strokes| {
                // Dark ink on light paper or light ink on dark: ink ≥ 135 grey levels from the
                // background.
                let (bg, ink) = if light {
                    (255 - bg_off, ink_off)
                } else {
                    (bg_off, 255 - ink_off)
                };
                let mut img = image::GrayImage::from_pixel(w, h, image::Luma([bg]));
                for (x, y, sw, sh, jitter) in strokes {
                    for yy in y..(y + sh).min(h) {
                        for xx in x..(x + sw).min(w) {
                            let v = if light {
                                ink.saturating_add(jitter)
                            } else {
                                ink.saturating_sub(jitter)
                            };
                            img.put_pixel(xx, yy, image::Luma([v]));
                        }
                    }
                }
                Picture { img, bg }
            })
        },
    )
}

/// Whether the background is still clearly the background: under a quarter of the border is
/// ink. (A picture whose border is mostly ink has its "background" decided otherwise, and may
/// legitimately come out blank.)
fn clear_background(p: &Picture) -> bool {
    let (w, h) = p.img.dimensions();
    let border: Vec<u8> = (0..w)
        .flat_map(|x| [(x, 0), (x, h - 1)])
        .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]))
        .map(|(x, y)| p.img.get_pixel(x, y)[0])
        .collect();
    let inked = border.iter().filter(|v| v.abs_diff(p.bg) > 40).count();
    4 * inked < border.len()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Any picture with ink on a clear background normalises to 28×28 with the ink inside a
    /// 20×20 box and its centre of mass within 6.5 px of the centre (the fuzz target's bound);
    /// the colour-inverted picture gives exactly the same result; whatever the picture, an
    /// `Err` can only be "blank".
    #[test]
    fn normalised_pictures_are_centred(p in picture()) {
        let r = mnist_normalize(&p.img, "prop");
        if let Err(e) = &r {
            prop_assert!(e.to_string().contains("blank"), "{}", e);
        }
        let Ok(out) = r else {
            prop_assert!(!clear_background(&p), "ink on a clear background refused: {:?}", r);
            return Ok(());
        };
        prop_assert_eq!(out.len(), 28 * 28);
        let rows: Vec<usize> = (0..28).filter(|&y| out[y * 28..(y + 1) * 28].iter().any(|&v| v > 0)).collect();
        let cols: Vec<usize> = (0..28).filter(|&x| (0..28).any(|y| out[y * 28 + x] > 0)).collect();
        prop_assert!(!rows.is_empty(), "ink left in the output");
        prop_assert!(rows[rows.len() - 1] - rows[0] < 20 && cols[cols.len() - 1] - cols[0] < 20,
                     "ink within 20×20: rows {:?} cols {:?}", rows, cols);
        let (cr, cc) = center_of_mass(&out, 28).unwrap();
        prop_assert!((cr - 13.5).abs() <= 6.5 && (cc - 13.5).abs() <= 6.5, "centre of mass {} {}", cr, cc);
        // Dark-on-light and light-on-dark are the same digit.
        let mut inv = p.img.clone();
        image::imageops::invert(&mut inv);
        let (w, h) = p.img.dimensions();
        let border_mean = (0..w).flat_map(|x| [(x, 0), (x, h - 1)])
            .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]))
            .map(|(x, y)| f64::from(p.img.get_pixel(x, y)[0]))
            .sum::<f64>();
        // The picture is inverted when its border's mean is above 127, so with a mean strictly
        // between 127 and 128 both it and its inverse are: skip that band.
        let m = border_mean / (2.0 * f64::from(w + h));
        if m <= 127.0 || m >= 128.0 {
            prop_assert_eq!(mnist_normalize(&inv, "prop inverted").unwrap(), out);
        }
    }

    /// A blank picture — one grey level with noise of at most ±20 — is an `Err` saying "blank",
    /// whatever its size or level.
    #[test]
    fn blank_pictures_are_refused(w in 1u32..=80, h in 1u32..=80, level in 20u8..=235,
                                  noise in prop::collection::vec(0u8..=40, 1..64)) {
        let mut img = image::GrayImage::from_pixel(w, h, image::Luma([level]));
        for (i, p) in img.pixels_mut().enumerate() {
            p[0] = level - 20 + noise[i % noise.len()];
        }
        let e = mnist_normalize(&img, "blank.png").unwrap_err().to_string();
        prop_assert!(e.contains("blank.png") && e.contains("blank"), "{}", e);
    }
}

#[test]
fn uniform_black_and_white_are_blank() {
    for v in [0u8, 255] {
        let img = image::GrayImage::from_pixel(30, 7, image::Luma([v]));
        assert!(mnist_normalize(&img, "u").is_err());
    }
}
