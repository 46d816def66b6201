//! Drawing a [`Timeline`] as SVG with plotters.
//!
//! Two panels share the time axis. The top one shows what is left to send (remaining
//! bytes) and what a switch-over would cost now (expected downtime, right axis, with
//! the downtime limit where known). The bottom one shows the race that decides
//! convergence: throughput against the dirty rate by Ferry's rule and by QEMU's, in
//! bytes/s. Both carry the pass boundaries, the switch-over predicted at the end of
//! the first pass and the downtime window. Each panel's legend sits beside it, so no
//! legend hides a line.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::timeline::{Convergence, Timeline};
use crate::Error;

/// A data series' legend label and its stroke colour in the SVG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeriesStyle {
    /// The legend label, verbatim.
    pub label: &'static str,
    /// The stroke colour as (r, g, b); plotters writes it as `#RRGGBB`.
    pub rgb: (u8, u8, u8),
}

impl SeriesStyle {
    /// The colour as the SVG's `stroke` attribute spells it (`#RRGGBB`).
    pub fn stroke_hex(&self) -> String {
        let (r, g, b) = self.rgb;
        format!("#{r:02X}{g:02X}{b:02X}")
    }

    fn color(&self) -> RGBColor {
        RGBColor(self.rgb.0, self.rgb.1, self.rgb.2)
    }
}

/// Remaining bytes (top panel, left axis).
const REMAINING: SeriesStyle = SeriesStyle {
    label: "remaining bytes",
    rgb: (31, 119, 180),
};
/// Expected downtime (top panel, right axis).
const EXPECTED_DOWNTIME: SeriesStyle = SeriesStyle {
    label: "expected downtime (right axis)",
    rgb: (255, 127, 14),
};
/// Throughput (bottom panel).
const THROUGHPUT: SeriesStyle = SeriesStyle {
    label: "throughput",
    rgb: (44, 160, 44),
};
/// Ferry's dirty rate (bottom panel).
const DIRTY_FERRY: SeriesStyle = SeriesStyle {
    label: "dirty rate (Ferry)",
    rgb: (214, 39, 40),
};
/// QEMU's rule (bottom panel).
const DIRTY_QEMU: SeriesStyle = SeriesStyle {
    label: "dirty rate (QEMU rule)",
    rgb: (148, 103, 189),
};

/// Auto-converge's vCPU throttle (bottom panel, right axis), where it acted.
const THROTTLE: SeriesStyle = SeriesStyle {
    label: "vCPU throttle (right axis)",
    rgb: (23, 190, 207),
};

/// The data series every plot has, each drawn as one `<polyline>` of its colour
/// with a point per sample (legend swatches are `<rect>`s), for checking a plot.
/// The expected downtime is drawn too where the snapshots know it (the engine
/// reports it once it measured the link, not in a migration shorter than that).
pub const SERIES: [SeriesStyle; 4] = [REMAINING, THROUGHPUT, DIRTY_FERRY, DIRTY_QEMU];

const DOWNTIME_LIMIT: RGBColor = RGBColor(166, 86, 40);
const NEEDED_BANDWIDTH: RGBColor = RGBColor(60, 60, 60);
const PASS: RGBColor = RGBColor(150, 150, 150);
const PREDICTED: RGBColor = RGBColor(227, 70, 194);
const DOWNTIME: RGBColor = RGBColor(220, 20, 60);
const SETUP: RGBColor = RGBColor(190, 190, 190);
const TEXT: RGBColor = RGBColor(30, 30, 30);

const WIDTH_PX: u32 = 1280;
const HEIGHT_PX: u32 = 940;
const HEADER_PX: u32 = 96;
const LEGEND_PX: u32 = 330;
const FONT: &str = "sans-serif";
/// Characters a header line holds at 15 px across the picture.
const HEADER_LINE_CHARS: usize = 168;
/// Pass boundaries get a number above them up to this many passes.
const MAX_PASS_LABELS: usize = 24;
/// A predicted switch-over later than this many times the end is drawn as an arrow.
const MAX_PREDICTION_STRETCH: f64 = 3.0;

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::Draw(e.to_string())
}

/// Draws `timeline` as an SVG file at `path` titled `title`.
pub fn render_svg(timeline: &Timeline, title: &str, path: &Path) -> Result<(), Error> {
    let svg = render_svg_string(timeline, title)?;
    std::fs::write(path, svg).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Draws `timeline` titled `title` and returns the SVG text.
pub fn render_svg_string(timeline: &Timeline, title: &str) -> Result<String, Error> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root, timeline, title)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A unit for an axis: the divisor and its name.
#[derive(Clone, Copy)]
struct Unit {
    div: f64,
    name: &'static str,
}

fn byte_unit(max: f64) -> Unit {
    const UNITS: [(f64, &str); 4] = [
        (1.0, "B"),
        (1024.0, "KiB"),
        (1048576.0, "MiB"),
        (1073741824.0, "GiB"),
    ];
    let (div, name) = UNITS
        .iter()
        .rev()
        .find(|(d, _)| max >= *d)
        .copied()
        .unwrap_or(UNITS[0]);
    Unit { div, name }
}

