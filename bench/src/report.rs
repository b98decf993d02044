// Copyright 2026 The xe-vf-migration authors
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Aggregates repetitions, prints the markdown table and the targets,
//! writes the JSON and the plot.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::orchestrate::Measurement;
use crate::plot;
use crate::transport::TransportKind;
use crate::worker::Method;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// The repetitions of one (transport, method, size, zero share).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub transport: TransportKind,
    pub method: Method,
    pub vram: u64,
    pub zero_percent: u8,
    pub reps: usize,
    pub skipped: Option<String>,
    /// Median downtime over the repetitions.
    pub downtime_ms: f64,
    pub downtime_min_ms: f64,
    pub downtime_max_ms: f64,
    /// Device bytes over the median downtime.
    pub throughput_mib_s: f64,
    pub wire_bytes: u64,
    pub src_peak_rss: u64,
    pub dst_peak_rss: u64,
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn aggregate(all: &[Measurement]) -> Vec<Row> {
    let mut keys: Vec<(TransportKind, u64, u8, Method)> = Vec::new();
    for m in all {
        let k = (m.transport, m.vram, m.zero_percent, m.method);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.sort_by_key(|k| {
        (
            k.0.name(),
            k.1,
            k.2,
            Method::ALL.iter().position(|m| *m == k.3),
        )
    });
    keys.into_iter()
        .map(|(transport, vram, zero_percent, method)| {
            let reps: Vec<&Measurement> = all
                .iter()
                .filter(|m| {
                    (m.transport, m.vram, m.zero_percent, m.method)
                        == (transport, vram, zero_percent, method)
                })
                .collect();
            let ran: Vec<&&Measurement> = reps.iter().filter(|m| m.skipped.is_none()).collect();
            let downtimes: Vec<f64> = ran.iter().map(|m| m.downtime_ms).collect();
            let downtime_ms = median(downtimes.clone());
            let bytes = reps.first().map(|m| m.device_bytes).unwrap_or(0);
            Row {
                transport,
                method,
                vram,
                zero_percent,
                reps: ran.len(),
                skipped: if ran.is_empty() {
                    reps.first().and_then(|m| m.skipped.clone())
                } else {
                    None
                },
                downtime_ms,
                downtime_min_ms: downtimes.iter().copied().fold(f64::INFINITY, f64::min),
                downtime_max_ms: downtimes.iter().copied().fold(0.0, f64::max),
                throughput_mib_s: if downtime_ms > 0.0 {
                    bytes as f64 / MIB / (downtime_ms / 1e3)
                } else {
                    0.0
                },
                wire_bytes: ran.first().map(|m| m.wire_bytes).unwrap_or(0),
                src_peak_rss: ran.iter().map(|m| m.src_peak_rss).max().unwrap_or(0),
                dst_peak_rss: ran.iter().map(|m| m.dst_peak_rss).max().unwrap_or(0),
                src_cpu_s: median(ran.iter().map(|m| m.src_cpu_s).collect()),
                dst_cpu_s: median(ran.iter().map(|m| m.dst_cpu_s).collect()),
            }
        })
        .collect()
}

fn size_label(vram: u64) -> String {
    if vram >= 1 << 30 {
        format!("{} GiB", vram >> 30)
    } else {
        format!("{} MiB", vram >> 20)
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| link | VRAM | zeros | method | downtime ms (median; min-max) | MiB/s | wire MiB | peak RSS src/dst MiB | CPU src/dst s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let head = format!(
            "| {} | {} | {}% | {} |",
            r.transport.name(),
            size_label(r.vram),
            r.zero_percent,
            r.method.name()
        );
        match &r.skipped {
            Some(why) => {
                let _ = writeln!(s, "{head} {why} | - | - | - | - |");
            }
            None => {
                let _ = writeln!(
                    s,
                    "{head} {:.0} ({:.0}-{:.0}) | {:.0} | {:.0} | {:.1} / {:.1} | {:.2} / {:.2} |",
                    r.downtime_ms,
                    r.downtime_min_ms,
                    r.downtime_max_ms,
                    r.throughput_mib_s,
                    r.wire_bytes as f64 / MIB,
                    r.src_peak_rss as f64 / MIB,
                    r.dst_peak_rss as f64 / MIB,
                    r.src_cpu_s,
                    r.dst_cpu_s
                );
            }
        }
    }
    s
}

/// Least-squares fit of downtime (ms) against VRAM (GiB).
#[derive(Clone, Debug, Serialize)]
pub struct Fit {
    pub transport: TransportKind,
    pub method: Method,
    pub zero_percent: u8,
    pub ms_per_gib: f64,
    pub intercept_ms: f64,
    pub r2: f64,
    /// Downtime per GiB at each size, to see the cost stay flat.
    pub ms_per_gib_at: Vec<(u64, f64)>,
}

pub fn fits(rows: &[Row]) -> Vec<Fit> {
    let mut out = Vec::new();
    let mut keys: Vec<(TransportKind, Method, u8)> = Vec::new();
    for r in rows {
        let k = (r.transport, r.method, r.zero_percent);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (transport, method, zero_percent) in keys {
        let pts: Vec<(f64, f64, u64)> = rows
            .iter()
            .filter(|r| {
                (r.transport, r.method, r.zero_percent) == (transport, method, zero_percent)
                    && r.skipped.is_none()
            })
            .map(|r| (r.vram as f64 / GIB, r.downtime_ms, r.vram))
            .collect();
        if pts.len() < 2 {
            continue;
        }
        let n = pts.len() as f64;
        let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let syy: f64 = pts.iter().map(|p| (p.1 - my).powi(2)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        let r2 = if sxx > 0.0 && syy > 0.0 {
            sxy * sxy / (sxx * syy)
        } else {
            1.0
        };
        out.push(Fit {
            transport,
            method,
            zero_percent,
            ms_per_gib: slope,
            intercept_ms: my - slope * mx,
            r2,
            ms_per_gib_at: pts.iter().map(|p| (p.2, p.1 / p.0)).collect(),
        });
    }
    out
}

/// One target of the issue and whether this run meets it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub value: String,
    pub holds: Option<bool>,
}

fn find(rows: &[Row], t: TransportKind, m: Method, vram: u64, z: u8) -> Option<&Row> {
    rows.iter().find(|r| {
        r.transport == t && r.method == m && r.vram == vram && r.zero_percent == z && r.reps > 0
    })
}

pub fn targets(rows: &[Row], fits: &[Fit]) -> Vec<Target> {
    let mut out = Vec::new();
    let mut transports: Vec<TransportKind> = rows.iter().map(|r| r.transport).collect();
    transports.dedup();
    for t in transports {
        let Some(big) = rows
            .iter()
            .filter(|r| r.transport == t)
            .map(|r| r.vram)
            .max()
        else {
            continue;
        };
        let label = format!("{} {}", t.name(), size_label(big));
        let ours0 = find(rows, t, Method::Ours, big, 0);
        let ratio = |a: Option<&Row>, b: Option<&Row>, f: fn(&Row) -> f64| match (a, b) {
            (Some(a), Some(b)) if f(b) > 0.0 => Some(f(a) / f(b)),
            _ => None,
        };
        // Issue 12: device state alone, 0 % zero pages.
        let r = ratio(ours0, find(rows, t, Method::Qemu, big, 0), |r| {
            r.downtime_ms
        });
        out.push(Target {
            what: format!("{label} 0% zeros: downtime ours <= 1.0 x QEMU style"),
            value: r.map_or("n/a".into(), |r| format!("{r:.2} x")),
            holds: r.map(|r| r <= 1.0),
        });
        for z in [0u8, 90] {
            let r = ratio(
                find(rows, t, Method::Ours, big, z),
                find(rows, t, Method::Limit, big, z),
                |r| r.downtime_ms,
            );
            out.push(Target {
                what: format!("{label} {z}% zeros: downtime ours <= 1.1 x limit"),
                value: r.map_or("n/a".into(), |r| format!("{r:.2} x")),
                holds: r.map(|r| r <= 1.1),
            });
        }
        let ours: Vec<&Row> = rows
            .iter()
            .filter(|r| r.transport == t && r.method == Method::Ours && r.reps > 0)
            .collect();
        let worst = ours
            .iter()
            .map(|r| r.src_peak_rss.max(r.dst_peak_rss))
            .max()
            .unwrap_or(0);
        out.push(Target {
            what: format!("{}: peak RSS of each side of ours <= 64 MiB", t.name()),
            value: format!("max {:.1} MiB", worst as f64 / MIB),
            holds: (!ours.is_empty()).then_some(worst <= 64 << 20),
        });
        for f in fits
            .iter()
            .filter(|f| f.transport == t && f.method == Method::Ours)
        {
            let per: Vec<String> = f
                .ms_per_gib_at
                .iter()
                .map(|(v, c)| format!("{}: {c:.0}", size_label(*v)))
                .collect();
            out.push(Target {
                what: format!(
                    "{}: ours cost linear in VRAM ({}% zeros)",
                    t.name(),
                    f.zero_percent
                ),
                value: format!(
                    "slope {:.0} ms/GiB, intercept {:.0} ms, r2 {:.4}; ms/GiB by size {}",
                    f.ms_per_gib,
                    f.intercept_ms,
                    f.r2,
                    per.join(", ")
                ),
                holds: Some(f.r2 >= 0.99),
            });
        }
    }
    out
}

#[derive(Serialize)]
struct Output<'a> {
    elapsed_s: f64,
    rows: &'a [Row],
    fits: &'a [Fit],
    targets: &'a [Target],
    measurements: &'a [Measurement],
}

pub fn write(all: &[Measurement], out_dir: &Path, elapsed: Duration) -> Result<()> {
    let rows = aggregate(all);
    let fits = fits(&rows);
    let targets = targets(&rows, &fits);
    print(&rows, &fits, &targets);
    let json_path = out_dir.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&Output {
            elapsed_s: elapsed.as_secs_f64(),
            rows: &rows,
            fits: &fits,
            targets: &targets,
            measurements: all,
        })?,
    )?;
    let png = out_dir.join("downtime.png");
    match plot::downtime(&rows, &png) {
        Ok(()) => println!("\nwrote {} and {}", json_path.display(), png.display()),
        Err(e) => println!("\nwrote {}; plot failed: {e:#}", json_path.display()),
    }
    println!("bench run time {:.0} s", elapsed.as_secs_f64());
    Ok(())
}

