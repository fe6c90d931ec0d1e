//! Pictures of what the network computes and learned, as PNG files.
//!
//! Drawing is a few raster primitives on an [`image::RgbImage`] (rectangles, lines, heat maps and
//! text in the public-domain 8×8 bitmap font of the `font8x8` crate); encoding is the `image`
//! crate's PNG encoder; every file is written atomically ([`crate::fsutil::atomic_write`]).
//!
//! Colour scales: quantities that take both signs (kernels, gradients, backprop maps) use a
//! diverging scale centred on 0 (blue < 0 < red, white at 0, symmetric limits printed on the
//! picture); non-negative ones (activations, probabilities) a sequential scale from white.

use crate::checkpoint::Model;
use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::explain::Trace;
use crate::mnist::Dataset;
use crate::params::Params;
use crate::train::{EpochStats, Evaluation};
use image::RgbImage;
use std::path::Path;

/// An RGB colour.
pub type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [150, 150, 150];
const LIGHT: Rgb = [225, 225, 225];
const NEG: Rgb = [33, 102, 172];
const POS: Rgb = [178, 24, 43];
/// Line colours of the training curves: train, validation, test.
const SERIES: [Rgb; 3] = [[31, 119, 180], [255, 127, 14], [44, 160, 44]];

fn lerp(a: Rgb, b: Rgb, t: f64) -> Rgb {
    let t = t.clamp(0.0, 1.0);
    [0, 1, 2].map(|i| (f64::from(a[i]) + (f64::from(b[i]) - f64::from(a[i])) * t).round() as u8)
}

/// Diverging scale: `v / limit` in [−1, 1] → blue … white … red.
pub fn diverging(v: f64, limit: f64) -> Rgb {
    let t = if limit > 0.0 { v / limit } else { 0.0 };
    if t.is_nan() {
        GREY
    } else if t >= 0.0 {
        lerp(WHITE, POS, t)
    } else {
        lerp(WHITE, NEG, -t)
    }
}

/// Sequential scale: `v / limit` in [0, 1] → white … dark blue.
pub fn sequential(v: f64, limit: f64) -> Rgb {
    let t = if limit > 0.0 { v / limit } else { 0.0 };
    if t.is_nan() {
        GREY
    } else if t < 0.5 {
        lerp(WHITE, [107, 174, 214], 2.0 * t)
    } else {
        lerp([107, 174, 214], [8, 48, 107], 2.0 * t - 1.0)
    }
}

/// Ink on paper: pixel value in [0, 1] (MNIST: bright ink) → black on white.
pub fn ink(v: f64) -> Rgb {
    let g = (255.0 * (1.0 - v.clamp(0.0, 1.0))).round() as u8;
    [g, g, g]
}

/// Largest absolute value (0 for an empty or all-zero slice; NaNs ignored).
fn max_abs(v: &[f64]) -> f64 {
    v.iter()
        .fold(0.0, |m, x| if x.abs() > m { x.abs() } else { m })
}

/// A picture being drawn: an RGB image with clipped drawing primitives.
pub struct Canvas {
    /// The pixels.
    pub img: RgbImage,
}

/// Width in pixels of `s` in the 8×8 font at `scale`.
pub fn text_width(s: &str, scale: u32) -> i64 {
    (s.chars().count() * 8) as i64 * i64::from(scale)
}