/// Bytes as text with a binary unit.
fn bytes_text(n: u64) -> String {
    let u = byte_unit(n as f64);
    if u.div == 1.0 {
        format!("{n} B")
    } else {
        format!("{:.1} {}", n as f64 / u.div, u.name)
    }
}

/// Milliseconds as text (`850 ms`, `12.3 s`).
fn ms_text(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// What the drawing needs, computed once from the timeline.
struct Facts {
    /// Time axis unit (ms or s).
    time: Unit,
    /// Right end of the time axis, in `time` units.
    x_max: f64,
    /// Pass boundaries (time ms, pass count).
    passes: Vec<(u64, u64)>,
    /// The first pass's prediction: when it was made, what it said.
    prediction: Option<(u64, Convergence)>,
    /// The predicted switch-over, ms, if the prediction was "converging".
    predicted_ms: Option<u64>,
    /// The downtime window, ms.
    downtime: Option<(u64, u64)>,
    /// The bandwidth the latest "not converging" prediction asked for, bytes/s.
    needed_bandwidth: Option<u64>,
}

impl Facts {
    fn of(tl: &Timeline) -> Facts {
        let end_ms = tl.end_ms();
        let prediction = tl.first_pass_prediction();
        let predicted_ms = prediction.and_then(|(t, p)| match p {
            Convergence::Converging {
                expected_completion_ms,
            } => Some(t + expected_completion_ms),
            _ => None,
        });
        let mut span_ms = end_ms as f64;
        if let Some(p) = predicted_ms {
            span_ms = span_ms.max((p as f64).min(end_ms as f64 * MAX_PREDICTION_STRETCH));
        }
        let span_ms = (span_ms * 1.02).max(1.0);
        let time = if span_ms <= 5000.0 {
            Unit {
                div: 1.0,
                name: "ms",
            }
        } else {
            Unit {
                div: 1000.0,
                name: "s",
            }
        };
        let downtime = tl.outcome.as_ref().and_then(|o| {
            o.downtime_ms
                .map(|d| (o.total_time_ms.saturating_sub(d), o.total_time_ms))
        });
        let needed_bandwidth = tl.samples.iter().rev().find_map(|s| match s.prediction {
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec,
            } => Some(needed_bandwidth_bytes_per_sec),
            _ => None,
        });
        Facts {
            time,
            x_max: span_ms / time.div,
            passes: tl.pass_boundaries(),
            prediction,
            predicted_ms,
            downtime,
            needed_bandwidth,
        }
    }

    fn x(&self, t_ms: u64) -> f64 {
        t_ms as f64 / self.time.div
    }
}

fn font(size: u32, color: &RGBColor) -> TextStyle<'static> {
    (FONT, size).into_font().color(color)
}

fn draw(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    tl: &Timeline,
    title: &str,
) -> Result<(), Error> {
    let facts = Facts::of(tl);
    let (header, body) = root.split_vertically(HEADER_PX);
    draw_header(&header, tl, &facts, title)?;
    let panels = body.split_evenly((2, 1));
    draw_progress_panel(&panels[0], tl, &facts)?;
    draw_rates_panel(&panels[1], tl, &facts)?;
    Ok(())
}

/// The title and three lines that say what happened and why.
fn draw_header(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    tl: &Timeline,
    facts: &Facts,
    title: &str,
) -> Result<(), Error> {
    let mut lines = vec![outcome_line(tl)];
    lines.push(prediction_line(facts));
    lines.push(verdict_line(tl, facts));
    area.draw(&Text::new(title.to_owned(), (16, 8), font(22, &TEXT)))
        .map_err(draw_err)?;
    for (i, l) in lines.iter().filter(|l| !l.is_empty()).enumerate() {
        area.draw(&Text::new(
            clip(l, HEADER_LINE_CHARS),
            (16, 38 + 19 * i as i32),
            font(15, &TEXT),
        ))
        .map_err(draw_err)?;
    }
    Ok(())
}

/// `text`, cut to `max` characters with an ellipsis.
fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

fn outcome_line(tl: &Timeline) -> String {
    let passes = tl.samples.last().map_or(0, |s| s.pass);
    let sent = tl.samples.last().map_or(0, |s| s.transferred_bytes);
    let Some(o) = &tl.outcome else {
        return match tl.samples.last() {
            Some(s) => format!(
                "still {} at {} (no end recorded): {} sent, {} pass(es) done",
                s.status,
                ms_text(s.t_ms),
                bytes_text(sent),
                passes
            ),
            None => "no samples recorded".into(),
        };
    };
    let mut s = format!(
        "{} after {}: {} sent in {} pass(es)",
        o.status,
        ms_text(o.total_time_ms),
        bytes_text(sent),
        passes
    );
    if let Some(d) = o.downtime_ms {
        s += &format!(", downtime {d} ms");
        if let Some(p) = &o.downtime_phases_us {
            let ms = |us: u64| us as f64 / 1000.0;
            s += &format!(
                " (pause {:.1} | sync {:.1} | pages {:.1} | device {:.1} | ack {:.1} ms)",
                ms(p.pause),
                ms(p.sync),
                ms(p.pages),
                ms(p.device),
                ms(p.ack)
            );
        }
    }
    if let Some(e) = &o.error_desc {
        s += &format!(": {e}");
    }
    s
}