#[derive(Deserialize)]
struct SavedRows {
    elapsed_s: f64,
    rows: Vec<Row>,
}

/// Prints the table and targets again from the `results.json` of earlier
/// runs (several merge into one report) and redraws the plot.
pub fn rerender(inputs: &[std::path::PathBuf], png: &Path) -> Result<()> {
    let mut rows = Vec::new();
    for input in inputs {
        let bytes = std::fs::read(input)?;
        let saved: SavedRows = serde_json::from_slice(&bytes)?;
        println!(
            "{}: {} rows, bench run time {:.0} s",
            input.display(),
            saved.rows.len(),
            saved.elapsed_s
        );
        rows.extend(saved.rows);
    }
    let fits = fits(&rows);
    let targets = targets(&rows, &fits);
    print(&rows, &fits, &targets);
    plot::downtime(&rows, png)?;
    println!("\nwrote {}", png.display());
    Ok(())
}

fn print(rows: &[Row], fits: &[Fit], targets: &[Target]) {
    println!("{}", table(rows));
    println!("| target | value | holds |");
    println!("|---|---|---|");
    for t in targets {
        let holds = match t.holds {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "n/a",
        };
        println!("| {} | {} | {holds} |", t.what, t.value);
    }
    println!();
    for f in fits {
        println!(
            "slope {:<5} {:<12} {:>3}% zeros: {:>7.1} ms/GiB (intercept {:.1} ms, r2 {:.4})",
            f.transport.name(),
            f.method.name(),
            f.zero_percent,
            f.ms_per_gib,
            f.intercept_ms,
            f.r2
        );
    }
}