/// The 8×8 glyph of `c`: ASCII and Greek, `?` otherwise. Row `r`, bit `x` set = ink at (x, r).
fn glyph(c: char) -> [u8; 8] {
    use font8x8::legacy::{BASIC_LEGACY, GREEK_LEGACY};
    let u = c as usize;
    match c {
        _ if u < 128 => BASIC_LEGACY[u],
        '\u{390}'..='\u{3C9}' => GREEK_LEGACY[u - 0x390],
        '−' => BASIC_LEGACY['-' as usize],
        _ => BASIC_LEGACY['?' as usize],
    }
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: u32, height: u32) -> Self {
        Canvas {
            img: RgbImage::from_pixel(width, height, image::Rgb(WHITE)),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && x < i64::from(self.img.width()) && y < i64::from(self.img.height()) {
            self.img.put_pixel(x as u32, y as u32, image::Rgb(c));
        }
    }

    /// A filled rectangle.
    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.put(xx, yy, c);
            }
        }
    }

    /// A one-pixel outline.
    pub fn frame(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        self.rect(x, y, w, 1, c);
        self.rect(x, y + h - 1, w, 1, c);
        self.rect(x, y, 1, h, c);
        self.rect(x + w - 1, y, 1, h, c);
    }

    /// A line `width` pixels thick from (x0, y0) to (x1, y1).
    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, width: i64, c: Rgb) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            let (x, y) = (x.round() as i64 - width / 2, y.round() as i64 - width / 2);
            self.rect(x, y, width, width, c);
        }
    }

    /// Text with its top-left corner at (x, y), each font pixel drawn `scale`×`scale`.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: u32, c: Rgb) {
        let sc = i64::from(scale);
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (r, row) in g.iter().enumerate() {
                for b in 0..8 {
                    if row & (1 << b) != 0 {
                        let px = x + (i as i64 * 8 + b) * sc;
                        self.rect(px, y + r as i64 * sc, sc, sc, c);
                    }
                }
            }
        }
    }

    /// Text wrapped at spaces (or cut, for a long word) to lines of at most `width` pixels,
    /// 10 pixels apart, at most `max_lines` of them.
    pub fn text_wrapped(&mut self, x: i64, y: i64, s: &str, width: i64, max_lines: usize, c: Rgb) {
        let per_line = (width / 8).max(1) as usize;
        let mut lines: Vec<String> = vec![String::new()];
        for word in s.split(' ') {
            let cur = lines.last_mut().expect("one line");
            if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > per_line {
                lines.push(String::new());
            }
            let cur = lines.last_mut().expect("one line");
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
        for (i, l) in lines.iter().take(max_lines).enumerate() {
            let l: String = l.chars().take(per_line).collect();
            self.text(x, y + 10 * i as i64, &l, 1, c);
        }
    }

    /// Text centred horizontally on `cx`.
    pub fn text_centred(&mut self, cx: i64, y: i64, s: &str, scale: u32, c: Rgb) {
        self.text(cx - text_width(s, scale) / 2, y, s, scale, c);
    }

    /// A `rows`×`cols` map (row-major `data`), each value a `cell`×`cell` square, framed.
    pub fn map(
        &mut self,
        x: i64,
        y: i64,
        data: &[f64],
        (rows, cols): (usize, usize),
        cell: i64,
        colour: impl Fn(f64) -> Rgb,
    ) {
        for r in 0..rows {
            for c in 0..cols {
                let v = data.get(r * cols + c).copied().unwrap_or(f64::NAN);
                self.rect(
                    x + c as i64 * cell,
                    y + r as i64 * cell,
                    cell,
                    cell,
                    colour(v),
                );
            }
        }
        self.frame(
            x - 1,
            y - 1,
            cols as i64 * cell + 2,
            rows as i64 * cell + 2,
            GREY,
        );
    }

    /// A horizontal colour bar from −limit to +limit (or 0 to limit), labelled at its ends.
    pub fn colour_bar(&mut self, x: i64, y: i64, w: i64, limit: f64, signed: bool) {
        for i in 0..w {
            let t = i as f64 / (w - 1).max(1) as f64;
            let c = if signed {
                diverging((2.0 * t - 1.0) * limit, limit)
            } else {
                sequential(t * limit, limit)
            };
            self.rect(x + i, y, 1, 10, c);
        }
        self.frame(x - 1, y - 1, w + 2, 12, GREY);
        let lo = if signed {
            format!("{:+.2e}", -limit)
        } else {
            "0".into()
        };
        self.text(x, y + 14, &lo, 1, BLACK);
        let hi = format!("{:+.2e}", limit);
        self.text(x + w - text_width(&hi, 1), y + 14, &hi, 1, BLACK);
        if signed {
            self.text_centred(x + w / 2, y + 14, "0", 1, BLACK);
        }
    }

    /// Labelled probability bars for classes `0..values.len()`, `h` pixels per class. Signed
    /// values grow left (blue) or right (red) from a centre line.
    pub fn bars(&mut self, x: i64, y: i64, values: &[f64], w: i64, h: i64, signed: bool) {
        let limit = if signed { max_abs(values) } else { 1.0 };
        for (c, &v) in values.iter().enumerate() {
            let yy = y + c as i64 * h;
            self.text(x, yy + (h - 8) / 2, &c.to_string(), 1, BLACK);
            let bx = x + 14;
            self.rect(bx, yy + 1, w, h - 2, [245, 245, 245]);
            if signed {
                let mid = bx + w / 2;
                let len = if limit > 0.0 {
                    (v / limit * (w / 2) as f64).round() as i64
                } else {
                    0
                };
                let (from, l) = if len >= 0 {
                    (mid, len)
                } else {
                    (mid + len, -len)
                };
                self.rect(from, yy + 2, l, h - 4, if len >= 0 { POS } else { NEG });
                self.rect(mid, yy, 1, h, GREY);
            } else {
                let len = (v.clamp(0.0, 1.0) * w as f64).round() as i64;
                self.rect(bx, yy + 2, len, h - 4, SERIES[0]);
            }
            let s = if signed {
                format!("{v:+.2e}")
            } else {
                format!("{v:.3}")
            };
            self.text(bx + w + 6, yy + (h - 8) / 2, &s, 1, BLACK);
        }
    }

    /// The PNG bytes.
    pub fn png(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.img
            .write_with_encoder(image::codecs::png::PngEncoder::new(&mut out))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(out)
    }

    /// Encodes as PNG and writes `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.png().map_err(|e| Error::io(path, e))?;
        crate::fsutil::atomic_write(path, &bytes)
    }
}

