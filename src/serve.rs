//! `serve`: one page to draw a digit on and watch the network's forward and backward pass, and a
//! small JSON API behind it; `train --serve` uses the same server to follow a training run live.
//!
//! Routing is a pure function, [`App::handle`] (method, path, body → [`Reply`]), so every route
//! and every error answer is testable without sockets; [`serve`] puts it behind `tiny_http` with
//! a fixed pool of worker threads. Everything the page needs is compiled into the binary.
//!
//! | route | answer |
//! |---|---|
//! | `GET /`, `GET /train` | the page (the second opens on the training view) |
//! | `GET /page.js` | its script |
//! | `GET /api/model` | the network's configuration, the titles of the panels, metadata |
//! | `POST /api/explain` | every map of the forward and backward pass for a drawing |
//! | `GET /api/train/status` | the training run followed, if any |
//!
//! Errors are JSON `{"error": "..."}`: 400 (malformed JSON, wrong pixel count, blank drawing,
//! label out of range), 404 (unknown route), 405 (wrong method), 413 (body over [`MAX_BODY`]),
//! 503 (no network to explain yet, while a training run has not reached its first snapshot).

use crate::checkpoint::Model;
use crate::config::{NetConfig, Pooling};
use crate::error::{Error, Result};
use crate::params::Params;
use crate::preprocess;
use crate::reference;
use crate::train::{EpochStats, Event, StepStats, TrainConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest request body accepted (bytes); larger ones get 413.
pub const MAX_BODY: usize = 2 << 20;
/// The largest side of a drawing accepted by `/api/explain`.
pub const MAX_SIDE: usize = 1024;
/// The most loss/accuracy points kept for the training curves (older ones are thinned out).
const MAX_POINTS: usize = 2000;

const PAGE: &str = include_str!("serve/page.html");
const SCRIPT: &str = include_str!("serve/page.js");

/// An HTTP answer: status, content type and body.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: &impl Serialize) -> Reply {
        match serde_json::to_vec(v) {
            Ok(body) => Reply {
                status,
                content_type: "application/json",
                body,
            },
            Err(e) => Reply::error(500, &format!("cannot serialise the answer: {e}")),
        }
    }

    fn error(status: u16, msg: &str) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: json!({ "error": msg }).to_string().into_bytes(),
        }
    }

    fn text(content_type: &'static str, s: &str) -> Reply {
        Reply {
            status: 200,
            content_type,
            body: s.as_bytes().to_vec(),
        }
    }

    /// The body as UTF-8 text (lossy), for tests and messages.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A network ready to be explained: its configuration and f64 weights.
#[derive(Clone, Debug)]
pub struct Loaded {
    cfg: NetConfig,
    p: Params<f64>,
    meta: HashMap<String, String>,
    class_names: Option<Vec<String>>,
    source: String,
}

impl Loaded {
    /// Prepares `model` (named `source` in `/api/model`) for the page.
    ///
    /// # Errors
    /// If the model does not take 28×28 images (drawings are normalised to 28×28).
    pub fn new(model: &Model, source: &str) -> Result<Loaded> {
        if model.cfg.img != 28 {
            return Err(Error::Data(format!(
                "{source}: drawings are normalised to 28×28; this model takes {0}×{0}",
                model.cfg.img
            )));
        }
        Ok(Loaded {
            cfg: model.cfg,
            p: model.params.map(f64::from),
            class_names: model
                .meta
                .get("class_names")
                .and_then(|s| serde_json::from_str(s).ok()),
            meta: model.meta.clone(),
            source: source.to_string(),
        })
    }
}

/// What `train --serve` shows: the run's history so far and its current kernels.
#[derive(Clone, Debug, Serialize)]
struct TrainStatus {
    /// Always true: a run is followed.
    active: bool,
    net: NetConfig,
    recipe: TrainConfig,
    train_images: usize,
    /// Seconds since the server started.
    seconds: f64,
    /// Bumped at every change, so the page can skip redrawing.
    version: u64,
    done: bool,
    error: Option<String>,
    history: Vec<EpochStats>,
    step: Option<StepStats>,
    /// `[epoch − 1 + step/steps, running loss, running accuracy]`, thinned to `MAX_POINTS`.
    points: Vec<[f32; 3]>,
    /// The kernels at the last snapshot, one row of `ksize²` per kernel.
    kernels: Vec<Vec<f32>>,
    /// Where in the run (in epochs) the kernels were taken.
    kernels_at: f64,
}

