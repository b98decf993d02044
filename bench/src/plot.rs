// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Downtime against VRAM size, one line per method, one panel per
//! (link, zero share); a panel with a single size shows one bar per
//! method instead, labelled with its downtime.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;

use crate::report::Row;
use crate::transport::TransportKind;
use crate::worker::Method;

/// Fonts tried in order; ab_glyph needs one file, no system font stack.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // The plot registry wants 'static bytes; one font per run.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| anyhow!("{path} is not a usable font"));
        }
    }
    bail!("no DejaVuSans.ttf found for the plot labels")
}

fn colour(m: Method) -> RGBColor {
    match m {
        Method::Limit => RGBColor(90, 90, 90),
        Method::UpstreamCh => RGBColor(214, 39, 40),
        Method::Qemu => RGBColor(31, 119, 180),
        Method::Ours => RGBColor(44, 160, 44),
    }
}

pub fn downtime(rows: &[Row], path: &Path) -> Result<()> {
    register_font()?;
    let mut transports: Vec<TransportKind> = rows.iter().map(|r| r.transport).collect();
    transports.dedup();
    let mut zeros: Vec<u8> = rows.iter().map(|r| r.zero_percent).collect();
    zeros.sort_unstable();
    zeros.dedup();
    if zeros.is_empty() {
        bail!("nothing to plot");
    }
    let (w, h) = (520 * zeros.len() as u32, 460 * transports.len() as u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let panels = root.split_evenly((transports.len(), zeros.len()));
    let max_gib = rows
        .iter()
        .map(|r| r.vram as f64 / (1u64 << 30) as f64)
        .fold(0.0, f64::max)
        * 1.05;
    for (i, panel) in panels.iter().enumerate() {
        let t = transports[i / zeros.len()];
        let z = zeros[i % zeros.len()];
        let these: Vec<&Row> = rows
            .iter()
            .filter(|r| r.transport == t && r.zero_percent == z && r.reps > 0)
            .collect();
        let caption = format!("{} link, {z}% zero pages", t.name());
        let mut sizes: Vec<u64> = these.iter().map(|r| r.vram).collect();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.len() == 1 {
            bar_panel(panel, &caption, sizes[0], &these)?;
        } else {
            line_panel(panel, &caption, max_gib, &these)?;
        }
    }
    root.present()
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

type Panel<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn line_panel(panel: &Panel, caption: &str, max_gib: f64, these: &[&Row]) -> Result<()> {
    let max_s = these
        .iter()
        .map(|r| r.downtime_ms / 1e3)
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_gib.max(0.1), 0.0..max_s.max(0.01))
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("VRAM (GiB)")
        .y_desc("downtime (s)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for m in Method::ALL {
        let mut pts: Vec<(f64, f64)> = these
            .iter()
            .filter(|r| r.method == m)
            .map(|r| (r.vram as f64 / (1u64 << 30) as f64, r.downtime_ms / 1e3))
            .collect();
        if pts.is_empty() {
            continue;
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = colour(m);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(m.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn bar_panel(panel: &Panel, caption: &str, vram: u64, these: &[&Row]) -> Result<()> {
    let bars: Vec<(usize, Method, f64)> = Method::ALL
        .iter()
        .filter_map(|m| these.iter().find(|r| r.method == *m))
        .enumerate()
        .map(|(i, r)| (i, r.method, r.downtime_ms / 1e3))
        .collect();
    let max_s = bars.iter().map(|b| b.2).fold(0.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(panel)
        .caption(format!("{caption}, {} MiB", vram >> 20), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..bars.len().max(1) as f64, 0.0..max_s.max(0.01))
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("downtime (s)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for (i, m, secs) in bars {
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, secs)],
                colour(m).filled(),
            )))
            .map_err(|e| anyhow!("{e:?}"))?;
        for (text, lift) in [
            (m.name().to_string(), 0.13),
            (format!("{:.0} ms", secs * 1e3), 0.08),
        ] {
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (x + 0.17, secs + max_s * lift),
                    ("sans-serif", 15),
                )))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
    }
    Ok(())
}

/// Whole-VM downtime against guest RAM, one line per method, one panel
/// per (link, VF count).
pub fn vm_downtime(rows: &[crate::vm::VmRow], path: &Path) -> Result<()> {
    register_font()?;
    let mut panels_of: Vec<(String, usize, u64)> = rows
        .iter()
        .filter(|r| r.reps > 0)
        .map(|r| (r.transport.clone(), r.vfs, r.vram))
        .collect();
    panels_of.sort();
    panels_of.dedup();
    if panels_of.is_empty() {
        bail!("nothing to plot");
    }
    let cols = panels_of.len().min(3);
    let lines = panels_of.len().div_ceil(cols);
    let root =
        BitMapBackend::new(path, (520 * cols as u32, 460 * lines as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let panels = root.split_evenly((lines, cols));
    let methods = [
        ("limit", colour(Method::Limit)),
        ("qemu", colour(Method::Qemu)),
        ("ours", colour(Method::Ours)),
        ("ours-vram", RGBColor(148, 103, 189)),
    ];
    for ((t, vfs, vram), panel) in panels_of.iter().zip(panels.iter()) {
        let these: Vec<&crate::vm::VmRow> = rows
            .iter()
            .filter(|r| &r.transport == t && r.vfs == *vfs && r.vram == *vram && r.reps > 0)
            .collect();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let max_x = these.iter().map(|r| gib(r.ram)).fold(0.0, f64::max) * 1.15;
        let max_y = these
            .iter()
            .map(|r| r.downtime_ms / 1e3)
            .fold(0.0, f64::max)
            * 1.1;
        let caption = format!("{t}, {vfs} VF x {} MiB VRAM", vram >> 20);
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..max_x.max(0.1), 0.0..max_y.max(0.01))
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("guest RAM (GiB)")
            .y_desc("downtime (s)")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        for (name, c) in methods {
            let mut pts: Vec<(f64, f64)> = these
                .iter()
                .filter(|r| r.method == name)
                .map(|r| (gib(r.ram), r.downtime_ms / 1e3))
                .collect();
            if pts.is_empty() {
                continue;
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    root.present()
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