/// Columns of a grid of `n` panels (at most `max`).
fn grid_cols(n: usize, max: usize) -> usize {
    n.clamp(1, max)
}

/// Draws `n` maps of `side`×`side` from `data` (concatenated) in a grid with titles `title(i)`;
/// returns the height used.
#[allow(clippy::too_many_arguments)]
fn map_grid(
    cv: &mut Canvas,
    x: i64,
    y: i64,
    data: &[f64],
    n: usize,
    (rows, cols): (usize, usize),
    cell: i64,
    per_row: usize,
    colour: &dyn Fn(f64) -> Rgb,
    title: &dyn Fn(usize) -> String,
) -> i64 {
    let (pw, ph) = (cols as i64 * cell, rows as i64 * cell);
    let per_row = grid_cols(n, per_row);
    let (gx, gy) = (pw + 12, ph + 22);
    for i in 0..n {
        let (r, c) = ((i / per_row) as i64, (i % per_row) as i64);
        let (px, py) = (x + c * gx, y + r * gy);
        cv.text(px, py, &title(i), 1, BLACK);
        let m = &data[i * rows * cols..(i + 1) * rows * cols];
        cv.map(px, py + 11, m, (rows, cols), cell, colour);
    }
    n.div_ceil(per_row) as i64 * gy
}

fn grid_width(n: usize, cols: usize, cell: i64, per_row: usize) -> i64 {
    grid_cols(n, per_row) as i64 * (cols as i64 * cell + 12)
}

/// `kernels.png`: the learned kernels `k`, enlarged, on one diverging scale centred on 0.
pub fn kernels(cfg: &NetConfig, p: &Params<f32>) -> Canvas {
    let k: Vec<f64> = p.k.iter().map(|&v| f64::from(v)).collect();
    let (n, ks) = (cfg.n_kernels, cfg.ksize);
    let cell = (108 / ks as i64).max(4);
    let per_row = if n <= 20 { 5.max(n.div_ceil(4)) } else { 10 };
    let w = grid_width(n, ks, cell, per_row).max(420) + 40;
    let rows = n.div_ceil(grid_cols(n, per_row)) as i64;
    let h = 80 + rows * (ks as i64 * cell + 22) + 50;
    let mut cv = Canvas::new(w as u32, h as u32);
    cv.text(
        20,
        16,
        &format!("kernels k: {n} x {ks}x{ks} (conv.weight)"),
        2,
        BLACK,
    );
    cv.text(
        20,
        40,
        "blue < 0 < red, one scale for all kernels",
        1,
        BLACK,
    );
    let lim = max_abs(&k);
    let used = map_grid(
        &mut cv,
        20,
        64,
        &k,
        n,
        (ks, ks),
        cell,
        per_row,
        &|v| diverging(v, lim),
        &|i| format!("k{}", i + 1),
    );
    cv.colour_bar(20, 64 + used + 6, 300, lim, true);
    cv
}

/// Class `c` as text: its index and, when known, its name.
fn class_label(c: usize, names: Option<&[String]>) -> String {
    match names.and_then(|n| n.get(c)) {
        Some(s) => format!("{c} {s}"),
        None => c.to_string(),
    }
}