/// The server's state: the network explained, and the training run followed (if any).
pub struct App {
    model: RwLock<Option<Arc<Loaded>>>,
    train: Option<Mutex<TrainStatus>>,
    t0: Instant,
}

/// The explain request (see the README): a grey drawing, or a 28×28 image already normalised.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    width: usize,
    height: usize,
    pixels: Vec<f64>,
    #[serde(default)]
    label: Option<usize>,
    #[serde(default)]
    preprocessed: bool,
}

/// Rounds to 4 significant digits and to f32, so the JSON stays short.
fn r4(x: f64) -> f32 {
    if x == 0.0 || !x.is_finite() {
        return x as f32;
    }
    let m = 10f64.powi(3 - x.abs().log10().floor() as i32);
    ((x * m).round() / m) as f32
}

fn rows(v: &[f64], row: usize) -> Vec<Vec<f32>> {
    v.chunks(row.max(1))
        .map(|c| c.iter().map(|&x| r4(x)).collect())
        .collect()
}

fn flat(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| r4(x)).collect()
}

/// The titles of the page's panels, in the derivation's notation, for this configuration.
fn formulas(cfg: &NetConfig) -> Value {
    let act = cfg.conv_act.name();
    let phi = cfg.act.name();
    let b = |s: &str| {
        if cfg.bias {
            format!(" + {s}")
        } else {
            String::new()
        }
    };
    let (c, pd, k, p) = (cfg.conv(), cfg.pooled(), cfg.ksize, cfg.pool);
    let pool = match cfg.pooling {
        Pooling::Mean => format!("mean of each {p}×{p} window"),
        Pooling::Max => format!("max of each {p}×{p} window"),
    };
    let repool = match cfg.pooling {
        Pooling::Mean => format!("∂L/∂y⁽⁻²⁾[n][⌊r/{p}⌋][⌊c/{p}⌋] / {}", p * p),
        Pooling::Max => "∂L/∂y⁽⁻²⁾ routed to each window's arg-max".to_string(),
    };
    json!({
        "input": format!("x ({0}×{0}, pixels / 255): what the network sees", cfg.img),
        "conv": format!("y⁽⁻³⁾ₙ = {act}(x ⋆ kₙ{}) ({c}×{c})", b("bₙ")),
        "pooled": format!("y⁽⁻²⁾ₙ = {pool} of y⁽⁻³⁾ₙ ({pd}×{pd})"),
        "hidden": format!("y⁽⁻¹⁾ = φ(w⁽⁻¹⁾ y⁽⁻²⁾{}), φ = {phi} ({})", b("b⁽⁻¹⁾"), cfg.hidden),
        "probs": format!("y = softmax(v), v = w y⁽⁻¹⁾{}", b("b")),
        "y_minus_d": "∂L/∂v = y − d".to_string(),
        "dL_dy3": format!("∂L/∂y⁽⁻³⁾ₙ = re-pool(∂L/∂y⁽⁻²⁾ₙ) = {repool}, ∂L/∂y⁽⁻²⁾ = w⁽⁻¹⁾ᵀ ∂L/∂v⁽⁻¹⁾"),
        "kernels": format!("kₙ ({k}×{k})"),
        "grad_kernels": format!("∂J/∂kₙ = x ⋆ δₙ, δₙ = ∂L/∂y⁽⁻³⁾ₙ ⊙ {act}'(x ⋆ kₙ{})", b("bₙ")),
        "loss": "L = Σᵢ −dᵢ log yᵢ".to_string(),
    })
}

impl App {
    /// A server explaining `model`.
    pub fn with_model(model: Loaded) -> App {
        App {
            model: RwLock::new(Some(Arc::new(model))),
            train: None,
            t0: Instant::now(),
        }
    }

    /// A server following a training run of `cfg` with `tc` on `train_images` images; it
    /// explains drawings with the run's latest weights once [`App::on_train_event`] has seen a
    /// snapshot of them.
    pub fn for_training(cfg: &NetConfig, tc: &TrainConfig, train_images: usize) -> App {
        App {
            model: RwLock::new(None),
            train: Some(Mutex::new(TrainStatus {
                net: *cfg,
                recipe: tc.clone(),
                active: true,
                train_images,
                seconds: 0.0,
                version: 0,
                done: false,
                error: None,
                history: Vec::new(),
                step: None,
                points: Vec::new(),
                kernels: Vec::new(),
                kernels_at: 0.0,
            })),
            t0: Instant::now(),
        }
    }

