//! Load → predict, with the library: a checkpoint and some pictures, each normalised as MNIST
//! was, then the reference path's probabilities.
//!
//!     cargo run --release --example predict_pictures -- MODEL PICTURE...
use mnistconv::{checkpoint, preprocess, reference};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = checkpoint::load(std::path::Path::new(
        &args.next().ok_or("usage: MODEL PICTURE...")?,
    ))?;
    let p = model.params.map(f64::from);
    for pic in args {
        let gray = preprocess::read_gray(std::path::Path::new(&pic))?;
        let px = preprocess::mnist_normalize(&gray, &pic)?;
        let x: Vec<f64> = px.iter().map(|&v| f64::from(v) / 255.0).collect();
        let a = reference::forward(&model.cfg, &p, &x, 0);
        let best = (0..a.y.len())
            .max_by(|&i, &j| a.y[i].total_cmp(&a.y[j]))
            .unwrap_or(0);
        println!("{pic}: {best} ({:.1}%)", 100.0 * a.y[best]);
    }
    Ok(())
}