/// `feature_maps.png`: for the traced image, the input, the conv maps `y⁽⁻³⁾`, the pooled maps
/// `y⁽⁻²⁾`, the hidden activations `y⁽⁻¹⁾` and the output probabilities `y`.
pub fn feature_maps(t: &Trace, caption: &str) -> Canvas {
    let cfg = &t.cfg;
    let (n, c, pd, img) = (cfg.n_kernels, cfg.conv(), cfg.pooled(), cfg.img);
    let per_row = 10;
    let conv_cell = (80 / c as i64).max(2);
    let pool_cell = (80 / pd as i64).max(2);
    let w = grid_width(n, c, conv_cell, per_row)
        .max(grid_width(n, pd, pool_cell, per_row))
        .max(760)
        + 40;
    let conv_rows = n.div_ceil(grid_cols(n, per_row)) as i64;
    let h = 60
        + 230
        + 30
        + conv_rows * (c as i64 * conv_cell + 22)
        + 30
        + conv_rows * (pd as i64 * pool_cell + 22)
        + 50;
    let mut cv = Canvas::new(w as u32, h as u32);
    cv.text(20, 14, "forward pass", 2, BLACK);
    cv.text_wrapped(20, 36, caption, w - 40, 2, BLACK);

    // Input, hidden activations, output.
    let top = 64;
    let icell = (168 / img as i64).max(1);
    cv.text(20, top, &format!("input x ({img}x{img})"), 1, BLACK);
    cv.map(20, top + 12, &t.acts.x, (img, img), icell, ink);
    let hx = 20 + img as i64 * icell + 40;
    let hidden = cfg.hidden;
    let hc = (hidden as f64).sqrt().ceil() as usize;
    let hr = hidden.div_ceil(hc);
    let hcell = (168 / hc.max(hr) as i64).max(2);
    cv.text(hx, top, &format!("y(-1) = φ(v(-1)) ({hidden})"), 1, BLACK);
    let hl = max_abs(&t.acts.y_m1);
    let hsigned = t.acts.y_m1.iter().any(|&v| v < 0.0);
    cv.map(hx, top + 12, &t.acts.y_m1, (hr, hc), hcell, |v| {
        if hsigned {
            diverging(v, hl)
        } else {
            sequential(v, hl)
        }
    });
    cv.colour_bar(
        hx,
        top + 12 + hr as i64 * hcell + 8,
        hc as i64 * hcell,
        hl,
        hsigned,
    );
    let ox = hx + hc as i64 * hcell + 60;
    let pred = argmax(&t.acts.y);
    cv.text(
        ox,
        top,
        &format!("y = softmax(v): predicted {pred}"),
        1,
        BLACK,
    );
    let bh = (200 / t.acts.y.len() as i64).clamp(8, 20);
    cv.bars(ox, top + 12, &t.acts.y, 200, bh, false);

    // Conv maps.
    let mut y = top + 260;
    let conv_signed = t.acts.y_m3.iter().any(|&v| v < 0.0);
    let cl = max_abs(&t.acts.y_m3);
    let colour = move |v: f64| {
        if conv_signed {
            diverging(v, cl)
        } else {
            sequential(v, cl)
        }
    };
    cv.text(
        20,
        y,
        &format!(
            "conv maps y(-3) = {}(x * k): {n} x {c}x{c}, one scale (max {cl:.3})",
            cfg.conv_act.name()
        ),
        1,
        BLACK,
    );
    y += 16;
    y += map_grid(
        &mut cv,
        20,
        y,
        &t.acts.y_m3,
        n,
        (c, c),
        conv_cell,
        per_row,
        &colour,
        &|i| format!("{}", i + 1),
    );
    let pl = max_abs(&t.acts.y_m2);
    let psigned = t.acts.y_m2.iter().any(|&v| v < 0.0);
    cv.text(
        20,
        y + 8,
        &format!(
            "pooled maps y(-2) = {}pool(y(-3)): {n} x {pd}x{pd}, one scale (max {pl:.3})",
            cfg.pooling.name()
        ),
        1,
        BLACK,
    );
    y += 24;
    map_grid(
        &mut cv,
        20,
        y,
        &t.acts.y_m2,
        n,
        (pd, pd),
        pool_cell,
        per_row,
        &|v| {
            if psigned {
                diverging(v, pl)
            } else {
                sequential(v, pl)
            }
        },
        &|i| format!("{}", i + 1),
    );
    cv
}

/// Index of the largest value.
fn argmax(v: &[f64]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0)
}