    /// Replaces the network explained.
    pub fn set_model(&self, model: Loaded) {
        let mut m = self.model.write().unwrap_or_else(|e| e.into_inner());
        *m = Some(Arc::new(model));
    }

    fn current_model(&self) -> Option<Arc<Loaded>> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn with_status(&self, f: impl FnOnce(&mut TrainStatus)) {
        if let Some(t) = &self.train {
            let mut s = t.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s);
            s.version += 1;
        }
    }

    /// Feeds one event of the training run to the training view (call it from the callback of
    /// [`crate::train::train_from`]). A `Checkpoint` event also makes its weights the ones
    /// `/api/explain` uses.
    pub fn on_train_event(&self, ev: &Event) {
        match ev {
            Event::Step(s) => self.with_status(|st| {
                let x = s.epoch.saturating_sub(1) as f64 + s.step as f64 / s.steps.max(1) as f64;
                st.points.push([x as f32, r4(s.loss), r4(s.accuracy)]);
                if st.points.len() > MAX_POINTS {
                    // Keep every other point: the curve keeps its shape, the size stays bounded.
                    let kept: Vec<[f32; 3]> = st.points.iter().step_by(2).copied().collect();
                    st.points = kept;
                }
                st.step = Some(*s);
            }),
            Event::Epoch(e) => self.with_status(|st| st.history.push((*e).clone())),
            Event::Checkpoint(state) => {
                let Some(t) = &self.train else { return };
                let (cfg, at) = {
                    let mut st = t.lock().unwrap_or_else(|e| e.into_inner());
                    let kk = (st.net.ksize * st.net.ksize).max(1);
                    let frac = match st.step {
                        Some(s) if state.step > 0 => state.step as f64 / s.steps.max(1) as f64,
                        _ => 0.0,
                    };
                    let at = state.epoch.saturating_sub(1) as f64 + frac;
                    st.kernels = state
                        .params
                        .k
                        .chunks(kk)
                        .map(|c| c.iter().map(|&v| r4(f64::from(v))).collect())
                        .collect();
                    st.kernels_at = at;
                    st.version += 1;
                    (st.net, at)
                };
                if cfg.img == 28 {
                    self.set_model(Loaded {
                        cfg,
                        p: state.params.map(f64::from),
                        meta: HashMap::new(),
                        class_names: None,
                        source: format!("training run, weights at epoch {at:.2}"),
                    });
                }
            }
        }
    }

    /// Marks the training run as finished (with its error, if it failed).
    pub fn train_finished(&self, error: Option<String>) {
        self.with_status(|st| {
            st.done = true;
            st.error = error;
        });
    }

    /// Answers one request. Never panics on any input.
    pub fn handle(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let allow = |m: &str| {
            if method == m || (m == "GET" && method == "HEAD") {
                Ok(())
            } else {
                Err(Reply::error(
                    405,
                    &format!("{method} {path}: this route takes {m}"),
                ))
            }
        };
        let r = match path {
            "/" | "/index.html" | "/train" => {
                allow("GET").map(|_| Reply::text("text/html; charset=utf-8", PAGE))
            }
            "/page.js" => {
                allow("GET").map(|_| Reply::text("text/javascript; charset=utf-8", SCRIPT))
            }
            "/api/model" => allow("GET").map(|_| self.model_info()),
            "/api/train/status" => allow("GET").map(|_| self.train_status()),
            "/api/explain" => allow("POST").map(|_| {
                if body.len() > MAX_BODY {
                    return Reply::error(413, &format!("request body over {MAX_BODY} bytes"));
                }
                self.explain(body)
                    .unwrap_or_else(|(status, msg)| Reply::error(status, &msg))
            }),
            _ => Err(Reply::error(404, &format!("no route {path}"))),
        };
        r.unwrap_or_else(|e| e)
    }

    fn model_info(&self) -> Reply {
        let Some(m) = self.current_model() else {
            return Reply::json(
                200,
                &json!({"loaded": false, "training": self.train.is_some()}),
            );
        };
        Reply::json(
            200,
            &json!({
                "loaded": true,
                "training": self.train.is_some(),
                "source": m.source,
                "config": m.cfg,
                "conv": m.cfg.conv(),
                "pooled": m.cfg.pooled(),
                "class_names": m.class_names,
                "meta": m.meta,
                "formulas": formulas(&m.cfg),
                "max_body": MAX_BODY,
                "max_side": MAX_SIDE,
            }),
        )
    }

    fn train_status(&self) -> Reply {
        match &self.train {
            None => Reply::json(200, &json!({"active": false})),
            Some(t) => {
                let mut s = t.lock().unwrap_or_else(|e| e.into_inner()).clone();
                s.seconds = self.t0.elapsed().as_secs_f64();
                Reply::json(200, &s)
            }
        }
    }

    fn explain(&self, body: &[u8]) -> std::result::Result<Reply, (u16, String)> {
        let bad = |m: String| (400, m);
        let req: ExplainRequest = serde_json::from_slice(body)
            .map_err(|e| bad(format!("malformed request ({e}); expected {{\"width\": W, \"height\": H, \"pixels\": [W·H grey levels 0–255], \"label\": optional 0–9, \"preprocessed\": optional bool}}")))?;
        let Some(m) = self.current_model() else {
            return Err((
                503,
                "no network yet: the training run has not taken its first snapshot".into(),
            ));
        };
        let cfg = &m.cfg;
        let (w, h) = (req.width, req.height);
        if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(bad(format!(
                "width {w} × height {h}: each side must be 1 to {MAX_SIDE}"
            )));
        }
        if req.pixels.len() != w * h {
            return Err(bad(format!(
                "{} pixels for a {w}×{h} drawing; expected {}",
                req.pixels.len(),
                w * h
            )));
        }
        if let Some((i, v)) = req
            .pixels
            .iter()
            .enumerate()
            .find(|(_, v)| !(0.0..=255.0).contains(*v))
        {
            return Err(bad(format!(
                "pixels[{i}] = {v} is not a grey level in 0–255"
            )));
        }
        if let Some(l) = req.label
            && l >= cfg.classes
        {
            return Err(bad(format!(
                "label {l}: the model has {} classes (0–{})",
                cfg.classes,
                cfg.classes - 1
            )));
        }
        let grey: Vec<u8> = req.pixels.iter().map(|&v| v.round() as u8).collect();
        let px = if req.preprocessed {
            if w != cfg.img || h != cfg.img {
                return Err(bad(format!(
                    "a preprocessed image must be {0}×{0} (bright ink on dark), this one is {w}×{h}",
                    cfg.img
                )));
            }
            grey
        } else {
            let img = image::GrayImage::from_raw(w as u32, h as u32, grey)
                .ok_or_else(|| bad("pixel count does not match the size".into()))?;
            preprocess::mnist_normalize(&img, "drawing").map_err(|e| bad(e.to_string()))?
        };
        let x: Vec<f64> = px.iter().map(|&v| f64::from(v) / 255.0).collect();
        let mut a = reference::forward(cfg, &m.p, &x, req.label.unwrap_or(0));
        let predicted = (0..a.y.len())
            .max_by(|&i, &j| a.y[i].total_cmp(&a.y[j]))
            .unwrap_or(0);
        let label = req.label.unwrap_or(predicted);
        if req.label.is_none() {
            a.d = reference::one_hot(cfg.classes, label);
            a.loss = reference::softmax_xent_forward(&a.v, &a.d).1;
        }
        let b = reference::backward(cfg, &m.p, &a);
        let (c, pd, k) = (cfg.conv(), cfg.pooled(), cfg.ksize);
        let n = cfg.n_kernels;
        Ok(Reply::json(
            200,
            &ExplainResponse {
                predicted,
                label,
                class_names: m.class_names.as_deref(),
                loss: a.loss,
                input: flat(&a.x),
                conv: rows(&a.y_m3, c * c),
                pooled: rows(&a.y_m2, pd * pd),
                hidden: flat(&a.y_m1),
                logits: flat(&a.v),
                probs: flat(&a.y),
                y_minus_d: flat(&b.dv),
                dl_dy3: rows(&b.dy_m3, c * c),
                kernels: rows(&m.p.k, k * k),
                grad_kernels: rows(&b.grads.k, k * k),
                shapes: Shapes {
                    input: [cfg.img, cfg.img],
                    conv: [n, c, c],
                    pooled: [n, pd, pd],
                    hidden: [cfg.hidden],
                    probs: [cfg.classes],
                    dl_dy3: [n, c, c],
                    kernels: [n, k, k],
                },
            },
        ))
    }
}

