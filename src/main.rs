//! The `mnistconv` command: a thin layer of flags and messages over the library.
//!
//! Exit codes: 0 success; 1 a run that failed (divergence, a failed gradient check);
//! 2 bad usage or bad input.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mnistconv::checkpoint::{self, Model};
use mnistconv::gradcheck;
use mnistconv::mnist::{self, Dataset, Split};
use mnistconv::serve;
use mnistconv::train::{self, Event, Recipe, TrainConfig};
use mnistconv::{Activation, Error, NetConfig, Params, Pooling};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Train, evaluate and check the hand-derived convolutional network "architecture 1".
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a network (on the embedded 5,000-image MNIST sample unless --data is given).
    Train(TrainArgs),
    /// Accuracy, per-class precision/recall and confusion matrix of a checkpoint.
    Eval(EvalArgs),
    /// Check every hand-derived gradient against central finite differences (f64).
    Gradcheck(GradcheckArgs),
    /// Measure training and inference speed, and the machine's GEMM and FMA ceilings.
    Bench(BenchArgs),
    /// Export a checkpoint as a standard ONNX graph (logits and probabilities).
    Export(ExportArgs),
    /// Fetch MNIST or Fashion-MNIST from the usual mirrors, verifying every file's SHA-256.
    Download(DownloadArgs),
    /// Classify images of a data set by index: top 3 classes with probabilities.
    Predict(PredictArgs),
    /// Walk through the derivation for one image: every factor of the chain rule, its shape,
    /// norm and first values, each checked against finite differences (f64 reference path).
    Explain(ExplainArgs),
    /// Draw what the network learned and computes, as PNG files: kernels.png, feature_maps.png,
    /// backprop_maps.png, confusion.png, errors.png (with --model) and training.png (with --metrics).
    Viz(VizArgs),
    /// Serve a page to draw a digit on and watch the forward and backward pass live, with its
    /// JSON API (see the README).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct VizArgs {
    /// Checkpoint to draw (kernels, maps for one image, confusion matrix and errors).
    #[arg(long, required_unless_present = "metrics")]
    model: Option<PathBuf>,
    /// Data directory for the image and the scored split (default: the embedded sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which files to score and take the image from: t10k-* (test) or train-*.
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Use the last N images of the train-* files instead (the validation split of
    /// `train --val N`).
    #[arg(long, conflicts_with = "split")]
    val: Option<usize>,
    /// Index (in the chosen split) of the image whose maps are drawn.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Draw the maps for this picture (PNG or JPEG, normalised as `predict` does) instead.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Target class for the backward pass (default: the image's label, or for --image the
    /// predicted class).
    #[arg(long)]
    label: Option<usize>,
    /// Metrics written by `train --metrics`: draws training.png.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Directory to write the pictures into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Worker threads for scoring (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Checkpoint to explain.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback unless told otherwise; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Threads answering requests.
    #[arg(long, default_value_t = 8)]
    workers: usize,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Checkpoint to explain (default: freshly initialised weights, see --seed).
    #[arg(long, conflicts_with = "seed")]
    model: Option<PathBuf>,
    /// Seed of the He-initialised weights used without --model.
    #[arg(long)]
    seed: Option<u64>,
    /// Data directory (default: the embedded sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which files: t10k-* (test) or train-*.
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Image index.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Explain this picture (PNG or JPEG, normalised as `predict` does) instead of a data-set
    /// image.
    #[arg(long, conflicts_with_all = ["data", "index"])]
    image: Option<PathBuf>,
    /// Target class (default: the image's label, or for --image the predicted class).
    #[arg(long)]
    label: Option<usize>,
    /// Coordinates checked per factor.
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Write every quantity to this safetensors file (f64).
    #[arg(long)]
    out: Option<PathBuf>,
    /// One JSON object instead of the walk-through.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PredictArgs {
    /// Checkpoint to use.
    #[arg(long)]
    model: PathBuf,
    /// Pictures of digits (PNG or JPEG), normalised as MNIST was: grey, inverted if the
    /// background is light, cropped, scaled to 20 px, centred by mass in 28×28.
    images: Vec<PathBuf>,
    /// Take the pictures as they are (they must be 28×28, bright ink on dark).
    #[arg(long)]
    raw: bool,
    /// Data directory for --index (default: the embedded sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which files for --index: t10k-* (test) or train-*.
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Data-set image indices (instead of picture files).
    #[arg(long, num_args = 1..)]
    index: Vec<usize>,
    /// One JSON object per image (with the logits and all probabilities).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Checkpoint to export.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the ONNX file.
    #[arg(long)]
    onnx: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum DatasetArg {
    Mnist,
    Fashion,
}

#[derive(clap::Args)]
struct DownloadArgs {
    /// Which data set.
    #[arg(long, value_enum, default_value = "mnist")]
    dataset: DatasetArg,
    /// Directory to put the four .gz files in (default: data/mnist or data/fashion-mnist).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A mirror to use instead of the usual ones (repeat for several; tried in order).
    #[arg(long)]
    mirror: Vec<String>,
    /// Seconds without progress before a mirror is given up.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Data directory whose train-* images are used (default: the embedded sample); images are
    /// reused cyclically to make up --images.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Images per training epoch.
    #[arg(long, default_value_t = 60_000)]
    images: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Timed runs; medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum RecipeArg {
    Book,
    Default,
}

#[derive(Clone, Copy, ValueEnum)]
enum ActArg {
    Relu,
    Sigmoid,
    Tanh,
}

impl From<ActArg> for Activation {
    fn from(a: ActArg) -> Self {
        match a {
            ActArg::Relu => Activation::Relu,
            ActArg::Sigmoid => Activation::Sigmoid,
            ActArg::Tanh => Activation::Tanh,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum PoolArg {
    Mean,
    Max,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum SplitArg {
    Train,
    Test,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Directory with train-* (and optionally t10k-*) IDX files, e.g. ../shared/data/mnist.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Hold out the last N training images as a validation split.
    #[arg(long, default_value_t = 0)]
    val: usize,
    /// Use only the first N images of the training files (before the validation split).
    #[arg(long)]
    limit: Option<usize>,
    /// Recipe whose values the other flags override.
    #[arg(long, value_enum, default_value = "default")]
    recipe: RecipeArg,
    /// Passes over the training set.
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per mini-batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate α.
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f32>,
    /// Momentum β, in [0, 1).
    #[arg(long, allow_hyphen_values = true)]
    momentum: Option<f32>,
    /// L2 weight decay on the weights.
    #[arg(long, allow_hyphen_values = true)]
    weight_decay: Option<f32>,
    /// Random shifts of up to N pixels of each training image (0: none).
    #[arg(long)]
    shift: Option<usize>,
    /// Seed for initialisation, shuffling and augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Add biases to the conv and both dense layers (the document has none).
    #[arg(long)]
    bias: bool,
    /// Pooling of the conv maps.
    #[arg(long, value_enum, default_value = "mean")]
    pooling: PoolArg,
    /// Hidden-layer activation φ.
    #[arg(long, value_enum, default_value = "relu")]
    act: ActArg,
    /// Activation of the conv maps.
    #[arg(long, value_enum, default_value = "relu")]
    conv_act: ActArg,
    /// Number of kernels.
    #[arg(long, default_value_t = 20)]
    kernels: usize,
    /// Kernel size.
    #[arg(long, default_value_t = 9)]
    ksize: usize,
    /// Pooling window size.
    #[arg(long, default_value_t = 2)]
    pool: usize,
    /// Hidden-layer width.
    #[arg(long, default_value_t = 100)]
    hidden: usize,
    /// Where to save the trained checkpoint (safetensors).
    #[arg(long, default_value = "mnistconv.safetensors")]
    out: PathBuf,
    /// End with one JSON object on stdout (epoch lines go to stderr).
    #[arg(long)]
    json: bool,
    /// No progress and no epoch lines: only the final summary (or JSON) on stdout.
    #[arg(long)]
    quiet: bool,
    /// Save a resumable checkpoint here at each epoch end (and see --checkpoint-every).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Also save one every N steps (0: only at epoch ends).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    /// Continue from the newest complete checkpoint in DIR (same --data, --limit and --val as
    /// the run it continues; the network and recipe come from the checkpoint).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Write one JSON line per epoch here (epoch, loss, accuracies, seconds, learning rate),
    /// rewritten atomically after each epoch; `viz --metrics FILE` draws it.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// At the end, draw kernels.png, feature_maps.png, backprop_maps.png, training.png,
    /// confusion.png and errors.png into DIR (scored on the test split, else the validation
    /// split, else the training images).
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Follow the run live in a browser at this address (e.g. 127.0.0.1:8080): loss and
    /// accuracy curves and the kernels as they learn; the page stays up after the run.
    #[arg(long, value_name = "ADDR")]
    serve: Option<String>,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Checkpoint to evaluate.
    #[arg(long)]
    model: PathBuf,
    /// Data directory (default: the embedded sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which files: t10k-* (test) or train-*.
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct GradcheckArgs {
    /// Coordinates sampled per tensor.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Seed for the weights and the sampled coordinates.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // A reader that stops early (`mnistconv … | head`) closes the pipe; Rust's print macros
    // then panic. Leave quietly instead, as a tool killed by SIGPIPE would (status 141).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            for h in hints(&e) {
                eprintln!("---> HINT: {h}");
            }
            let failed_run = matches!(e.downcast_ref::<Error>(), Some(Error::Diverged { .. }));
            ExitCode::from(if failed_run { 1 } else { 2 })
        }
    }
}

fn hints(e: &anyhow::Error) -> Vec<String> {
    match e.downcast_ref::<Error>() {
        Some(Error::MissingFile { .. }) => vec![
            "MNIST's files are train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz (and t10k-* for the test split)".into(),
            "to fetch them, with checksums: mnistconv download --dir DIR".into(),
            "Fashion-MNIST: apt-get install dataset-fashion-mnist, then --data /usr/share/datasets/fashion-mnist".into(),
        ],
        _ => vec![],
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Train(a) => cmd_train(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Gradcheck(a) => cmd_gradcheck(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Predict(a) => cmd_predict(a),
        Cmd::Explain(a) => cmd_explain(a),
        Cmd::Viz(a) => cmd_viz(a),
        Cmd::Serve(a) => {
            let model = checkpoint::load(&a.model)?;
            let app =
                serve::App::with_model(serve::Loaded::new(&model, &a.model.display().to_string())?);
            let server = serve::serve(std::sync::Arc::new(app), &a.addr, a.workers)?;
            println!("listening on http://{}", server.addr());
            if !server.addr().ip().is_loopback() {
                eprintln!(
                    "warning: {} is reachable from other machines",
                    server.addr()
                );
            }
            server.wait();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Download(a) => cmd_download(a),
        Cmd::Export(a) => {
            let model = checkpoint::load(&a.model)?;
            // (the error names the file)
            mnistconv::onnx::export(&model, &a.onnx)?;
            println!(
                "wrote {} from {} (opset 13; input [batch,1,{2},{2}] → logits, probabilities [batch,{3}])",
                a.onnx.display(),
                a.model.display(),
                model.cfg.img,
                model.cfg.classes
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The training data and the optional test split, from DIR or the embedded sample.
fn load_data(dir: Option<&Path>) -> anyhow::Result<(Dataset, Option<Dataset>, String)> {
    Ok(match dir {
        None => (
            mnist::embedded::train(),
            Some(mnist::embedded::test()),
            "embedded MNIST sample".into(),
        ),
        Some(d) => {
            let train = mnist::load_split(d, Split::Train)?;
            let test = if mnist::has_split(d, Split::Test) {
                Some(mnist::load_split(d, Split::Test)?)
            } else {
                None
            };
            (train, test, d.display().to_string())
        }
    })
}

/// Fashion-MNIST's class names, by label.
const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

fn cmd_train(a: TrainArgs) -> anyhow::Result<ExitCode> {
    // The run's settings: from the flags, or from the checkpoint being resumed.
    let resumed = match &a.resume {
        Some(dir) => {
            for t in checkpoint::remove_unfinished(dir)? {
                eprintln!(
                    "note: removed {}, a checkpoint whose writing never finished",
                    t.display()
                );
            }
            let (ck, path, skipped) = checkpoint::load_newest_training(dir)?;
            for s in skipped {
                eprintln!("warning: skipped a damaged checkpoint: {s}");
            }
            Some((ck, path))
        }
        None => None,
    };
    let (cfg, mut tc) = match &resumed {
        Some((ck, _)) => (ck.cfg, ck.tc.clone()),
        None => {
            let cfg = NetConfig {
                n_kernels: a.kernels,
                ksize: a.ksize,
                pool: a.pool,
                hidden: a.hidden,
                conv_act: a.conv_act.into(),
                act: a.act.into(),
                pooling: match a.pooling {
                    PoolArg::Mean => Pooling::Mean,
                    PoolArg::Max => Pooling::Max,
                },
                bias: a.bias,
                ..NetConfig::default()
            };
            cfg.validate()?;
            let recipe = match a.recipe {
                RecipeArg::Book => Recipe::Book,
                RecipeArg::Default => Recipe::Default,
            };
            if recipe == Recipe::Book && a.bias {
                bail!(
                    "--recipe book is the document's bias-free network; drop --bias or use --recipe default"
                );
            }
            let mut tc = TrainConfig::for_recipe(recipe);
            tc.epochs = a.epochs.unwrap_or(tc.epochs);
            tc.batch = a.batch.unwrap_or(tc.batch);
            tc.lr = a.lr.unwrap_or(tc.lr);
            tc.momentum = a.momentum.unwrap_or(tc.momentum);
            tc.weight_decay = a.weight_decay.unwrap_or(tc.weight_decay);
            tc.shift = a.shift.unwrap_or(tc.shift);
            tc.seed = a.seed.unwrap_or(tc.seed);
            (cfg, tc)
        }
    };
    if a.threads == Some(0) {
        bail!("--threads must be at least 1 (leave it out to use every core)");
    }
    tc.threads = a.threads.unwrap_or(0);
    tc.validate()?;
    if a.checkpoint_every > 0 && a.checkpoint_dir.is_none() && a.resume.is_none() {
        bail!("--checkpoint-every needs --checkpoint-dir");
    }

    let (mut all, test, source) = load_data(a.data.as_deref())?;
    // Fashion-MNIST is recognised by its training labels (the IDX content's SHA-256), so that
    // `predict` can name its classes.
    let class_names = {
        use mnistconv::download::{fashion_files, sha256_hex};
        (sha256_hex(&mnist::write_labels(&all.labels)) == fashion_files()[1].sha256_raw)
            .then(|| FASHION_CLASSES.map(String::from).to_vec())
    };
    if let Some(l) = a.limit {
        if l == 0 {
            bail!("--limit must be at least 1");
        }
        all = all.slice(0..l.min(all.len()));
    }
    if a.val >= all.len() {
        bail!(
            "--val {} leaves no training images ({} images{})",
            a.val,
            all.len(),
            if a.limit.is_some() {
                " after --limit"
            } else {
                ""
            }
        );
    }
    let split = all.len() - a.val;
    let train_set = all.slice(0..split);
    let val_set = (a.val > 0).then(|| all.slice(split..all.len()));
    train_set.check_fits(cfg.img, cfg.classes, &source)?;
    if let Some(t) = &test {
        t.check_fits(cfg.img, cfg.classes, &format!("{source} (test split)"))?;
    }
    let fingerprint = format!(
        "{}; val {}",
        train_set.fingerprint(),
        val_set
            .as_ref()
            .map(|v| v.fingerprint())
            .unwrap_or_else(|| "none".into())
    );

    // Before training: that the model, and the checkpoints, can be written where asked (a
    // read-only or missing directory is reported now, not after the training).
    mnistconv::fsutil::check_writable(&a.out)?;
    if let Some(dir) = a.checkpoint_dir.as_ref().or(a.resume.as_ref()) {
        mnistconv::fsutil::check_writable_dir(dir)?;
    }
    if let Some(m) = &a.metrics {
        mnistconv::fsutil::check_writable(m)?;
    }
    if let Some(dir) = &a.plots {
        mnistconv::fsutil::check_writable_dir(dir)?;
    }

    let say = |s: String| {
        if a.quiet {
        } else if a.json {
            eprintln!("{s}")
        } else {
            println!("{s}")
        }
    };
    let mut state = match resumed {
        Some((ck, path)) => {
            if ck.data != fingerprint {
                bail!(
                    "{} was made on other training data ({}); give the same --data, --limit and --val as the run it continues ({})",
                    path.display(),
                    ck.data,
                    fingerprint
                );
            }
            say(format!(
                "resuming from {}: epoch {}, step {} of {} epochs",
                path.display(),
                ck.state.epoch,
                ck.state.step,
                tc.epochs
            ));
            ck.state
        }
        None => {
            say(format!(
                "training on {} images from {source} ({} for validation{}), recipe {:?}: {} epochs, batch {}, lr {}, momentum {}",
                train_set.len(),
                a.val,
                if test.is_some() {
                    ", test split present"
                } else {
                    ""
                },
                tc.recipe,
                tc.epochs,
                tc.batch,
                tc.lr,
                tc.momentum
            ));
            train::TrainState::new(&cfg, Params::init(&cfg, tc.init, tc.seed))
        }
    };
    let ckpt_dir = a.checkpoint_dir.clone().or_else(|| a.resume.clone());
    // Progress: a bar on a terminal, a plain line every tenth of an epoch otherwise (both on
    // stderr), nothing with --quiet. Epoch lines go where `say` puts them.
    let tty = std::io::stderr().is_terminal();
    let mut bar: Option<indicatif::ProgressBar> = None;
    // Every epoch so far (a resumed run's included), for --metrics.
    let mut metrics = state.history.clone();
    // --serve: a page following the run. It gets the weights from checkpoint events, so ask for
    // about 20 per epoch; only the ones the flags asked for are written (below).
    let live = match &a.serve {
        Some(addr) => {
            let app = std::sync::Arc::new(serve::App::for_training(&cfg, &tc, train_set.len()));
            let server = serve::serve(app.clone(), addr, 4)?;
            eprintln!("following the run at http://{}/train", server.addr());
            Some((app, server))
        }
        None => None,
    };
    let every = match (&live, a.checkpoint_every) {
        (Some(_), 0) => (train_set.len().div_ceil(tc.batch.max(1)) / 20).max(1),
        (_, n) => n,
    };
    let history = train::train_from(
        &cfg,
        &tc,
        &mut state,
        &train_set,
        val_set.as_ref(),
        test.as_ref(),
        every,
        |ev: Event| {
            if let Some((app, _)) = &live {
                app.on_train_event(&ev);
            }
            match ev {
                Event::Step(s) if !a.quiet => {
                    let msg = format!(
                        "loss {:.4}  acc {}  {:.0} img/s",
                        s.loss,
                        pct(s.accuracy),
                        s.images_per_second
                    );
                    if tty {
                        let pb = bar.get_or_insert_with(|| {
                            let pb = indicatif::ProgressBar::new(s.steps as u64);
                            pb.set_style(
                                indicatif::ProgressStyle::with_template(
                                    "{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
                                )
                                .expect("valid template")
                                .progress_chars("=> "),
                            );
                            pb
                        });
                        pb.set_prefix(format!("epoch {}/{}", s.epoch, tc.epochs));
                        pb.set_position(s.step as u64);
                        pb.set_message(msg);
                    } else if s.step % (s.steps / 10).max(1) == 0 && s.step < s.steps {
                        // Images left in the epoch over the epoch's rate so far.
                        let left = (s.steps - s.step) as f64
                            * (train_set.len() as f64 / s.steps as f64)
                            / s.images_per_second.max(1e-9);
                        eprintln!(
                            "epoch {}/{}  step {}/{}  {msg}  eta {:.0} s",
                            s.epoch, tc.epochs, s.step, s.steps, left
                        );
                    }
                }
                Event::Step(_) => {}
                Event::Epoch(s) => {
                    if let Some(pb) = bar.take() {
                        pb.finish_and_clear();
                    }
                    if let Some(path) = &a.metrics {
                        metrics.push(s.clone());
                        mnistconv::fsutil::atomic_write(
                            path,
                            mnistconv::viz::metrics_lines(&metrics).as_bytes(),
                        )?;
                    }
                    let mut line = format!(
                        "epoch {:>2}/{}  loss {:.4}  train {}",
                        s.epoch,
                        tc.epochs,
                        s.train_loss,
                        pct(s.train_accuracy)
                    );
                    if let Some(v) = s.val_accuracy {
                        line += &format!("  val {}", pct(v));
                    }
                    if let Some(t) = s.test_accuracy {
                        line += &format!("  test {}", pct(t));
                    }
                    line += &format!("  {:.1} s  {:.0} img/s", s.seconds, s.images_per_second);
                    say(line);
                }
                // (mid-epoch ones only when --checkpoint-every asked for them)
                Event::Checkpoint(st) if a.checkpoint_every > 0 || st.step == 0 => {
                    if let Some(dir) = &ckpt_dir {
                        let ck = checkpoint::TrainCheckpoint {
                            cfg,
                            tc: tc.clone(),
                            data: fingerprint.clone(),
                            state: st.clone(),
                        };
                        checkpoint::save_training(dir, &ck)?;
                    }
                }
                Event::Checkpoint(_) => {}
            }
            Ok(())
        },
    );
    if let Some((app, _)) = &live {
        app.train_finished(history.as_ref().err().map(|e| e.to_string()));
    }
    let history = history?;
    let params = state.params;
    let mut meta: std::collections::HashMap<String, String> = [
        (
            "recipe".to_string(),
            serde_json::to_string(&tc).expect("serialises"),
        ),
        ("data".to_string(), source.clone()),
    ]
    .into();
    if let Some(names) = &class_names {
        meta.insert(
            "class_names".into(),
            serde_json::to_string(names).expect("serialises"),
        );
    }
    let model = Model { cfg, params, meta };
    // (the error names the file)
    checkpoint::save(&a.out, &model)?;
    if let Some(dir) = &a.plots {
        let (eval, what) = match (&test, &val_set) {
            (Some(t), _) => (t, "test split"),
            (None, Some(v)) => (v, "validation split"),
            (None, None) => (&train_set, "training images"),
        };
        let label = usize::from(eval.labels[0]);
        let t = mnistconv::explain::trace(
            &cfg,
            &model.params.map(f64::from),
            &eval.image_f64(0),
            label,
            1,
            1,
        );
        let caption = format!(
            "image 0 of the {what} ({source}), label {label}, model {}",
            a.out.display()
        );
        let files = mnistconv::viz::write_all(
            dir,
            &mnistconv::viz::Pictures {
                model: &model,
                trace: Some((&t, caption)),
                eval: Some((
                    eval,
                    format!("{} images of the {what} ({source})", eval.len()),
                )),
                history: Some((
                    &history,
                    format!(
                        "{} epochs on {} images from {source}, recipe {:?}",
                        history.len(),
                        train_set.len(),
                        tc.recipe
                    ),
                )),
                threads: tc.threads,
            },
        )?;
        say(format!(
            "pictures: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let last = history.last().expect("at least one epoch");
    let train_seconds: f64 = history.iter().map(|s| s.seconds).sum();
    let ips = (train_set.len() * history.len()) as f64 / train_seconds;
    if a.json {
        println!(
            "{}",
            json!({
                "epochs": history.len(),
                "train_seconds": train_seconds,
                "images_per_second": ips,
                "final_train_loss": last.train_loss,
                "val_accuracy": last.val_accuracy,
                "test_accuracy": last.test_accuracy,
                "model": a.out,
                "history": history,
            })
        );
    } else {
        println!(
            "saved {} ({} epochs, {:.1} s of training, {:.0} images/s)",
            a.out.display(),
            history.len(),
            train_seconds,
            ips
        );
        if a.data.is_none() {
            println!(
                "hint: this was the 5,000-image sample built into the binary; for full MNIST run\n      mnistconv train --data ../shared/data/mnist --val 10000"
            );
        }
    }
    if let Some((app, server)) = live {
        if let Ok(m) = serve::Loaded::new(&model, &a.out.display().to_string()) {
            app.set_model(m);
        }
        eprintln!(
            "the run is over; its page stays at http://{}/train (Ctrl-C to stop)",
            server.addr()
        );
        server.wait();
    }
    Ok(ExitCode::SUCCESS)
}

fn split_data(data: &Option<PathBuf>, split: SplitArg) -> anyhow::Result<(Dataset, String)> {
    Ok(match (data, split) {
        (None, SplitArg::Test) => (
            mnist::embedded::test(),
            "embedded sample, test split".to_string(),
        ),
        (None, SplitArg::Train) => (
            mnist::embedded::train(),
            "embedded sample, train split".to_string(),
        ),
        (Some(d), s) => {
            let split = if s == SplitArg::Test {
                Split::Test
            } else {
                Split::Train
            };
            (mnist::load_split(d, split)?, d.display().to_string())
        }
    })
}

fn cmd_predict(a: PredictArgs) -> anyhow::Result<ExitCode> {
    if a.images.is_empty() == a.index.is_empty() {
        bail!("give either picture files or --index (one or more), not both or neither");
    }
    let model = checkpoint::load(&a.model)?;
    let p64 = model.params.map(f64::from);
    // Class names when the checkpoint has them (e.g. trained on Fashion-MNIST).
    let names: Option<Vec<String>> = model
        .meta
        .get("class_names")
        .and_then(|s| serde_json::from_str(s).ok());
    let cname = |c: usize| {
        names
            .as_ref()
            .and_then(|n| n.get(c))
            .map(|s| format!(" {s}"))
            .unwrap_or_default()
    };
    let report = |name: &str, index: Option<usize>, label: Option<usize>, px: &[f64]| {
        // The f64 reference path: the logits exactly as the formulas give them.
        let act = mnistconv::reference::forward(&model.cfg, &p64, px, label.unwrap_or(0));
        let mut order: Vec<usize> = (0..act.y.len()).collect();
        order.sort_by(|&x, &y| act.y[y].total_cmp(&act.y[x]));
        if a.json {
            println!(
                "{}",
                json!({"image": name, "index": index, "label": label, "prediction": order[0],
                       "class_name": names.as_ref().and_then(|n| n.get(order[0])),
                       "top3": order.iter().take(3).map(|&c| json!({"class": c, "name": names.as_ref().and_then(|n| n.get(c)), "probability": act.y[c]})).collect::<Vec<_>>(),
                       "probabilities": act.y, "logits": act.v})
            );
        } else {
            let top: Vec<String> = order
                .iter()
                .take(3)
                .map(|&c| format!("{c}{} ({})", cname(c), pct(act.y[c])))
                .collect();
            let label = label
                .map(|l| format!(" (label {l}{})", cname(l)))
                .unwrap_or_default();
            println!("{name}{label}: {}", top.join("  "));
        }
    };
    if !a.index.is_empty() {
        let (data, source) = split_data(&a.data, a.split)?;
        data.check_fits(model.cfg.img, model.cfg.classes, &source)?;
        for &i in &a.index {
            if i >= data.len() {
                bail!(
                    "--index {i}: {source} has {} images (0..{})",
                    data.len(),
                    data.len()
                );
            }
            report(
                &format!("image {i}"),
                Some(i),
                Some(usize::from(data.labels[i])),
                &data.image_f64(i),
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if model.cfg.img != 28 {
        bail!(
            "pictures are normalised to 28×28; this model takes {0}×{0}",
            model.cfg.img
        );
    }
    let mut failed = 0;
    for path in &a.images {
        let name = path.display().to_string();
        let px = mnistconv::preprocess::read_gray(path).and_then(|g| {
            if a.raw {
                mnistconv::preprocess::raw_28(&g, &name)
            } else {
                mnistconv::preprocess::mnist_normalize(&g, &name)
            }
        });
        match px {
            Ok(px) => report(
                &name,
                None,
                None,
                &px.iter().map(|&v| f64::from(v) / 255.0).collect::<Vec<_>>(),
            ),
            Err(e) => {
                // This file's problem; the others still get their answer.
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    if a.threads == Some(0) {
        bail!("--threads must be at least 1 (leave it out to use every core)");
    }
    let model = checkpoint::load(&a.model)?;
    let (data, source) = split_data(&a.data, a.split)?;
    let ev = train::evaluate(&model, &data, a.threads.unwrap_or(0))?;
    if a.json {
        println!("{}", serde_json::to_string(&ev)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: accuracy {} on {} images ({source})",
        a.model.display(),
        pct(ev.accuracy),
        ev.n
    );
    println!("\nclass  precision  recall");
    for (c, s) in ev.per_class.iter().enumerate() {
        println!("{c:>5}  {:>9}  {:>6}", pct(s.precision), pct(s.recall));
    }
    println!("\nconfusion (rows = true class, columns = predicted)");
    print!("     ");
    for c in 0..ev.confusion.len() {
        print!("{c:>6}");
    }
    println!();
    for (t, row) in ev.confusion.iter().enumerate() {
        print!("{t:>5}");
        for v in row {
            print!("{v:>6}");
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_gradcheck(a: GradcheckArgs) -> anyhow::Result<ExitCode> {
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let data = mnist::embedded::test();
    let mut results = Vec::new();
    for (v, cfg) in gradcheck::variants().iter().enumerate() {
        // A different real image for each variant.
        let i = 7 * v;
        let r = gradcheck::check_variant(
            cfg,
            &data.image_f64(i),
            usize::from(data.labels[i]),
            a.samples,
            a.seed + v as u64,
        );
        results.push(r);
    }
    let tol = gradcheck::TOLERANCE;
    let ok = results
        .iter()
        .all(|r| r.tensors.iter().all(|t| t.passed(tol)));
    if a.json {
        println!(
            "{}",
            json!({"tolerance": tol, "step": gradcheck::STEP, "passed": ok, "variants": results})
        );
    } else {
        println!(
            "central differences (4th order, h = {}) vs hand-derived gradients; fail above {tol:e}",
            gradcheck::STEP
        );
        println!(
            "{:<30} {:<12} {:>7} {:>6} {:>12}",
            "variant (conv/φ/pool/bias)", "tensor", "checked", "kinks", "max rel err"
        );
        for r in &results {
            for t in &r.tensors {
                println!(
                    "{:<30} {:<12} {:>7} {:>6} {:>12.3e}{}",
                    r.variant,
                    t.tensor,
                    t.checked,
                    t.kinks,
                    t.max_rel_error,
                    if t.passed(tol) { "" } else { "  FAIL" }
                );
            }
        }
        println!(
            "{}",
            if ok {
                "all gradients agree"
            } else {
                "GRADIENT CHECK FAILED"
            }
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.threads == Some(0) || a.batch == 0 || a.runs == 0 || a.images == 0 {
        bail!("--threads, --batch, --runs and --images must be at least 1");
    }
    let data = match &a.data {
        Some(d) => mnist::load_split(d, Split::Train)?,
        None => mnist::embedded::train(),
    };
    let r = mnistconv::bench::run(&data, a.images, a.batch, a.runs, a.threads.unwrap_or(0))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "mnistconv bench: {} threads, kernels {}, medians of {} runs",
        r.threads, r.kernels, r.runs
    );
    println!(
        "  training, batch {:>4}:  {:.3} s per {}-image epoch, {:.0} images/s, {:.1} GFLOP/s",
        r.batch, r.train_epoch_seconds, r.images, r.train_images_per_second, r.train_gflops
    );
    let (fastest, slowest) = r
        .train_epoch_seconds_runs
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &t| (a.min(t), b.max(t)));
    println!("                         runs from {fastest:.3} to {slowest:.3} s");
    println!(
        "  skipped as exact zeros: {:.1}% of those multiply-adds (blank background), so {:.1} GFLOP/s executed",
        100.0 * r.skipped_share,
        r.train_gflops_executed
    );
    println!(
        "  inference, batched:    {:.0} images/s",
        r.infer_images_per_second
    );
    println!(
        "  inference, one image:  {:.1} µs (one thread)",
        r.latency_us
    );
    println!(
        "  f32 GEMM 1024³:        {:.1} GFLOP/s  (training reaches {:.0}% of it; own kernel {:.1}, matrixmultiply {:.1})",
        r.gemm_gflops,
        100.0 * r.fraction_of_gemm,
        r.gemm_own_gflops,
        r.gemm_matrixmultiply_gflops
    );
    println!(
        "  FMA peak:              {:.1} GFLOP/s  (training reaches {:.0}% of it)",
        r.fma_peak_gflops,
        100.0 * r.fraction_of_peak
    );
    if let Some(m) = r.peak_rss_mb {
        println!("  peak RSS:              {m:.0} MB");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_explain(a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let (cfg, params, what) = match &a.model {
        Some(path) => {
            let m = checkpoint::load(path)?;
            (m.cfg, m.params, path.display().to_string())
        }
        None => {
            let cfg = NetConfig::default();
            let seed = a.seed.unwrap_or(1);
            (
                cfg,
                Params::init(&cfg, mnistconv::Init::He, seed),
                format!("He-initialised weights (seed {seed})"),
            )
        }
    };
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let p64 = params.map(f64::from);
    let pick = match &a.image {
        Some(path) => Pick::Picture(path),
        None => Pick::Index(split_data(&a.data, a.split)?, a.index),
    };
    let (x, label, source) = chosen_image(&cfg, &p64, pick, a.label)?;
    let t = mnistconv::explain::trace(&cfg, &p64, &x, label, a.samples, 1);
    if let Some(out) = &a.out {
        t.save(out)?; // (the error names the file)
    }
    let ok = t.factors.iter().all(|f| f.check.passed());
    if a.json {
        println!(
            "{}",
            json!({"image": source, "index": a.image.is_none().then_some(a.index), "label": label, "loss": t.acts.loss, "y": t.acts.y, "v": t.acts.v,
                   "factors": t.factors, "passed": ok})
        );
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let mut order: Vec<usize> = (0..t.acts.y.len()).collect();
    order.sort_by(|&x, &y| t.acts.y[y].total_cmp(&t.acts.y[x]));
    println!("{source}, target d = e_{label}, weights: {what}");
    println!(
        "forward: x {0}×{0} → conv_pre, y⁽⁻³⁾ {1}×{2}×{2} → y⁽⁻²⁾ {1}×{3}×{3} → v⁽⁻¹⁾, y⁽⁻¹⁾ {4} → v, y {5}",
        cfg.img,
        cfg.n_kernels,
        cfg.conv(),
        cfg.pooled(),
        cfg.hidden,
        cfg.classes
    );
    println!(
        "         y = softmax(v): {}   L = Σ −dᵢ log yᵢ = {:.6}",
        order
            .iter()
            .take(3)
            .map(|&c| format!("{c} ({})", pct(t.acts.y[c])))
            .collect::<Vec<_>>()
            .join("  "),
        t.acts.loss
    );
    println!(
        "backward, in the document's order (finite differences: 4th-order central, h = {}):",
        mnistconv::gradcheck::STEP
    );
    for f in &t.factors {
        let shape = f
            .shape
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("×");
        let head = f
            .head
            .iter()
            .map(|v| format!("{v:+.3e}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!("  {:<42} [{shape}]", f.formula);
        println!(
            "      ‖·‖ {:.4e}   {head} …   check: {} coords, {} kinks, max rel err {:.2e} {}",
            f.norm,
            f.check.checked,
            f.check.kinks,
            f.check.max_rel_error,
            match (f.check.passed(), f.check.checked) {
                (false, _) => "FAIL",
                (true, 0) => "(all at kinks)",
                (true, _) => "ok",
            }
        );
    }
    if let Some(out) = &a.out {
        println!(
            "every quantity written to {} (f64 safetensors)",
            out.display()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Where the image to explain or draw comes from.
enum Pick<'a> {
    /// A picture file, normalised as `predict` does.
    Picture(&'a Path),
    /// An image of a data set (with its description), by index.
    Index((Dataset, String), usize),
}

/// The image's pixels in [0, 1], the target class (`label`, else the data set's label, else
/// the predicted class) and a description of the image.
fn chosen_image(
    cfg: &NetConfig,
    p64: &Params<f64>,
    pick: Pick,
    label: Option<usize>,
) -> anyhow::Result<(Vec<f64>, usize, String)> {
    let (x, known, what) = match pick {
        Pick::Picture(path) => {
            if cfg.img != 28 {
                bail!(
                    "pictures are normalised to 28×28; this model takes {0}×{0}",
                    cfg.img
                );
            }
            let name = path.display().to_string();
            let px = mnistconv::preprocess::read_gray(path)
                .and_then(|g| mnistconv::preprocess::mnist_normalize(&g, &name))?;
            let x: Vec<f64> = px.iter().map(|&v| f64::from(v) / 255.0).collect();
            (x, None, name)
        }
        Pick::Index((data, source), i) => {
            data.check_fits(cfg.img, cfg.classes, &source)?;
            if i >= data.len() {
                bail!("--index {i}: {source} has {} images", data.len());
            }
            let l = usize::from(data.labels[i]);
            (
                data.image_f64(i),
                Some(l),
                format!("image {i} of {source} (label {l})"),
            )
        }
    };
    let label = match label.or(known) {
        Some(l) => l,
        None => {
            let y = mnistconv::reference::forward(cfg, p64, &x, 0).y;
            (0..y.len())
                .max_by(|&a, &b| y[a].total_cmp(&y[b]))
                .unwrap_or(0)
        }
    };
    if label >= cfg.classes {
        bail!("--label {label}: the model has {} classes", cfg.classes);
    }
    Ok((x, label, what))
}

fn cmd_viz(a: VizArgs) -> anyhow::Result<ExitCode> {
    use mnistconv::viz;
    if a.threads == Some(0) {
        bail!("--threads must be at least 1 (leave it out to use every core)");
    }
    let history = match &a.metrics {
        Some(m) => Some(viz::read_metrics(m)?),
        None => None,
    };
    let mut files = Vec::new();
    match &a.model {
        Some(path) => {
            let model = checkpoint::load(path)?;
            let p64 = model.params.map(f64::from);
            let (data, source) = match a.val {
                Some(0) => bail!("--val must be at least 1"),
                Some(n) => {
                    let (all, source) = split_data(&a.data, SplitArg::Train)?;
                    if n > all.len() {
                        bail!("--val {n}: {source} has {} training images", all.len());
                    }
                    let from = all.len() - n;
                    (
                        all.slice(from..all.len()),
                        format!("the last {n} training images of {source}"),
                    )
                }
                None => split_data(&a.data, a.split)?,
            };
            data.check_fits(model.cfg.img, model.cfg.classes, &source)?;
            let pick = match &a.image {
                Some(p) => Pick::Picture(p),
                None => Pick::Index((data.clone(), source.clone()), a.index),
            };
            let (x, label, what) = chosen_image(&model.cfg, &p64, pick, a.label)?;
            let t = mnistconv::explain::trace(&model.cfg, &p64, &x, label, 1, 1);
            let caption = format!("{what}, target {label}, model {}", path.display());
            let metrics_caption = a
                .metrics
                .as_ref()
                .map(|m| m.display().to_string())
                .unwrap_or_default();
            files = viz::write_all(
                &a.out,
                &viz::Pictures {
                    model: &model,
                    trace: Some((&t, caption)),
                    eval: Some((&data, format!("{} images: {source}", data.len()))),
                    history: history.as_deref().map(|h| (h, metrics_caption)),
                    threads: a.threads.unwrap_or(0),
                },
            )?;
        }
        None => {
            if let Some(h) = &history {
                std::fs::create_dir_all(&a.out)
                    .with_context(|| format!("creating {}", a.out.display()))?;
                let path = a.out.join("training.png");
                let caption = a
                    .metrics
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default();
                viz::training(h, &caption).save(&path)?;
                files.push(path);
            }
        }
    }
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_download(a: DownloadArgs) -> anyhow::Result<ExitCode> {
    use mnistconv::download;
    if a.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let (files, mirrors, dir) = match a.dataset {
        DatasetArg::Mnist => (
            download::mnist_files(),
            download::mnist_mirrors(),
            "data/mnist",
        ),
        DatasetArg::Fashion => (
            download::fashion_files(),
            download::fashion_mirrors(),
            "data/fashion-mnist",
        ),
    };
    let mirrors = if a.mirror.is_empty() {
        mirrors
    } else {
        a.mirror.clone()
    };
    let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from(dir));
    download::download(
        &files,
        &mirrors,
        &dir,
        std::time::Duration::from_secs(a.timeout),
        |l| eprintln!("{l}"),
    )?;
    println!("{}: the four files are present and verified", dir.display());
    Ok(ExitCode::SUCCESS)
}