/// `backprop_maps.png`: for the traced image, `y − d`, the re-pooled backprop maps
/// `∂L/∂y⁽⁻³⁾`, the same times the conv activation's derivative, and each kernel beside its
/// gradient `∂L/∂k = x ⋆ ∂L/∂conv_pre`.
pub fn backprop_maps(t: &Trace, p: &Params<f64>, caption: &str) -> Canvas {
    let cfg = &t.cfg;
    let (n, c, ks) = (cfg.n_kernels, cfg.conv(), cfg.ksize);
    let per_row = 10;
    let cell = (80 / c as i64).max(2);
    let kcell = (72 / ks as i64).max(3);
    let pair_w = 2 * ks as i64 * kcell + 8;
    let pairs_per_row = 5usize;
    let w = grid_width(n, c, cell, per_row)
        .max(pairs_per_row as i64 * (pair_w + 16))
        .max(760)
        + 40;
    let rows = n.div_ceil(grid_cols(n, per_row)) as i64;
    let pair_rows = n.div_ceil(pairs_per_row) as i64;
    let h = 60
        + 20
        + 10 * 16
        + 40
        + 2 * (30 + rows * (c as i64 * cell + 22) + 30)
        + 30
        + pair_rows * (ks as i64 * kcell + 22)
        + 60;
    let mut cv = Canvas::new(w as u32, h as u32);
    cv.text(20, 14, "backward pass", 2, BLACK);
    cv.text_wrapped(20, 36, caption, w - 40, 2, BLACK);
    let label = argmax(&t.acts.d);
    let mut y = 64;
    cv.text(
        20,
        y,
        &format!(
            "dL/dv = y - d  (target d = e_{label}, loss L = {:.4})",
            t.acts.loss
        ),
        1,
        BLACK,
    );
    let bh = (160 / t.back.dv.len() as i64).clamp(8, 16);
    cv.bars(20, y + 14, &t.back.dv, 240, bh, true);
    y += 14 + t.back.dv.len() as i64 * bh + 30;

    let section = |cv: &mut Canvas, y: &mut i64, data: &[f64], title: String| {
        let lim = max_abs(data);
        cv.text(20, *y, &title, 1, BLACK);
        *y += 16;
        *y += map_grid(
            cv,
            20,
            *y,
            data,
            n,
            (c, c),
            cell,
            per_row,
            &|v| diverging(v, lim),
            &|i| format!("{}", i + 1),
        );
        cv.colour_bar(20, *y, 300, lim, true);
        *y += 34;
    };
    section(
        &mut cv,
        &mut y,
        &t.back.dy_m3,
        format!("re-pooled backprop maps dL/dy(-3) = repool(dL/dy(-2)): {n} x {c}x{c}"),
    );
    section(
        &mut cv,
        &mut y,
        &t.back.dconv_pre,
        format!(
            "dL/dconv_pre = dL/dy(-3) . {}'(conv_pre): {n} x {c}x{c}",
            cfg.conv_act.name()
        ),
    );

    let k = &p.k;
    let gk = &t.back.grads.k;
    let (kl, gl) = (max_abs(k), max_abs(gk));
    cv.text(
        20,
        y,
        &format!(
            "each kernel k (left, scale {kl:.2}) beside its gradient dL/dk = x (correlate) dL/dconv_pre (right, scale {gl:.2e})"
        ),
        1,
        BLACK,
    );
    y += 16;
    let kk = ks * ks;
    for i in 0..n {
        let (r, col) = ((i / pairs_per_row) as i64, (i % pairs_per_row) as i64);
        let (px, py) = (20 + col * (pair_w + 16), y + r * (ks as i64 * kcell + 22));
        cv.text(px, py, &format!("k{0}  dL/dk{0}", i + 1), 1, BLACK);
        cv.map(
            px,
            py + 11,
            &k[i * kk..(i + 1) * kk],
            (ks, ks),
            kcell,
            |v| diverging(v, kl),
        );
        cv.map(
            px + ks as i64 * kcell + 8,
            py + 11,
            &gk[i * kk..(i + 1) * kk],
            (ks, ks),
            kcell,
            |v| diverging(v, gl),
        );
    }
    cv
}

