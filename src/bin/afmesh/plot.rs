//! `afmesh bench --plot`: a series of points drawn as SVG, p50 latency on
//! the left and goodput on the right, both against bytes per layer on log
//! axes; one colour per transport, its floor dashed beside it.

use std::path::Path;

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::Point;

/// What one panel plots of a point: (the mesh, its floor).
type Metric = fn(&Point) -> (f64, f64);

pub fn draw(file: &Path, points: &[Point]) -> Result<()> {
    if points.is_empty() {
        bail!("no points to plot");
    }
    let root = SVGBackend::new(file, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    panel(&left, points, "p50 latency per layer", "p50 (us)", |p| {
        (p.lat.p50, p.floor_p50)
    })?;
    panel(&right, points, "goodput", "GB/s", |p| {
        // The floor moves the same bytes in its p50 time.
        let floor = p.layer_bytes as f64 / (p.floor_p50 * 1e-6) / 1e9;
        (p.goodput, floor)
    })?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    points: &[Point],
    caption: &str,
    y_desc: &str,
    metric: Metric,
) -> Result<()> {
    let mut transports: Vec<&str> = points.iter().map(|p| p.transport.as_str()).collect();
    transports.sort_unstable();
    transports.dedup();
    let xs = points.iter().map(|p| p.layer_bytes.max(1) as f64);
    let ys = points.iter().flat_map(|p| {
        let (y, f) = metric(p);
        [y, f]
    });
    let (x0, x1) = bounds(xs);
    let (y0, y1) = bounds(ys.filter(|y| y.is_finite() && *y > 0.0));
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("bytes per layer")
        .y_desc(y_desc)
        .draw()?;
    for (i, t) in transports.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let mut of_t: Vec<(f64, f64, f64)> = points
            .iter()
            .filter(|p| p.transport == *t)
            .map(|p| {
                let (y, f) = metric(p);
                (p.layer_bytes.max(1) as f64, y.max(y0), f.max(y0))
            })
            .collect();
        of_t.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(
                of_t.iter().map(|&(x, y, _)| (x, y)),
                colour.stroke_width(2),
            ))?
            .label(t.to_string())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
        chart.draw_series(
            of_t.iter()
                .map(|&(x, y, _)| Circle::new((x, y), 3, colour.filled())),
        )?;
        chart
            .draw_series(DashedLineSeries::new(
                of_t.iter().map(|&(x, _, f)| (x, f)),
                6,
                4,
                colour.stroke_width(1),
            ))?
            .label(format!("{t} floor"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A log axis's range around `v`: a little beyond the extremes, never empty.
fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if !lo.is_finite() || hi <= 0.0 {
        return (0.1, 10.0);
    }
    (lo / 1.5, hi * 1.5)
}
