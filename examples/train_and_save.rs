//! Data → train → save, with the library: the document's network on a data directory (default:
//! the embedded sample), the default recipe for a few epochs, then a checkpoint.
//!
//!     cargo run --release --example train_and_save -- [DATA_DIR or -] [EPOCHS]
use mnistconv::mnist::{self, Split};
use mnistconv::train::{self, Event};
use mnistconv::{Model, NetConfig, Params, TrainConfig, checkpoint};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data = match args.next().filter(|d| !d.is_empty() && d != "-") {
        Some(dir) => mnist::load_split(std::path::Path::new(&dir), Split::Train)?,
        None => mnist::embedded::train(),
    };
    let epochs = args.next().map(|e| e.parse()).transpose()?.unwrap_or(3);
    let cfg = NetConfig::default();
    let tc = TrainConfig {
        epochs,
        ..TrainConfig::default_recipe()
    };
    let mut params = Params::init(&cfg, tc.init, tc.seed);
    train::train(&cfg, &tc, &mut params, &data, None, None, |ev| {
        if let Event::Epoch(s) = ev {
            println!(
                "epoch {}: loss {:.4}, train accuracy {:.2}%",
                s.epoch,
                s.train_loss,
                100.0 * s.train_accuracy
            );
        }
        Ok(())
    })?;
    let path = std::path::Path::new("example.safetensors");
    checkpoint::save(
        path,
        &Model {
            cfg,
            params,
            meta: Default::default(),
        },
    )?;
    println!("saved {}", path.display());
    Ok(())
}