/// Tick values: about `n` round numbers covering [lo, hi].
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    // Multiples of the step, rounded to its decimals (so 3 × 0.2 is 0.6).
    let decimals = (-step.log10().floor()).max(0.0) as usize + 1;
    let first = (lo / step - 1e-9).ceil() as i64;
    let mut out = Vec::new();
    for i in first.. {
        let v = i as f64 * step;
        if v > hi + step * 1e-9 {
            break;
        }
        let v: f64 = format!("{v:.decimals$}").parse().unwrap_or(v);
        out.push(if v == 0.0 { 0.0 } else { v });
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v == v.round() && v.abs() < 1e6 {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

/// A named line of (x, y) points in a colour.
type Series<'a> = (&'a str, Rgb, Vec<(f64, f64)>);

/// One line chart with axes, ticks, labels and a legend. `series`: (name, colour, points).
#[allow(clippy::too_many_arguments)]
fn chart(
    cv: &mut Canvas,
    (x, y, w, h): (i64, i64, i64, i64),
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xmax: f64,
    (ylo, yhi): (f64, f64),
    series: &[Series],
    legend_at_bottom: bool,
) {
    let (l, r, t, b) = (x + 60, x + w - 10, y + 30, y + h - 40);
    cv.text_centred((l + r) / 2, y + 8, title, 1, BLACK);
    let sx = |v: f64| l as f64 + (v - 1.0) / (xmax - 1.0).max(1.0) * (r - l) as f64;
    let sy = |v: f64| b as f64 - (v - ylo) / (yhi - ylo).max(1e-12) * (b - t) as f64;
    for v in ticks(ylo, yhi, 6) {
        let yy = sy(v).round() as i64;
        cv.rect(l, yy, r - l, 1, LIGHT);
        cv.rect(l - 5, yy, 5, 1, BLACK);
        let s = fmt_tick(v);
        cv.text(l - 8 - text_width(&s, 1), yy - 4, &s, 1, BLACK);
    }
    for v in ticks(1.0, xmax.max(1.0), 8) {
        if v < 1.0 || v != v.round() {
            continue;
        }
        let xx = sx(v).round() as i64;
        cv.rect(xx, b, 1, 5, BLACK);
        cv.text_centred(xx, b + 8, &fmt_tick(v), 1, BLACK);
    }
    cv.rect(l, t, 1, b - t + 1, BLACK);
    cv.rect(l, b, r - l + 1, 1, BLACK);
    cv.text_centred((l + r) / 2, b + 24, xlabel, 1, BLACK);
    // The y label, one letter per line.
    for (i, ch) in ylabel.chars().enumerate() {
        cv.text(x + 4, t + i as i64 * 10, &ch.to_string(), 1, BLACK);
    }
    for (_, colour, pts) in series {
        for p in pts.windows(2) {
            cv.line(sx(p[0].0), sy(p[0].1), sx(p[1].0), sy(p[1].1), 2, *colour);
        }
        for &(px, py) in pts {
            let (xx, yy) = (sx(px).round() as i64, sy(py).round() as i64);
            cv.rect(xx - 2, yy - 2, 5, 5, *colour);
        }
    }
    // Legend, in a right-hand corner inside the plot.
    let lw = series
        .iter()
        .map(|(n, _, _)| text_width(n, 1))
        .max()
        .unwrap_or(0)
        + 36;
    let lh = series.len() as i64 * 14 + 8;
    let (lx, ly) = (
        r - lw - 8,
        if legend_at_bottom { b - lh - 8 } else { t + 8 },
    );
    cv.rect(lx, ly, lw, series.len() as i64 * 14 + 8, WHITE);
    cv.frame(lx, ly, lw, series.len() as i64 * 14 + 8, GREY);
    for (i, (name, colour, _)) in series.iter().enumerate() {
        let yy = ly + 6 + i as i64 * 14;
        cv.rect(lx + 6, yy + 3, 18, 3, *colour);
        cv.text(lx + 30, yy, name, 1, BLACK);
    }
}

/// `training.png`: training loss, and train/validation/test accuracy, per epoch.
pub fn training(history: &[EpochStats], caption: &str) -> Canvas {
    let mut cv = Canvas::new(1000, 460);
    cv.text(20, 12, "training", 2, BLACK);
    cv.text(20, 34, caption, 1, BLACK);
    let xmax = history.len().max(2) as f64;
    let loss: Vec<(f64, f64)> = history
        .iter()
        .map(|s| (s.epoch as f64, s.train_loss))
        .collect();
    let lmax = loss.iter().map(|p| p.1).fold(0.0, f64::max);
    chart(
        &mut cv,
        (0, 50, 480, 400),
        "mean training loss L per epoch",
        "epoch",
        "loss",
        xmax,
        (0.0, if lmax > 0.0 { lmax * 1.05 } else { 1.0 }),
        &[("train loss", SERIES[0], loss)],
        false,
    );
    let pick = |f: &dyn Fn(&EpochStats) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|s| f(s).map(|a| (s.epoch as f64, 100.0 * a)))
            .collect()
    };
    let mut series = vec![("train", SERIES[0], pick(&|s| Some(s.train_accuracy)))];
    let val = pick(&|s| s.val_accuracy);
    if !val.is_empty() {
        series.push(("validation", SERIES[1], val));
    }
    let test = pick(&|s| s.test_accuracy);
    if !test.is_empty() {
        series.push(("test", SERIES[2], test));
    }
    let amin = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(100.0, f64::min);
    let lo = (amin - 1.0).floor().clamp(0.0, 99.0);
    chart(
        &mut cv,
        (500, 50, 490, 400),
        "accuracy per epoch (%)",
        "epoch",
        "accuracy",
        xmax,
        (lo, 100.0),
        &series,
        true,
    );
    cv
}

/// `confusion.png`: the confusion matrix as a labelled heat map (rows: true class; columns:
/// predicted), each cell's count printed, coloured by its share of the row.
pub fn confusion(ev: &Evaluation, names: Option<&[String]>, caption: &str) -> Canvas {
    let k = ev.confusion.len();
    let cell = 52i64;
    let left = 20
        + names
            .map(|n| n.iter().map(|s| text_width(s, 1)).max().unwrap_or(0) + 30)
            .unwrap_or(30)
            .max(60);
    let top = 90;
    let title = format!(
        "{caption}: accuracy {:.2}% of {}",
        100.0 * ev.accuracy,
        ev.n
    );
    let w = (left + k as i64 * cell + 40).max(text_width(&title, 1) + 40);
    let h = top + k as i64 * cell + 60;
    let mut cv = Canvas::new(w.max(560) as u32, h as u32);
    cv.text(20, 12, "confusion matrix", 2, BLACK);
    cv.text(20, 34, &title, 1, BLACK);
    cv.text_centred(
        left + k as i64 * cell / 2,
        top - 34,
        "predicted class",
        1,
        BLACK,
    );
    cv.text(20, top - 34, "true class", 1, BLACK);
    for (t, row) in ev.confusion.iter().enumerate() {
        let sum: u64 = row.iter().sum();
        let yy = top + t as i64 * cell;
        cv.text(20, yy + cell / 2 - 4, &class_label(t, names), 1, BLACK);
        for (p, &v) in row.iter().enumerate() {
            let xx = left + p as i64 * cell;
            let share = if sum > 0 { v as f64 / sum as f64 } else { 0.0 };
            // Diagonal: correct (blue); elsewhere errors (red), stretched so rare ones show.
            let colour = if t == p {
                sequential(share, 1.0)
            } else {
                diverging(share.sqrt().min(1.0), 1.0)
            };
            cv.rect(xx, yy, cell, cell, colour);
            let dark = if t == p {
                share > 0.5
            } else {
                share.sqrt() > 0.6
            };
            cv.text_centred(
                xx + cell / 2,
                yy + cell / 2 - 4,
                &v.to_string(),
                1,
                if dark { WHITE } else { BLACK },
            );
            cv.frame(xx, yy, cell + 1, cell + 1, LIGHT);
        }
    }
    for p in 0..k {
        cv.text_centred(
            left + p as i64 * cell + cell / 2,
            top - 14,
            &p.to_string(),
            1,
            BLACK,
        );
    }
    cv.frame(left, top, k as i64 * cell + 1, k as i64 * cell + 1, GREY);
    cv.text(
        20,
        top + k as i64 * cell + 16,
        "blue: correct (share of the row); red: errors (square root of the share)",
        1,
        BLACK,
    );
    cv
}

