//! The figure of `maml_sine`: adapted test tasks above, the training curve below, with
//! axes, labels, legends and a title. Text is drawn with DejaVu Sans embedded from
//! `examples/assets` (plotters' `ab_glyph` feature), so no system fonts are needed.

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One adapted test task: the true function, both models' predictions, the support set.
pub(crate) struct TaskPanel {
    /// The panel's caption.
    pub(crate) caption: String,
    /// The true function on a grid.
    pub(crate) truth: Vec<(f32, f32)>,
    /// MAML's prediction after adaptation.
    pub(crate) maml: Vec<(f32, f32)>,
    /// The pretrained baseline's prediction after the same adaptation.
    pub(crate) baseline: Vec<(f32, f32)>,
    /// The support points the models adapted on.
    pub(crate) support: Vec<(f32, f32)>,
}

/// What the figure shows: its title, the legend's names, the task panels and the raw
/// training curve (one value per meta-iteration), smoothed over `window` iterations.
pub(crate) struct Figure<'a> {
    pub(crate) title: &'a str,
    pub(crate) curve_title: &'a str,
    pub(crate) maml_label: &'a str,
    pub(crate) baseline_label: &'a str,
    pub(crate) support_label: &'a str,
    pub(crate) panels: &'a [TaskPanel],
    pub(crate) curve: &'a [f64],
    pub(crate) curve_label: &'a str,
    pub(crate) window: usize,
}

const FONT: &str = "sans-serif";
const RAW: RGBColor = RGBColor(160, 190, 230);
const MAML: RGBColor = RGBColor(31, 119, 180);
const BASELINE: RGBColor = RGBColor(214, 39, 40);

/// The mean of each window of `window` values ending at each point (shorter at the start).
pub(crate) fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Writes the figure to a PNG of 1500 x 1000 pixels.
pub(crate) fn draw(path: &str, figure: &Figure<'_>) -> Result<(), Box<dyn std::error::Error>> {
    static DEJAVU: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
    register_font(FONT, FontStyle::Normal, DEJAVU).map_err(|_| "the embedded font is invalid")?;

    let root = BitMapBackend::new(path, (1500, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(figure.title, (FONT, 30))?;
    let (top, bottom) = root.split_vertically(560);
    let panels = top.split_evenly((1, figure.panels.len().max(1)));
    for (i, (area, panel)) in panels.iter().zip(figure.panels).enumerate() {
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.caption, (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(45)
            .build_cartesian_2d(-5.0f32..5.0, -6.0f32..6.0)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE.mix(0.0))
            .x_desc("x")
            .y_desc("y")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()?;
        chart
            .draw_series(LineSeries::new(panel.truth.clone(), BLACK.stroke_width(2)))?
            .label("true function")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BLACK.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(panel.maml.clone(), MAML.stroke_width(2)))?
            .label(figure.maml_label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], MAML.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                panel.baseline.clone(),
                BASELINE.stroke_width(2),
            ))?
            .label(figure.baseline_label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], BASELINE.stroke_width(2)));
        chart
            .draw_series(
                panel
                    .support
                    .iter()
                    .map(|&p| Circle::new(p, 5, BLACK.filled())),
            )?
            .label(figure.support_label)
            .legend(|(x, y)| Circle::new((x + 12, y), 5, BLACK.filled()));
        if i == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .label_font((FONT, 14))
                .draw()?;
        }
    }

    let smooth = moving_average(figure.curve, figure.window);
    let top_loss = figure.curve.iter().copied().fold(1e-3, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(figure.curve_title, (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0..figure.curve.len().max(1), 0.0..top_loss)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("meta-iteration")
        .y_desc(figure.curve_label)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            figure.curve.iter().copied().enumerate(),
            RAW.stroke_width(1),
        ))?
        .label("each meta-iteration")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], RAW.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            smooth.into_iter().enumerate(),
            MAML.stroke_width(3),
        ))?
        .label(format!("moving average over {} iterations", figure.window))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], MAML.stroke_width(3)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 15))
        .draw()?;
    root.present()?;
    Ok(())
}
