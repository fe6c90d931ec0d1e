//! Latency of `POST /api/explain` on loopback: sequential requests, then `concurrency` in flight
//! at once; prints p50/p99 of each. The body is what the page sends: a 280×280 drawing.
//!
//!     cargo run --release --example serve_load -- [--url http://127.0.0.1:8080] \
//!         [--model FILE] [--requests 200] [--concurrency 200] [--workers 8]
//!
//! Without `--url` it starts a server in this process on a free loopback port (with `--model`, or
//! He-initialised weights). Only loopback targets are accepted; the number of requests is bounded.
use mnistconv::checkpoint::{self, Model};
use mnistconv::serve::{self, App, Loaded};
use mnistconv::{Init, NetConfig, Params};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1).cloned())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut ms: Vec<f64>, wall: Duration) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{what:<28} n {:>4}  p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  wall {:>6.2} s  {:>6.1} req/s",
        ms.len(),
        pct(&ms, 0.5),
        pct(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0),
        wall.as_secs_f64(),
        ms.len() as f64 / wall.as_secs_f64()
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = arg("--requests").map_or(Ok(200), |s| s.parse())?.min(2000);
    let conc: usize = arg("--concurrency")
        .map_or(Ok(200), |s| s.parse())?
        .clamp(1, 500);
    let workers: usize = arg("--workers").map_or(Ok(8), |s| s.parse())?;
    let mut _server = None;
    let url = match arg("--url") {
        Some(u) => {
            let host = u
                .trim_start_matches("http://")
                .split(['/', ':'])
                .next()
                .unwrap_or("");
            if !(host == "localhost" || host.starts_with("127.") || host == "[") {
                return Err(format!("{u}: only loopback targets").into());
            }
            u.trim_end_matches('/').to_string()
        }
        None => {
            let model = match arg("--model") {
                Some(p) => checkpoint::load(p.as_ref())?,
                None => {
                    let cfg = NetConfig::default();
                    Model {
                        cfg,
                        params: Params::init(&cfg, Init::He, 1),
                        meta: Default::default(),
                    }
                }
            };
            let app = App::with_model(Loaded::new(&model, "load test")?);
            let s = serve::serve(Arc::new(app), "127.0.0.1:0", workers)?;
            let u = format!("http://{}", s.addr());
            _server = Some(s);
            println!("server in process at {u}, {workers} workers");
            u
        }
    };
    // A "7" on a white 280×280 canvas, dark ink.
    let side = 280usize;
    let mut px = vec![255u8; side * side];
    for x in 60..220 {
        for t in 0..18 {
            px[(50 + t) * side + x] = 0;
        }
    }
    for y in 50..240 {
        let x = 210 - (y - 50) * 90 / 190;
        for t in 0..18 {
            px[y * side + x + t - 9] = 0;
        }
    }
    let body = serde_json::json!({"width": side, "height": side, "pixels": px}).to_string();
    println!(
        "POST {url}/api/explain, body {} KB (280×280 drawing)",
        body.len() / 1024
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let once = |agent: &ureq::Agent| -> Result<f64, String> {
        let t = Instant::now();
        let mut r = agent
            .post(format!("{url}/api/explain"))
            .header("Content-Type", "application/json")
            .send(body.as_str())
            .map_err(|e| e.to_string())?;
        let text = r
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        if !text.starts_with("{\"predicted\"") {
            return Err(format!("unexpected body: {}", &text[..text.len().min(200)]));
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    // Warm up, then sequential.
    for _ in 0..5 {
        once(&agent)?;
    }
    let t0 = Instant::now();
    let seq = (0..n)
        .map(|_| once(&agent))
        .collect::<Result<Vec<_>, _>>()?;
    report("sequential", seq, t0.elapsed());
    // `conc` threads, each sending its share; all in flight at once when conc == n.
    let t0 = Instant::now();
    let per = n.div_ceil(conc);
    let lat: Vec<Result<f64, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..conc)
            .map(|i| {
                let (agent, once) = (agent.clone(), &once);
                s.spawn(move || {
                    (0..per)
                        .filter(|j| i * per + j < n)
                        .map(|_| once(&agent))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let errors = lat.iter().filter(|r| r.is_err()).count();
    let ok: Vec<f64> = lat.into_iter().filter_map(Result::ok).collect();
    report(&format!("{conc} concurrent"), ok, t0.elapsed());
    println!("errors: {errors}");
    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }
    Ok(())
}