/// `errors.png`: up to `max` misclassified images of `data` (in order), each with its true and
/// predicted label.
pub fn errors(
    data: &Dataset,
    pred: &[usize],
    names: Option<&[String]>,
    max: usize,
    caption: &str,
) -> Canvas {
    let wrong: Vec<usize> = (0..data.len().min(pred.len()))
        .filter(|&i| pred[i] != usize::from(data.labels[i]))
        .collect();
    let shown = &wrong[..wrong.len().min(max)];
    let per_row = 10i64;
    let scale = (84 / data.cols.max(1) as i64).max(1);
    let (pw, ph) = (data.cols as i64 * scale, data.rows as i64 * scale);
    let (gx, gy) = (
        (pw + 16).max(if names.is_some() { 120 } else { 0 }),
        ph + 40,
    );
    let rows = (shown.len().div_ceil(per_row as usize) as i64).max(1);
    let title = format!(
        "{caption}: {} of {} wrong, the first {} shown; under each: true -> predicted",
        wrong.len(),
        data.len().min(pred.len()),
        shown.len()
    );
    let w = (40 + per_row * gx).max(text_width(&title, 1) + 40);
    let h = 70 + rows * gy + 10;
    let mut cv = Canvas::new(w as u32, h as u32);
    cv.text(20, 12, "misclassified images", 2, BLACK);
    cv.text(20, 34, &title, 1, BLACK);
    for (j, &i) in shown.iter().enumerate() {
        let (r, c) = (j as i64 / per_row, j as i64 % per_row);
        let (x, y) = (20 + c * gx, 60 + r * gy);
        let px: Vec<f64> = data
            .image(i)
            .iter()
            .map(|&v| f64::from(v) / 255.0)
            .collect();
        cv.map(x, y, &px, (data.rows, data.cols), scale, ink);
        let t = usize::from(data.labels[i]);
        let short = |c: usize| match names.and_then(|n| n.get(c)) {
            Some(s) => s.chars().take(7).collect::<String>(),
            None => c.to_string(),
        };
        cv.text(
            x,
            y + ph + 4,
            &format!("{} -> {}", short(t), short(pred[i])),
            1,
            BLACK,
        );
        cv.text(x, y + ph + 16, &format!("#{i}"), 1, GREY);
    }
    if shown.is_empty() {
        cv.text(
            20,
            70,
            "(none: every image was classified correctly)",
            1,
            BLACK,
        );
    }
    cv
}

