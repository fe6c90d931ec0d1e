//! The server: every route and error answer through the pure router (`App::handle`), then over
//! real sockets on loopback: 200 concurrent `POST /api/explain`, and 413/400/404/405 on the wire.
//! No timing is asserted.

use mnistconv::checkpoint::Model;
use mnistconv::serve::{self, App, Loaded, MAX_BODY};
use mnistconv::{Init, NetConfig, Params};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn app() -> App {
    let cfg = NetConfig::default();
    let model = Model {
        cfg,
        params: Params::init(&cfg, Init::He, 7),
        meta: Default::default(),
    };
    App::with_model(Loaded::new(&model, "he-seed-7").unwrap())
}

/// A white `side`×`side` canvas with a thick dark vertical stroke, as the page sends it.
fn drawing(side: usize) -> Value {
    let mut px = vec![255u8; side * side];
    for y in side / 6..side * 5 / 6 {
        for x in side * 9 / 20..side * 11 / 20 {
            px[y * side + x] = 0;
        }
    }
    json!({"width": side, "height": side, "pixels": px})
}

fn json_of(r: &serve::Reply) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body_text()))
}

fn post(app: &App, body: &str) -> serve::Reply {
    app.handle("POST", "/api/explain", body.as_bytes())
}

#[test]
fn explain_returns_every_map_with_its_shape() {
    let app = app();
    let r = post(&app, &drawing(280).to_string());
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.content_type, "application/json");
    let j = json_of(&r);
    let len = |k: &str| j[k].as_array().unwrap().len();
    let inner = |k: &str| j[k][0].as_array().unwrap().len();
    assert_eq!(len("input"), 784);
    assert_eq!((len("conv"), inner("conv")), (20, 400));
    assert_eq!((len("pooled"), inner("pooled")), (20, 100));
    assert_eq!(len("hidden"), 100);
    assert_eq!(len("probs"), 10);
    assert_eq!(len("y_minus_d"), 10);
    assert_eq!((len("dL_dy3"), inner("dL_dy3")), (20, 400));
    assert_eq!((len("kernels"), inner("kernels")), (20, 81));
    assert_eq!((len("grad_kernels"), inner("grad_kernels")), (20, 81));
    let probs: Vec<f64> = j["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-3);
    // Default target: the predicted class, so y − d is negative only there.
    let pred = j["predicted"].as_u64().unwrap() as usize;
    assert_eq!(j["label"], pred);
    let ymd = &j["y_minus_d"];
    for (c, p) in probs.iter().enumerate() {
        let want = p - if c == pred { 1.0 } else { 0.0 };
        assert!((ymd[c].as_f64().unwrap() - want).abs() < 1e-3, "{c}");
    }
    // The input the network sees is the same preprocessing as `predict`'s.
    let mut img = image::GrayImage::from_pixel(280, 280, image::Luma([255]));
    for y in 280 / 6..280 * 5 / 6 {
        for x in 280 * 9 / 20..280 * 11 / 20 {
            img.put_pixel(x as u32, y as u32, image::Luma([0]));
        }
    }
    let want = mnistconv::preprocess::mnist_normalize(&img, "t").unwrap();
    for (i, (a, b)) in j["input"].as_array().unwrap().iter().zip(&want).enumerate() {
        assert!(
            (a.as_f64().unwrap() - f64::from(*b) / 255.0).abs() < 1e-3,
            "pixel {i}"
        );
    }
}

#[test]
fn a_chosen_label_sets_d() {
    let app = app();
    let mut req = drawing(100);
    req["label"] = json!(3);
    let j = json_of(&post(&app, &req.to_string()));
    assert_eq!(j["label"], 3);
    assert!(j["y_minus_d"][3].as_f64().unwrap() < 0.0);
    // A 28×28 image already normalised skips the preprocessing.
    let px: Vec<u8> = (0..784)
        .map(|i| if i % 28 == 14 { 255 } else { 0 })
        .collect();
    let r = post(
        &app,
        &json!({"width": 28, "height": 28, "pixels": px, "preprocessed": true}).to_string(),
    );
    let j = json_of(&r);
    assert_eq!(r.status, 200);
    assert_eq!(j["input"][14].as_f64(), Some(1.0));
    assert_eq!(j["input"][13].as_f64(), Some(0.0));
}