/// The answer of `/api/explain` (numbers rounded to 4 significant digits, as f32).
#[derive(Serialize)]
struct ExplainResponse<'a> {
    predicted: usize,
    label: usize,
    class_names: Option<&'a [String]>,
    loss: f64,
    input: Vec<f32>,
    conv: Vec<Vec<f32>>,
    pooled: Vec<Vec<f32>>,
    hidden: Vec<f32>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    y_minus_d: Vec<f32>,
    #[serde(rename = "dL_dy3")]
    dl_dy3: Vec<Vec<f32>>,
    kernels: Vec<Vec<f32>>,
    grad_kernels: Vec<Vec<f32>>,
    shapes: Shapes,
}

#[derive(Serialize)]
struct Shapes {
    input: [usize; 2],
    conv: [usize; 3],
    pooled: [usize; 3],
    hidden: [usize; 1],
    probs: [usize; 1],
    #[serde(rename = "dL_dy3")]
    dl_dy3: [usize; 3],
    kernels: [usize; 3],
}

/// A running server; stops its workers when dropped (or with [`Server::stop`]).
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// The address it listens on (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops (it only stops when told to, so: forever).
    pub fn wait(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Stops the workers (after the requests in hand) and waits for them.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts serving `app` on `addr` (e.g. `127.0.0.1:8080`; port 0 picks a free one) with
/// `workers` threads answering requests. Returns at once; see [`Server::addr`].
///
/// # Errors
/// If the address does not resolve or cannot be bound.
pub fn serve(app: Arc<App>, addr: &str, workers: usize) -> Result<Server> {
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| Error::Data(format!("--addr {addr}: {e}")))?
        .next()
        .ok_or_else(|| Error::Data(format!("--addr {addr}: resolves to no address")))?;
    let server = tiny_http::Server::http(sock)
        .map_err(|e| Error::Data(format!("cannot listen on {sock}: {e}")))?;
    let bound = server.server_addr().to_ip().unwrap_or(sock);
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = (0..workers.max(1))
        .map(|i| {
            let (server, app, stop) = (server.clone(), app.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("serve-{i}"))
                .spawn(move || worker(&server, &app, &stop))
                .map_err(|e| Error::Data(format!("cannot start a server thread: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Server {
        addr: bound,
        stop,
        workers,
    })
}

fn worker(server: &tiny_http::Server, app: &App, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(req)) => answer(app, req),
            Ok(None) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Reads the body (at most `MAX_BODY`, then drains a bounded amount so the client can read the
/// 413), answers, and never lets a panic out.
fn answer(app: &App, mut req: tiny_http::Request) {
    let method = req.method().as_str().to_string();
    let url = req.url().to_string();
    let declared = req.body_length().unwrap_or(0);
    let mut body = Vec::new();
    let reply = if declared > 8 * MAX_BODY {
        Reply::error(413, &format!("request body over {MAX_BODY} bytes"))
    } else {
        let r = req
            .as_reader()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body);
        match r {
            Err(e) => Reply::error(400, &format!("cannot read the request body: {e}")),
            Ok(_) if body.len() > MAX_BODY => {
                let _ = std::io::copy(
                    &mut req.as_reader().take(8 * MAX_BODY as u64),
                    &mut std::io::sink(),
                );
                Reply::error(413, &format!("request body over {MAX_BODY} bytes"))
            }
            Ok(_) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                app.handle(&method, &url, &body)
            }))
            .unwrap_or_else(|_| Reply::error(500, "internal error")),
        }
    };
    let head = method == "HEAD";
    let mut resp = tiny_http::Response::from_data(if head { Vec::new() } else { reply.body })
        .with_status_code(reply.status);
    for (k, v) in [
        ("Content-Type", reply.content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ] {
        if let Ok(h) = tiny_http::Header::from_bytes(k, v) {
            resp.add_header(h);
        }
    }
    let _ = req.respond(resp);
}