/// What [`write_all`] draws from.
pub struct Pictures<'a> {
    /// The trained model.
    pub model: &'a Model,
    /// The traced image for `feature_maps.png` and `backprop_maps.png` (traced with the model's
    /// weights), and its description.
    pub trace: Option<(&'a Trace, String)>,
    /// Labelled images scored for `confusion.png` and `errors.png`, with a description.
    pub eval: Option<(&'a Dataset, String)>,
    /// Epoch metrics for `training.png`, with a description.
    pub history: Option<(&'a [EpochStats], String)>,
    /// Worker threads for scoring (0: all cores).
    pub threads: usize,
}

/// Class names stored in a checkpoint's metadata (e.g. Fashion-MNIST's), if any.
pub fn class_names(model: &Model) -> Option<Vec<String>> {
    model
        .meta
        .get("class_names")
        .and_then(|s| serde_json::from_str(s).ok())
}

/// Writes every picture there is material for into `dir` (created if missing); returns the
/// files written.
pub fn write_all(dir: &Path, what: &Pictures) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut written = Vec::new();
    let mut put = |name: &str, cv: Canvas| -> Result<()> {
        let path = dir.join(name);
        cv.save(&path)?;
        written.push(path);
        Ok(())
    };
    let names = class_names(what.model);
    put("kernels.png", kernels(&what.model.cfg, &what.model.params))?;
    if let Some((t, caption)) = &what.trace {
        put("feature_maps.png", feature_maps(t, caption))?;
        let p64 = what.model.params.map(f64::from);
        put("backprop_maps.png", backprop_maps(t, &p64, caption))?;
    }
    if let Some((data, caption)) = &what.eval {
        let pred = crate::train::predict(what.model, data, what.threads)?;
        let ev = crate::train::evaluation(what.model.cfg.classes, &pred, &data.labels);
        put("confusion.png", confusion(&ev, names.as_deref(), caption))?;
        put(
            "errors.png",
            errors(data, &pred, names.as_deref(), 60, caption),
        )?;
    }
    if let Some((h, caption)) = &what.history {
        put("training.png", training(h, caption))?;
    }
    Ok(written)
}

/// Reads `train --metrics` output: one JSON object per line, each an [`EpochStats`].
pub fn read_metrics(path: &Path) -> Result<Vec<EpochStats>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: EpochStats = serde_json::from_str(line).map_err(|e| Error::Format {
            path: path.into(),
            msg: format!("line {}: not an epoch's metrics ({e})", i + 1),
        })?;
        out.push(s);
    }
    if out.is_empty() {
        return Err(Error::Format {
            path: path.into(),
            msg: "no epochs in the metrics file".into(),
        });
    }
    Ok(out)
}

/// The metrics as JSON lines, one epoch per line (what `train --metrics` writes).
pub fn metrics_lines(history: &[EpochStats]) -> String {
    history
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_scales() {
        assert_eq!(diverging(0.0, 1.0), WHITE);
        assert_eq!(diverging(1.0, 1.0), POS);
        assert_eq!(diverging(-1.0, 1.0), NEG);
        assert_eq!(diverging(-5.0, 1.0), NEG, "clamped");
        assert_eq!(sequential(0.0, 2.0), WHITE);
        assert_eq!(ink(1.0), BLACK);
        assert_eq!(ink(0.0), WHITE);
    }

    /// Each kernel weight is drawn as a square of its colour on the shared scale, where the
    /// layout says: the centre of cell (r, c) of kernel i has colour diverging(k, max |k|).
    #[test]
    fn kernels_show_the_weights_where_the_layout_puts_them() {
        let cfg = NetConfig::default();
        let p = Params::init(&cfg, crate::Init::He, 3);
        let cv = kernels(&cfg, &p);
        let k: Vec<f64> = p.k.iter().map(|&v| f64::from(v)).collect();
        let lim = max_abs(&k);
        let ks = cfg.ksize;
        let cell = (108 / ks as i64).max(4);
        let per_row = 5;
        let (gx, gy) = (ks as i64 * cell + 12, ks as i64 * cell + 22);
        for i in [0, 7, 19] {
            for (r, c) in [(0, 0), (4, 5), (8, 8)] {
                let x = 20 + (i % per_row) as i64 * gx + c as i64 * cell + cell / 2;
                let y = 64 + (i / per_row) as i64 * gy + 11 + r as i64 * cell + cell / 2;
                let px = cv.img.get_pixel(x as u32, y as u32).0;
                assert_eq!(
                    px,
                    diverging(k[i * ks * ks + r * ks + c], lim),
                    "kernel {i} ({r},{c})"
                );
            }
        }
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(
            ticks(90.0, 100.0, 6),
            vec![90.0, 92.0, 94.0, 96.0, 98.0, 100.0]
        );
        assert_eq!(
            ticks(1.0, 40.0, 8),
            vec![5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0]
        );
    }

    #[test]
    fn metrics_round_trip_and_refuse_garbage() {
        let h = vec![EpochStats {
            epoch: 1,
            train_loss: 0.5,
            train_accuracy: 0.9,
            val_accuracy: Some(0.95),
            test_accuracy: None,
            seconds: 1.5,
            images_per_second: 4e4,
            lr: 0.05,
        }];
        let d = std::env::temp_dir().join(format!("mnistconv-viz-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("m.jsonl");
        std::fs::write(&p, metrics_lines(&h)).unwrap();
        assert_eq!(read_metrics(&p).unwrap(), h);
        std::fs::write(&p, "").unwrap();
        assert!(
            read_metrics(&p)
                .unwrap_err()
                .to_string()
                .contains("no epochs")
        );
        std::fs::write(&p, "not json\n").unwrap();
        assert!(read_metrics(&p).unwrap_err().to_string().contains("line 1"));
        // One epoch, or none correct: still a picture, no panic.
        training(&h, "one epoch").png().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