#[test]
fn bad_requests_get_400_with_a_message() {
    let app = app();
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "malformed"),
        ("{\"width\": 2}".into(), "missing field"),
        (
            json!({"width": 10, "height": 10, "pixels": [0, 1, 2]}).to_string(),
            "3 pixels for a 10×10 drawing",
        ),
        (
            json!({"width": 2, "height": 1, "pixels": [0, 300]}).to_string(),
            "not a grey level",
        ),
        (
            json!({"width": 2, "height": 1, "pixels": [0, -1]}).to_string(),
            "not a grey level",
        ),
        (
            json!({"width": 0, "height": 0, "pixels": []}).to_string(),
            "each side",
        ),
        (
            json!({"width": 5000, "height": 1, "pixels": []}).to_string(),
            "each side",
        ),
        (
            json!({"width": 3, "height": 3, "pixels": vec![255; 9]}).to_string(),
            "blank",
        ),
        (
            json!({"width": 3, "height": 3, "pixels": vec![0; 9]}).to_string(),
            "blank",
        ),
        (
            {
                let mut r = drawing(50);
                r["label"] = json!(10);
                r.to_string()
            },
            "label 10",
        ),
        (
            {
                let mut r = drawing(50);
                r["label"] = json!(-1);
                r.to_string()
            },
            "malformed",
        ),
        (
            {
                let mut r = drawing(50);
                r["lable"] = json!(1);
                r.to_string()
            },
            "unknown field",
        ),
        (
            json!({"width": 50, "height": 50, "pixels": vec![0; 2500], "preprocessed": true})
                .to_string(),
            "28×28",
        ),
        (
            json!({"width": 1, "height": 1, "pixels": ["a"]}).to_string(),
            "malformed",
        ),
    ];
    for (body, want) in cases {
        let r = post(&app, &body);
        assert_eq!(
            r.status,
            400,
            "{}: {}",
            &body[..body.len().min(80)],
            r.body_text()
        );
        let msg = json_of(&r)["error"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
}

#[test]
fn routes_methods_and_sizes() {
    let app = app();
    let page = app.handle("GET", "/", b"");
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    assert!(page.body_text().contains("<canvas id=\"pad\""));
    assert!(page.body_text().contains("/page.js"));
    assert_eq!(app.handle("GET", "/train", b"").status, 200);
    let js = app.handle("GET", "/page.js?v=1", b"");
    assert_eq!(js.status, 200);
    assert!(js.content_type.starts_with("text/javascript"));
    let m = json_of(&app.handle("GET", "/api/model", b""));
    assert_eq!(m["loaded"], true);
    assert_eq!(m["config"]["n_kernels"], 20);
    assert!(
        m["formulas"]["grad_kernels"]
            .as_str()
            .unwrap()
            .contains("∂J/∂kₙ")
    );
    assert_eq!(
        json_of(&app.handle("GET", "/api/train/status", b""))["active"],
        false
    );
    for (method, path, status) in [
        ("GET", "/nope", 404),
        ("GET", "/api/explainx", 404),
        ("GET", "/../etc/passwd", 404),
        ("GET", "/api/explain", 405),
        ("PUT", "/api/explain", 405),
        ("POST", "/", 405),
        ("DELETE", "/api/model", 405),
    ] {
        let r = app.handle(method, path, b"");
        assert_eq!(r.status, status, "{method} {path}");
        assert!(json_of(&r)["error"].is_string());
    }
    let big = vec![b' '; MAX_BODY + 1];
    assert_eq!(app.handle("POST", "/api/explain", &big).status, 413);
}

#[test]
fn a_training_view_reports_the_run_and_explains_with_its_weights() {
    use mnistconv::train::{self, Event, TrainConfig};
    let cfg = NetConfig::default();
    let tc = TrainConfig {
        epochs: 1,
        ..TrainConfig::default_recipe()
    };
    let data = mnistconv::mnist::embedded::train().slice(0..300);
    let app = App::for_training(&cfg, &tc, data.len());
    // Before any snapshot: nothing to explain yet.
    assert_eq!(post(&app, &drawing(60).to_string()).status, 503);
    let mut params = Params::init(&cfg, tc.init, tc.seed);
    let mut state = train::TrainState::new(&cfg, params.clone());
    train::train_from(&cfg, &tc, &mut state, &data, None, None, 1, |ev: Event| {
        app.on_train_event(&ev);
        Ok(())
    })
    .unwrap();
    params.clone_from(&state.params);
    app.train_finished(None);
    let s = json_of(&app.handle("GET", "/api/train/status", b""));
    assert_eq!(s["active"], true);
    assert_eq!(s["done"], true);
    assert_eq!(s["history"].as_array().unwrap().len(), 1);
    assert_eq!(s["kernels"].as_array().unwrap().len(), 20);
    assert_eq!(s["kernels"][0].as_array().unwrap().len(), 81);
    assert!(!s["points"].as_array().unwrap().is_empty());
    assert_eq!(s["kernels_at"].as_f64(), Some(1.0));
    let r = post(&app, &drawing(60).to_string());
    assert_eq!(r.status, 200, "{}", r.body_text());
    // The kernels explained are the run's last ones.
    let k0 = json_of(&r)["kernels"][0][0].as_f64().unwrap();
    assert!((k0 - f64::from(params.k[0])).abs() <= 1e-3 * k0.abs().max(1e-3));
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

fn call(agent: &ureq::Agent, method: &str, url: &str, body: Option<Vec<u8>>) -> (u16, String) {
    let r = match (method, body) {
        ("POST", Some(b)) => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(&b[..]),
        ("PUT", Some(b)) => agent.put(url).send(&b[..]),
        _ => agent.get(url).call(),
    };
    let mut r = r.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status().as_u16();
    let text = r
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .unwrap();
    (status, text)
}

#[test]
fn two_hundred_concurrent_requests_over_loopback() {
    let server = serve::serve(Arc::new(app()), "127.0.0.1:0", 8).unwrap();
    let base = format!("http://{}", server.addr());
    assert!(server.addr().ip().is_loopback());
    let body = drawing(280).to_string().into_bytes();
    let agent = agent();
    let t0 = Instant::now();
    let results: Vec<(u16, String, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|_| {
                let (agent, body, url) =
                    (agent.clone(), body.clone(), format!("{base}/api/explain"));
                s.spawn(move || {
                    let t = Instant::now();
                    let (st, text) = call(&agent, "POST", &url, Some(body));
                    (st, text, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = t0.elapsed();
    let first: Value = serde_json::from_str(&results[0].1).unwrap();
    for (st, text, _) in &results {
        assert_eq!(*st, 200, "{text}");
        let j: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            j["predicted"], first["predicted"],
            "same drawing, same answer"
        );
        assert_eq!(j["conv"].as_array().unwrap().len(), 20);
    }
    let mut lat: Vec<f64> = results.iter().map(|r| r.2.as_secs_f64() * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    eprintln!(
        "200 concurrent POST /api/explain (280×280): all 200 OK in {:.2} s; latency p50 {:.1} ms, p99 {:.1} ms",
        wall.as_secs_f64(),
        lat[100],
        lat[197]
    );

    // The error answers, on the wire.
    let explain = format!("{base}/api/explain");
    let (st, text) = call(&agent, "POST", &explain, Some(vec![b' '; MAX_BODY + 10]));
    assert_eq!(st, 413, "{text}");
    assert!(text.contains("error"));
    let (st, text) = call(&agent, "POST", &explain, Some(b"{oops".to_vec()));
    assert_eq!(st, 400);
    assert!(text.contains("malformed"), "{text}");
    let (st, _) = call(
        &agent,
        "POST",
        &explain,
        Some(
            json!({"width": 3, "height": 3, "pixels": [1, 2]})
                .to_string()
                .into_bytes(),
        ),
    );
    assert_eq!(st, 400);
    assert_eq!(call(&agent, "GET", &format!("{base}/nope"), None).0, 404);
    assert_eq!(call(&agent, "GET", &explain, None).0, 405);
    assert_eq!(call(&agent, "PUT", &explain, Some(vec![])).0, 405);
    let (st, page) = call(&agent, "GET", &format!("{base}/"), None);
    assert_eq!(st, 200);
    assert!(page.contains("mnistconv"));
    // Still serving after all that.
    assert_eq!(call(&agent, "POST", &explain, Some(body)).0, 200);
    server.stop();
}

#[test]
fn the_cli_binds_loopback_and_announces_its_address() {
    let dir = std::env::temp_dir().join(format!("mnistconv-serve-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let m = dir.join("m.safetensors");
    let cfg = NetConfig::default();
    mnistconv::checkpoint::save(
        &m,
        &Model {
            cfg,
            params: Params::init(&cfg, Init::He, 1),
            meta: Default::default(),
        },
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mnistconv"))
        .args([
            "serve",
            "--model",
            m.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let got = call(&agent(), "GET", &format!("{url}/api/model"), None);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    assert_eq!(got.0, 200, "{}", got.1);
    // A missing model is a usage error (exit 2), not a panic.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mnistconv"))
        .args(["serve", "--model", "/nonexistent.safetensors"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