fn prediction_line(facts: &Facts) -> String {
    let actual = facts
        .downtime
        .map(|(start, _)| format!("; it switched over at {}", ms_text(start)));
    match facts.prediction {
        None => "no convergence prediction after the first pass".into(),
        Some((at, Convergence::Converging { .. })) => format!(
            "predicted at the end of pass 1 ({}): converging, switch-over at {}{}",
            ms_text(at),
            ms_text(facts.predicted_ms.unwrap_or(at)),
            actual.unwrap_or_else(|| "; it did not switch over".into())
        ),
        Some((
            at,
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec,
            },
        )) => format!(
            "predicted at the end of pass 1 ({}): NOT converging, needs {}/s{}",
            ms_text(at),
            bytes_text(needed_bandwidth_bytes_per_sec),
            actual.unwrap_or_default()
        ),
        Some((_, Convergence::Unknown)) => String::new(),
    }
}

/// Why it did or did not converge, from the last sample of the live phase.
fn verdict_line(tl: &Timeline, facts: &Facts) -> String {
    let live = tl
        .samples
        .iter()
        .rev()
        .find(|s| s.status == "active")
        .or(tl.samples.last());
    let Some(s) = live else {
        return String::new();
    };
    let throttle = tl
        .samples
        .iter()
        .filter_map(|s| s.cpu_throttle_percentage)
        .max()
        .filter(|&p| p > 0)
        .map(|p| format!("; auto-converge throttled up to {p}%"))
        .unwrap_or_default();
    let rates = format!(
        "throughput {}/s vs dirty rate {}/s (Ferry), {}/s (QEMU rule)",
        bytes_text(s.throughput_bytes_per_sec),
        bytes_text(tl.pages_to_bytes(s.dirty_pages_rate)),
        bytes_text(tl.pages_to_bytes(s.qemu_rule_dirty_pages_rate)),
    );
    let completed = tl.outcome.as_ref().is_some_and(|o| o.status == "completed");
    if completed {
        format!("converged; last live sample: {rates}{throttle}")
    } else if let Some(need) = facts.needed_bandwidth {
        format!(
            "did not converge: {rates}; it needs {}/s{throttle}",
            bytes_text(need)
        )
    } else {
        format!("last live sample: {rates}{throttle}")
    }
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A legend entry: a swatch and a label, with an optional second line.
struct Entry {
    label: String,
    detail: Option<String>,
    swatch: Swatch,
}

enum Swatch {
    Line(RGBColor),
    Dashed(RGBColor),
    Fill(RGBColor),
}

fn entry(label: &str, detail: Option<String>, swatch: Swatch) -> Entry {
    Entry {
        label: label.to_owned(),
        detail,
        swatch,
    }
}

/// Draws a legend column; swatches are rectangles so only data lines are polylines.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    entries: &[Entry],
) -> Result<(), Error> {
    let mut y = 30;
    for e in entries {
        let (x0, x1) = (8, 38);
        match e.swatch {
            Swatch::Line(c) => area
                .draw(&Rectangle::new([(x0, y - 2), (x1, y + 2)], c.filled()))
                .map_err(draw_err)?,
            Swatch::Dashed(c) => {
                for i in 0..3 {
                    let a = x0 + i * 11;
                    area.draw(&Rectangle::new([(a, y - 1), (a + 7, y + 1)], c.filled()))
                        .map_err(draw_err)?;
                }
            }
            Swatch::Fill(c) => area
                .draw(&Rectangle::new(
                    [(x0, y - 7), (x1, y + 7)],
                    c.mix(0.3).filled(),
                ))
                .map_err(draw_err)?,
        }
        area.draw(&Text::new(
            e.label.clone(),
            (x1 + 8, y),
            font(15, &TEXT).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(draw_err)?;
        y += 20;
        if let Some(d) = &e.detail {
            area.draw(&Text::new(
                d.clone(),
                (x1 + 8, y - 4),
                font(12, &RGBColor(90, 90, 90)).pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(draw_err)?;
            y += 16;
        }
        y += 4;
    }
    Ok(())
}

/// Shading and markers shared by both panels, drawn under the data lines.
fn draw_backdrop(
    chart: &mut Chart<'_, '_>,
    facts: &Facts,
    y_max: f64,
    tl: &Timeline,
) -> Result<(), Error> {
    let px = chart.plotting_area().dim_in_pixel().0.max(1) as f64;
    let min_w = 3.0 * facts.x_max / px;
    let mut band = |from_ms: u64, to_ms: u64, c: RGBColor, alpha: f64| {
        let x0 = facts.x(from_ms);
        let x1 = facts.x(to_ms).max(x0 + min_w);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x0, y_max), (x1, 0.0)],
                c.mix(alpha).filled(),
            )))
            .map(|_| ())
            .map_err(draw_err)
    };
    if let Some(setup) = tl.setup_time_ms.filter(|&s| s > 0) {
        band(0, setup, SETUP, 0.25)?;
    }
    if let Some((from, to)) = facts.downtime {
        band(from, to, DOWNTIME, 0.3)?;
    }
    for &(t, _) in &facts.passes {
        let x = facts.x(t);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_max)],
                PASS.stroke_width(1),
            )))
            .map_err(draw_err)?;
    }
    let predicted_at = match facts.prediction {
        Some((_, Convergence::Converging { .. })) => facts.predicted_ms,
        Some((at, Convergence::NotConverging { .. })) => Some(at),
        _ => None,
    };
    if let Some(p) = predicted_at {
        let x = facts.x(p).min(facts.x_max);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x, 0.0), (x, y_max)],
                8,
                5,
                PREDICTED.stroke_width(2),
            ))
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Draws `text` on a white box, `row` lines below the top of the plotting area, its
/// left or right end (`h`) at time `x`, so labels stay readable over the lines.
fn boxed_label(
    chart: &Chart<'_, '_>,
    text: String,
    x: f64,
    row: i32,
    h: HPos,
    size: u32,
    color: &RGBColor,
) -> Result<(), Error> {
    let area = chart.plotting_area();
    let (xr, _) = area.get_pixel_range();
    let px = area.map_coordinate(&(x, 0.0)).0 - xr.start;
    // plotters writes font-size as size / 1.24; DejaVu Sans runs ~0.6 em a character.
    let w = (text.chars().count() as f64 * 0.6 * size as f64 / 1.24) as i32 + 8;
    let hgt = size as i32 + 2;
    let width = xr.end - xr.start;
    let x0 = match h {
        HPos::Right => px - w - 2,
        _ => px + 2,
    }
    .clamp(0, (width - w).max(0));
    let y0 = 4 + row * (hgt + 4);
    let pixels = area.strip_coord_spec();
    pixels
        .draw(&Rectangle::new(
            [(x0, y0), (x0 + w, y0 + hgt)],
            WHITE.mix(0.85).filled(),
        ))
        .map_err(draw_err)?;
    pixels
        .draw(&Text::new(
            text,
            (x0 + 4, y0 + hgt / 2),
            font(size, color).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(draw_err)
}

/// Labels on the markers (top panel only): pass numbers, "predicted", the downtime.
fn draw_marker_labels(
    chart: &mut Chart<'_, '_>,
    tl: &Timeline,
    facts: &Facts,
    y_max: f64,
) -> Result<(), Error> {
    let area = chart.plotting_area();
    if facts.passes.len() <= MAX_PASS_LABELS {
        let mut last_px: Option<i32> = None;
        for &(t, pass) in &facts.passes {
            let x = facts.x(t);
            let px = area.map_coordinate(&(x, y_max)).0;
            // Keep numbers apart when passes crowd.
            if last_px.is_some_and(|l| px - l < 18) {
                continue;
            }
            last_px = Some(px);
            area.draw(&Text::new(
                format!("{pass}"),
                (x, y_max),
                font(12, &RGBColor(110, 110, 110)).pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(draw_err)?;
        }
    }
    if let Some(p) = facts.predicted_ms {
        let beyond = facts.x(p) > facts.x_max;
        let text = if beyond {
            format!("predicted switch-over at {} →", ms_text(p))
        } else {
            format!("predicted switch-over ({})", ms_text(p))
        };
        let x = facts.x(p).min(facts.x_max);
        boxed_label(chart, text, x, 1, HPos::Right, 13, &PREDICTED)?;
    }
    if let Some((at, Convergence::NotConverging { .. })) = facts.prediction {
        boxed_label(
            chart,
            "predicted here: NOT converging".to_owned(),
            facts.x(at),
            1,
            HPos::Left,
            13,
            &PREDICTED,
        )?;
    }
    if let Some(o) = tl.outcome.as_ref().filter(|o| o.downtime_ms.is_none()) {
        boxed_label(
            chart,
            format!("{} at {}", o.status, ms_text(o.total_time_ms)),
            facts.x(o.total_time_ms),
            2,
            HPos::Right,
            14,
            &DOWNTIME,
        )?;
    }
    if let Some((from, to)) = facts.downtime {
        boxed_label(
            chart,
            format!("downtime {} ms", to - from),
            facts.x(from),
            2,
            HPos::Right,
            14,
            &DOWNTIME,
        )?;
    }
    Ok(())
}

/// A line series of `points` (time ms, value), scaled to axis units.
fn series(
    chart: &mut Chart<'_, '_>,
    facts: &Facts,
    points: impl Iterator<Item = (u64, f64)>,
    style: ShapeStyle,
) -> Result<(), Error> {
    let pts: Vec<(f64, f64)> = points.map(|(t, v)| (facts.x(t), v)).collect();
    if pts.is_empty() {
        return Ok(());
    }
    chart
        .draw_series(LineSeries::new(pts, style))
        .map_err(draw_err)?;
    Ok(())
}

/// Tick text with as many decimals as the axis' span needs.
fn tick_text(v: f64, span: f64) -> String {
    if span >= 20.0 || v == 0.0 {
        format!("{v:.0}")
    } else if span >= 2.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Log-axis tick text: only 1, 2 and 5 times a power of ten are labelled.
fn log_tick_text(v: &f64) -> String {
    if *v <= 0.0 {
        return String::new();
    }
    let mantissa = v / 10f64.powf(v.log10().floor());
    if [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 0.01) {
        tick_text(*v, *v * 10.0)
    } else {
        String::new()
    }
}

/// Common axes of a panel.
fn mesh(chart: &mut Chart<'_, '_>, facts: &Facts, y_max: f64, y_desc: &str) -> Result<(), Error> {
    let x_span = facts.x_max;
    let x_fmt = move |v: &f64| tick_text(*v, x_span);
    let y_fmt = move |v: &f64| tick_text(*v, y_max);
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc(format!("time since migrate ({})", facts.time.name))
        .y_desc(y_desc)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style(font(13, &TEXT))
        .axis_desc_style(font(14, &TEXT))
        .draw()
        .map_err(draw_err)
}

fn marker_entries(facts: &Facts, tl: &Timeline) -> Vec<Entry> {
    let mut v = Vec::new();
    if !facts.passes.is_empty() {
        let n = facts.passes.last().map_or(0, |p| p.1);
        v.push(entry(
            "pass boundary",
            Some(format!("{n} pass(es); the number is the pass that ended")),
            Swatch::Line(PASS),
        ));
    }
    match facts.prediction {
        Some((at, Convergence::Converging { .. })) => v.push(entry(
            "predicted switch-over",
            Some(format!(
                "at {}, predicted at the end of pass 1 ({})",
                ms_text(facts.predicted_ms.unwrap_or(at)),
                ms_text(at)
            )),
            Swatch::Dashed(PREDICTED),
        )),
        Some((
            at,
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec,
            },
        )) => v.push(entry(
            "predicted: not converging",
            Some(format!(
                "at the end of pass 1 ({}): needs {}/s",
                ms_text(at),
                bytes_text(needed_bandwidth_bytes_per_sec)
            )),
            Swatch::Dashed(PREDICTED),
        )),
        _ => {}
    }
    if let Some((from, to)) = facts.downtime {
        v.push(entry(
            &format!("downtime {} ms", to - from),
            Some(format!("guest paused {} → {}", ms_text(from), ms_text(to))),
            Swatch::Fill(DOWNTIME),
        ));
    } else if let Some(o) = &tl.outcome {
        v.push(entry(
            &format!("{}: no downtime", o.status),
            Some("the source guest kept running".into()),
            Swatch::Fill(DOWNTIME),
        ));
    }
    if tl.setup_time_ms.is_some_and(|s| s > 0) {
        v.push(entry("setup", None, Swatch::Fill(SETUP)));
    }
    v
}

/// Top panel: remaining bytes (left) and expected downtime (right).
fn draw_progress_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    tl: &Timeline,
    facts: &Facts,
) -> Result<(), Error> {
    let (plot_area, legend_area) = area.split_horizontally(WIDTH_PX - LEGEND_PX);
    let max_remaining = tl
        .samples
        .iter()
        .map(|s| s.remaining_bytes)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let unit = byte_unit(max_remaining);
    let y_max = max_remaining / unit.div * 1.08;
    // Expected downtime on a log scale: it spans seconds down to a few ms, and on a
    // linear one it would trace the remaining bytes (it is their cost at the link's
    // rate). Where it crosses the downtime limit, the migration may switch over.
    let expected = tl
        .samples
        .iter()
        .filter_map(|s| s.expected_downtime_ms.filter(|&d| d > 0));
    let y2_hi = expected
        .clone()
        .chain(tl.downtime_limit_ms)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.5;
    let y2_lo = (expected.chain(tl.downtime_limit_ms).min().unwrap_or(1) as f64 / 1.5)
        .clamp(0.1, y2_hi / 10.0);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(72)
        .right_y_label_area_size(64)
        .caption(
            "what is left to send, and what a switch-over would cost now",
            font(16, &TEXT),
        )
        .build_cartesian_2d(0.0..facts.x_max, 0.0..y_max)
        .map_err(draw_err)?
        .set_secondary_coord(0.0..facts.x_max, (y2_lo..y2_hi).log_scale());
    mesh(
        &mut chart,
        facts,
        y_max,
        &format!("remaining ({})", unit.name),
    )?;
    chart
        .configure_secondary_axes()
        .y_desc("expected downtime (ms, log scale)")
        .y_label_formatter(&log_tick_text)
        .label_style(font(13, &TEXT))
        .axis_desc_style(font(14, &TEXT))
        .draw()
        .map_err(draw_err)?;
    draw_backdrop(&mut chart, facts, y_max, tl)?;
    if let Some(limit) = tl.downtime_limit_ms {
        chart
            .draw_secondary_series(DashedLineSeries::new(
                vec![(0.0, limit as f64), (facts.x_max, limit as f64)],
                10,
                6,
                DOWNTIME_LIMIT.stroke_width(2),
            ))
            .map_err(draw_err)?;
    }
    let pts: Vec<(f64, f64)> = tl
        .samples
        .iter()
        .filter_map(|s| {
            s.expected_downtime_ms
                .filter(|&d| d > 0)
                .map(|d| (facts.x(s.t_ms), d as f64))
        })
        .collect();
    if !pts.is_empty() {
        chart
            .draw_secondary_series(LineSeries::new(
                pts,
                EXPECTED_DOWNTIME.color().stroke_width(2),
            ))
            .map_err(draw_err)?;
    }
    series(
        &mut chart,
        facts,
        tl.samples
            .iter()
            .map(|s| (s.t_ms, s.remaining_bytes as f64 / unit.div)),
        REMAINING.color().stroke_width(3),
    )?;
    draw_marker_labels(&mut chart, tl, facts, y_max)?;

    let last = tl.samples.last();
    let mut entries = vec![
        entry(
            REMAINING.label,
            last.map(|s| format!("last {}", bytes_text(s.remaining_bytes))),
            Swatch::Line(REMAINING.color()),
        ),
        entry(
            EXPECTED_DOWNTIME.label,
            tl.samples
                .iter()
                .rev()
                .find_map(|s| s.expected_downtime_ms.filter(|&d| d > 0))
                .map(|d| format!("last {d} ms"))
                .or(Some("not known: the link was not measured yet".into())),
            Swatch::Line(EXPECTED_DOWNTIME.color()),
        ),
    ];
    if let Some(limit) = tl.downtime_limit_ms {
        entries.push(entry(
            &format!("downtime limit {limit} ms"),
            Some("switch-over once expected downtime is below".into()),
            Swatch::Dashed(DOWNTIME_LIMIT),
        ));
    }
    entries.extend(marker_entries(facts, tl));
    draw_legend(&legend_area, &entries)
}

/// Bottom panel: throughput against the two dirty rates, bytes/s.
fn draw_rates_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    tl: &Timeline,
    facts: &Facts,
) -> Result<(), Error> {
    let (plot_area, legend_area) = area.split_horizontally(WIDTH_PX - LEGEND_PX);
    let max_rate = tl
        .samples
        .iter()
        .flat_map(|s| {
            [
                s.throughput_bytes_per_sec,
                tl.pages_to_bytes(s.dirty_pages_rate),
                tl.pages_to_bytes(s.qemu_rule_dirty_pages_rate),
            ]
        })
        .chain(facts.needed_bandwidth)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let unit = byte_unit(max_rate);
    let y_max = max_rate / unit.div * 1.08;
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(72)
        .right_y_label_area_size(64)
        .caption(
            "converges while throughput stays above the dirty rate",
            font(16, &TEXT),
        )
        .build_cartesian_2d(0.0..facts.x_max, 0.0..y_max)
        .map_err(draw_err)?
        .set_secondary_coord(0.0..facts.x_max, 0.0..105.0);
    mesh(&mut chart, facts, y_max, &format!("{}/s", unit.name))?;
    // Auto-converge's throttle on the right axis, where it acted: it is why a
    // guest's dirty rate falls.
    let throttled = tl
        .samples
        .iter()
        .any(|s| s.cpu_throttle_percentage.is_some_and(|p| p > 0));
    if throttled {
        chart
            .configure_secondary_axes()
            .y_desc("vCPU throttle (%)")
            .y_label_formatter(&|v: &f64| format!("{v:.0}"))
            .label_style(font(13, &TEXT))
            .axis_desc_style(font(14, &TEXT))
            .draw()
            .map_err(draw_err)?;
    }
    draw_backdrop(&mut chart, facts, y_max, tl)?;
    if throttled {
        let pts: Vec<(f64, f64)> = tl
            .samples
            .iter()
            .map(|s| {
                (
                    facts.x(s.t_ms),
                    s.cpu_throttle_percentage.unwrap_or(0) as f64,
                )
            })
            .collect();
        chart
            .draw_secondary_series(LineSeries::new(pts, THROTTLE.color().stroke_width(2)))
            .map_err(draw_err)?;
    }
    if let Some(need) = facts.needed_bandwidth {
        let y = need as f64 / unit.div;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, y), (facts.x_max, y)],
                10,
                6,
                NEEDED_BANDWIDTH.stroke_width(2),
            ))
            .map_err(draw_err)?;
    }
    let rate = |pages: u64| tl.pages_to_bytes(pages) as f64 / unit.div;
    series(
        &mut chart,
        facts,
        tl.samples
            .iter()
            .map(|s| (s.t_ms, rate(s.qemu_rule_dirty_pages_rate))),
        DIRTY_QEMU.color().stroke_width(2),
    )?;
    series(
        &mut chart,
        facts,
        tl.samples
            .iter()
            .map(|s| (s.t_ms, rate(s.dirty_pages_rate))),
        DIRTY_FERRY.color().stroke_width(3),
    )?;
    series(
        &mut chart,
        facts,
        tl.samples
            .iter()
            .map(|s| (s.t_ms, s.throughput_bytes_per_sec as f64 / unit.div)),
        THROUGHPUT.color().stroke_width(3),
    )?;

    let last_live = tl
        .samples
        .iter()
        .rev()
        .find(|s| s.status == "active")
        .or(tl.samples.last());
    let page = tl.page_size_bytes;
    let mut entries = vec![
        entry(
            THROUGHPUT.label,
            last_live.map(|s| {
                format!(
                    "transferred bytes' growth; last {}/s",
                    bytes_text(s.throughput_bytes_per_sec)
                )
            }),
            Swatch::Line(THROUGHPUT.color()),
        ),
        entry(
            DIRTY_FERRY.label,
            last_live.map(|s| {
                format!(
                    "unique pages/s × {page} B; last {}/s",
                    bytes_text(tl.pages_to_bytes(s.dirty_pages_rate))
                )
            }),
            Swatch::Line(DIRTY_FERRY.color()),
        ),
        entry(
            DIRTY_QEMU.label,
            last_live.map(|s| {
                format!(
                    "new pages per sync × {page} B; last {}/s",
                    bytes_text(tl.pages_to_bytes(s.qemu_rule_dirty_pages_rate))
                )
            }),
            Swatch::Line(DIRTY_QEMU.color()),
        ),
    ];
    if throttled {
        let max = tl
            .samples
            .iter()
            .filter_map(|s| s.cpu_throttle_percentage)
            .max()
            .unwrap_or(0);
        entries.push(entry(
            THROTTLE.label,
            Some(format!("auto-converge; up to {max}%")),
            Swatch::Line(THROTTLE.color()),
        ));
    }
    if let Some(need) = facts.needed_bandwidth {
        entries.push(entry(
            &format!("needed bandwidth {}/s", bytes_text(need)),
            Some("what the last prediction said converging takes".into()),
            Swatch::Dashed(NEEDED_BANDWIDTH),
        ));
    }
    if tl.end_ms() < 1000 && tl.samples.iter().all(|s| s.dirty_pages_rate == 0) {
        entries.push(entry(
            "dirty rates: none measured yet",
            Some("a rate needs a ≥ 1 s period; this run was shorter".into()),
            Swatch::Fill(RGBColor(255, 255, 255)),
        ));
    }
    draw_legend(&legend_area, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::{DowntimePhasesUs, Outcome, Sample};

    fn sample(t_ms: u64, remaining: u64, transferred: u64, pass: u64, p: Convergence) -> Sample {
        Sample {
            t_ms,
            status: "active".into(),
            remaining_bytes: remaining,
            transferred_bytes: transferred,
            throughput_bytes_per_sec: 1_000_000_000,
            dirty_pages_rate: 20_000,
            qemu_rule_dirty_pages_rate: 30_000,
            pass,
            prediction: p,
            expected_downtime_ms: Some(remaining / 1_000_000),
            cpu_throttle_percentage: None,
        }
    }

    /// 1 GiB sent in passes of falling size, switch-over at 1.4 s, 12 ms downtime.
    pub(crate) fn converging() -> Timeline {
        let mut tl = Timeline::new();
        tl.total_bytes = 1 << 30;
        tl.setup_time_ms = Some(5);
        tl.downtime_limit_ms = Some(300);
        let conv = Convergence::Converging {
            expected_completion_ms: 350,
        };
        let mut remaining = 1u64 << 30;
        for i in 0..14u64 {
            let pass = match i {
                0..=9 => 0,
                10..=12 => 1,
                _ => 2,
            };
            remaining = remaining * 3 / 4;
            let p = if pass >= 1 {
                conv
            } else {
                Convergence::Unknown
            };
            tl.samples
                .push(sample(10 + i * 100, remaining, i * 100_000_000, pass, p));
        }
        let mut done = sample(1412, 0, 1_500_000_000, 3, Convergence::Unknown);
        done.status = "completed".into();
        done.expected_downtime_ms = None;
        tl.samples.push(done);
        tl.outcome = Some(Outcome {
            status: "completed".into(),
            total_time_ms: 1412,
            downtime_ms: Some(12),
            downtime_phases_us: Some(DowntimePhasesUs {
                pause: 100,
                sync: 300,
                pages: 5000,
                device: 100,
                ack: 6000,
            }),
            error_desc: None,
        });
        tl
    }

    /// The guest dirties faster than the link sends; cancelled after 8 s.
    pub(crate) fn non_converging() -> Timeline {
        let mut tl = Timeline::new();
        tl.total_bytes = 4 << 30;
        tl.downtime_limit_ms = Some(300);
        let not = Convergence::NotConverging {
            needed_bandwidth_bytes_per_sec: 2_500_000_000,
        };
        for i in 0..80u64 {
            let pass = i / 10;
            let remaining = if i < 10 {
                (4u64 << 30) - i * 300_000_000
            } else {
                1_600_000_000 + (i % 10) * 10_000_000
            };
            let p = if pass >= 1 { not } else { Convergence::Unknown };
            let mut s = sample(100 * i + 3, remaining, i * 100_000_000, pass, p);
            s.dirty_pages_rate = 600_000;
            s.qemu_rule_dirty_pages_rate = 450_000;
            s.expected_downtime_ms = Some(remaining / 1_000_000);
            s.cpu_throttle_percentage = (pass >= 2).then_some(20 + pass * 10);
            tl.samples.push(s);
        }
        tl.outcome = Some(Outcome {
            status: "cancelled".into(),
            total_time_ms: 8000,
            downtime_ms: None,
            downtime_phases_us: None,
            error_desc: None,
        });
        tl
    }

    /// The text nodes and (stroke colour, point count) of every polyline.
    fn parse(svg: &str) -> (Vec<String>, Vec<(String, usize)>) {
        let inv = crate::inspect_svg(svg).expect("well-formed SVG");
        (inv.texts, inv.polylines)
    }

    fn points_of(lines: &[(String, usize)], rgb: RGBColor) -> usize {
        let hex = format!("#{:02X}{:02X}{:02X}", rgb.0, rgb.1, rgb.2);
        lines
            .iter()
            .filter(|(c, _)| *c == hex)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }

    fn assert_series(svg: &str, n_samples: usize) -> Vec<String> {
        let (texts, lines) = parse(svg);
        for s in SERIES.iter().chain([&EXPECTED_DOWNTIME]) {
            assert!(
                texts.iter().any(|t| t == s.label),
                "legend label {:?} missing",
                s.label
            );
            let pts = points_of(&lines, s.color());
            assert!(
                pts >= n_samples,
                "series {:?}: {pts} points, expected {n_samples}",
                s.label
            );
        }
        texts
    }

    #[test]
    fn converging_timeline_has_every_series_and_marker() {
        let tl = converging();
        let svg = render_svg_string(&tl, "converging").unwrap();
        let texts = assert_series(&svg, tl.samples.len() - 1);
        let has = |s: &str| texts.iter().any(|t| t.contains(s));
        assert!(has("downtime 12 ms"), "{texts:?}");
        assert!(has("predicted switch-over"));
        assert!(has("downtime limit 300 ms"));
        assert!(has(
            "pause 0.1 | sync 0.3 | pages 5.0 | device 0.1 | ack 6.0 ms"
        ));
        assert!(!has("needed bandwidth"));
        assert!(!has(THROTTLE.label), "no throttle, no throttle series");
        let (_, lines) = parse(&svg);
        assert!(points_of(&lines, PREDICTED) >= 2, "predicted marker drawn");
        assert!(points_of(&lines, PASS) >= 2, "pass boundaries drawn");
        // The downtime window is a shaded rectangle.
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert!(doc.descendants().any(|n| n.has_tag_name("rect")
            && n.attribute("fill") == Some("#DC143C")
            && n.attribute("width").and_then(|w| w.parse::<i32>().ok()) >= Some(3)));
    }

    #[test]
    fn non_converging_timeline_says_why() {
        let tl = non_converging();
        let svg = render_svg_string(&tl, "non-converging").unwrap();
        let texts = assert_series(&svg, tl.samples.len());
        let has = |s: &str| texts.iter().any(|t| t.contains(s));
        assert!(has("NOT converging, needs 2.3 GiB/s"), "{texts:?}");
        assert!(has("needed bandwidth 2.3 GiB/s"));
        assert!(has("cancelled: no downtime"));
        assert!(has("did not converge"));
        assert!(!has("predicted switch-over"));
        assert!(has("predicted here: NOT converging"));
        assert!(has("cancelled at 8000 ms"));
        assert!(has("auto-converge throttled up to 90%"));
        assert!(has(THROTTLE.label));
        let (_, lines) = parse(&svg);
        assert!(points_of(&lines, NEEDED_BANDWIDTH) >= 2);
        assert_eq!(points_of(&lines, THROTTLE.color()), tl.samples.len());
    }

    #[test]
    fn a_missing_series_is_noticed() {
        // The check the tests above rely on fails when a series has no samples.
        let mut tl = converging();
        for s in &mut tl.samples {
            s.expected_downtime_ms = None;
        }
        let svg = render_svg_string(&tl, "x").unwrap();
        let (_, lines) = parse(&svg);
        assert_eq!(points_of(&lines, EXPECTED_DOWNTIME.color()), 0);
        assert!(std::panic::catch_unwind(|| assert_series(&svg, 2)).is_err());
    }

    #[test]
    fn long_header_lines_are_clipped() {
        let mut tl = non_converging();
        if let Some(o) = tl.outcome.as_mut() {
            o.status = "failed".into();
            o.error_desc = Some("x".repeat(500));
        }
        let svg = render_svg_string(&tl, "failed").unwrap();
        let (texts, _) = parse(&svg);
        let line = texts
            .iter()
            .find(|t| t.starts_with("failed after"))
            .unwrap();
        assert_eq!(line.chars().count(), HEADER_LINE_CHARS);
        assert!(line.ends_with('…'));
    }

    #[test]
    fn empty_and_odd_text_still_make_valid_svg() {
        let svg = render_svg_string(&Timeline::new(), "a <title> & \"quotes\"").unwrap();
        let (texts, _) = parse(&svg);
        assert!(texts.iter().any(|t| t == "a <title> & \"quotes\""));
        assert!(texts.iter().any(|t| t == "no samples recorded"));
    }

    /// With FERRY_PLOT_DIR set, writes the synthetic plots there to look at.
    #[test]
    fn writes_a_file() {
        if let Ok(dir) = std::env::var("FERRY_PLOT_DIR") {
            let dir = std::path::Path::new(&dir);
            render_svg(
                &converging(),
                "synthetic: converging",
                &dir.join("converging.svg"),
            )
            .unwrap();
            render_svg(
                &non_converging(),
                "synthetic: not converging",
                &dir.join("non_converging.svg"),
            )
            .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("ferry-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.svg");
        render_svg(&converging(), "file", &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_series(&text, 2);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(render_svg(&converging(), "x", &dir.join("no/such/dir.svg")).is_err());
    }
}
