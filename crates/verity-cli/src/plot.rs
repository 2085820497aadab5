//! PNG charts: a learning run (mean reward per step and held-out accuracy over steps) and
//! selection rules' accuracy against generated tokens, drawn with `plotters` (bitmap
//! backend, fonts through ab_glyph).
//!
//! Labels need a TrueType font: `VERITY_FONT` names one, else common system paths are
//! tried (DejaVu, Liberation). With none found the chart is drawn without text rather
//! than not at all.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
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

/// A learning run's series against the step; any may be empty.
#[derive(Debug, Default)]
pub struct LearningCurve {
    /// Mean reward of each step.
    pub reward: Vec<(usize, f64)>,
    /// Held-out accuracy (0–1) where measured.
    pub heldout: Vec<(usize, f64)>,
    /// The label-free guard's health where it read the policy healthy.
    pub health: Vec<(usize, f64)>,
    /// Steps at which the guard rolled the adapter back.
    pub rollbacks: Vec<usize>,
}

/// Draws a learning run (reward, held-out accuracy and label-free health on one 0–1 axis,
/// rollbacks as vertical lines) into a 900×540 PNG at `path`.
pub fn learning_curve(path: &Path, curve: &LearningCurve) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    draw_learning_curve(&root, curve).map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}

fn draw_learning_curve<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curve: &LearningCurve,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let points = |s: &[(usize, f64)]| s.iter().map(|&(x, y)| (x as f64, y)).collect();
    let series = [
        ("mean reward".to_string(), points(&curve.reward)),
        ("held-out accuracy".to_string(), points(&curve.heldout)),
        ("label-free health".to_string(), points(&curve.health)),
    ];
    let last_step = (curve
        .reward
        .iter()
        .chain(&curve.heldout)
        .chain(&curve.health))
    .map(|(s, _)| *s)
    .chain(curve.rollbacks.iter().copied())
    .max();
    let x = 0.0..last_step.unwrap_or(1).max(1) as f64;
    let marks: Vec<f64> = curve.rollbacks.iter().map(|&s| s as f64).collect();
    draw_chart(
        root,
        "learning run",
        ("step", "reward / accuracy / health"),
        x,
        &series,
        &marks,
    )
}

/// Accuracy (0–1) against generated tokens per question, one line per selection rule,
/// its points at increasing sample counts, into a 900×540 PNG at `path`.
pub fn accuracy_vs_tokens(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let most = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .filter(|x| x.is_finite())
        .fold(1.0f64, f64::max);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    draw_chart(
        &root,
        "accuracy against tokens",
        ("generated tokens per question", "accuracy"),
        0.0..most * 1.05,
        series,
        &[],
    )
    .map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}

/// The colour of rollback lines (dark red, not in `PALETTE`).
const ROLLBACK: RGBColor = RGBColor(120, 0, 0);

/// Line colours, one per series in order (matplotlib's "tab10").
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Lines with dots, named in a legend, and vertical lines at `marks` (rollbacks); the y
/// axis spans [0, 1] and any value outside it.
fn draw_chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    x: std::ops::Range<f64>,
    series: &[(String, Vec<(f64, f64)>)],
    marks: &[f64],
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let values = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((0.0f64, 1.0f64), |(lo, hi), v| {
        if v.is_finite() {
            (lo.min(v), hi.max(v))
        } else {
            (lo, hi)
        }
    });
    let text = font_available();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(root);
    builder.margin(20);
    if text {
        builder
            .caption(caption, (FONT_FAMILY, 24))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder.build_cartesian_2d(x, lo..hi)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(x_desc)
            .y_desc(y_desc)
            .label_style((FONT_FAMILY, 14));
    } else {
        mesh.disable_x_mesh().disable_y_mesh();
    }
    mesh.draw()?;
    for (i, &step) in marks.iter().enumerate() {
        let drawn = chart.draw_series(std::iter::once(PathElement::new(
            [(step, lo), (step, hi)],
            ROLLBACK.stroke_width(2),
        )))?;
        if text && i == 0 {
            drawn
                .label("rolled back")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], ROLLBACK));
        }
    }
    for (i, (name, points)) in series.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let color = PALETTE[i % PALETTE.len()];
        let drawn = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        if text {
            drawn
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
        }
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
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
        let curve = LearningCurve {
            reward: vec![(1, 0.2), (2, 0.4), (3, 0.55)],
            heldout: vec![(0, 0.3), (3, 0.45)],
            ..LearningCurve::default()
        };
        learning_curve(&path, &curve).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 900);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 540);
        let series = vec![
            ("majority".to_string(), vec![(10.0, 0.3), (40.0, 0.5)]),
            ("esc:4".to_string(), vec![(10.0, 0.3), (25.0, 0.48)]),
        ];
        accuracy_vs_tokens(&path, &series).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The chart's RGB pixels, drawn into memory.
    fn pixels(curve: &LearningCurve) -> Vec<[u8; 3]> {
        let mut buffer = vec![0u8; 900 * 540 * 3];
        {
            let root = BitMapBackend::with_buffer(&mut buffer, (900, 540)).into_drawing_area();
            draw_learning_curve(&root, curve).unwrap();
            root.present().unwrap();
        }
        buffer.chunks(3).map(|p| [p[0], p[1], p[2]]).collect()
    }

    #[test]
    fn rollbacks_are_drawn_as_vertical_lines_and_health_as_a_series() {
        let mut curve = LearningCurve {
            reward: (1..=20).map(|s| (s, 0.3 + 0.01 * s as f64)).collect(),
            ..LearningCurve::default()
        };
        let rollback = |p: &[u8; 3]| *p == [ROLLBACK.0, ROLLBACK.1, ROLLBACK.2];
        let health_colour = |p: &[u8; 3]| *p == [PALETTE[2].0, PALETTE[2].1, PALETTE[2].2];
        let plain = pixels(&curve);
        assert!(!plain.iter().any(rollback) && !plain.iter().any(health_colour));

        curve.rollbacks = vec![12];
        curve.health = vec![(5, 0.2), (10, 0.25)];
        let marked = pixels(&curve);
        // One vertical line: its pixels share a column and span most of the plot's height.
        let columns: std::collections::BTreeMap<usize, usize> = marked
            .iter()
            .enumerate()
            .filter(|(_, p)| rollback(p))
            .fold(Default::default(), |mut m, (i, _)| {
                *m.entry(i % 900).or_default() += 1;
                m
            });
        let tallest = columns.values().copied().max().unwrap_or(0);
        assert!(tallest > 300, "{columns:?}");
        assert!(marked.iter().any(health_colour));
    }
}
