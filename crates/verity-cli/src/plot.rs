//! PNG charts of a learning run: mean reward per step and held-out accuracy over steps,
//! drawn with `plotters` (bitmap backend, fonts through ab_glyph).
//!
//! Labels need a TrueType font: `VERITY_FONT` names one, else common system paths are
//! tried (DejaVu, Liberation). With none found the chart is drawn without text rather
//! than not at all.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use verity::{Error, Result};

const FONT_FAMILY: &str = "verity-sans";
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers a font once per process; false when none could be loaded.
fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let from_env = std::env::var("VERITY_FONT").ok();
        let paths = from_env.iter().map(String::as_str).chain(FONT_CANDIDATES);
        for path in paths {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("cannot draw {}: {e}", path.display()))
}

/// Draws reward (left axis, as given) and held-out accuracy (same axis, 0–1) against the
/// step into a 900×540 PNG at `path`. Either series may be empty.
pub fn learning_curve(
    path: &Path,
    reward: &[(usize, f64)],
    heldout: &[(usize, f64)],
) -> Result<()> {
    let last_step = reward
        .iter()
        .chain(heldout)
        .map(|(s, _)| *s)
        .max()
        .unwrap_or(1)
        .max(1);
    let values = reward.iter().chain(heldout).map(|(_, v)| *v);
    let (lo, hi) = values.fold((0.0f64, 1.0f64), |(lo, hi), v| {
        if v.is_finite() {
            (lo.min(v), hi.max(v))
        } else {
            (lo, hi)
        }
    });
    let text = font_available();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("learning run", (FONT_FAMILY, 24))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..last_step as f64, lo..hi)
        .map_err(|e| plot_error(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step")
            .y_desc("reward / accuracy")
            .label_style((FONT_FAMILY, 14));
    } else {
        mesh.disable_x_mesh().disable_y_mesh();
    }
    mesh.draw().map_err(|e| plot_error(path, e))?;
    type Series<'a> = (&'a [(usize, f64)], RGBColor, &'static str);
    let series: [Series; 2] = [
        (reward, RGBColor(31, 119, 180), "mean reward"),
        (heldout, RGBColor(214, 39, 40), "held-out accuracy"),
    ];
    for (points, color, name) in series {
        if points.is_empty() {
            continue;
        }
        let line: Vec<(f64, f64)> = points.iter().map(|&(s, v)| (s as f64, v)).collect();
        let drawn = chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| plot_error(path, e))?;
        if text {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| plot_error(path, e))?;
    }
    if text {
        chart
            .configure_series_labels()
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_error(path, e))?;
    }
    root.present().map_err(|e| plot_error(path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_both_series() {
        let dir = std::env::temp_dir().join(format!("verity-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.png");
        let reward = [(1, 0.2), (2, 0.4), (3, 0.55)];
        let heldout = [(0, 0.3), (3, 0.45)];
        learning_curve(&path, &reward, &heldout).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 900);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 540);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
