//! docs/benchmarks.md and its chart, from one run's samples.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use super::{
    cells::{Results, Sample, Subject, Workload},
    stats::{Spread, best_peer, median_of, metric, peak_rss_mib, ratio, spread},
};

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "-".to_owned()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_spread(s: Spread) -> String {
    format!(
        "{} ({}-{})",
        fmt_num(s.median),
        fmt_num(s.min),
        fmt_num(s.max)
    )
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"))
}

/// Writes the markdown report and `<out>.svg` beside it.
pub(crate) fn write(
    out: &Path,
    results: &Results,
    subjects: &[Subject],
    command: &str,
) -> Result<()> {
    let chart = out.with_extension("svg");
    let mut md = String::new();
    header(&mut md, command, &chart)?;
    for w in Workload::all() {
        if w == Workload::Mixed {
            mixed_table(&mut md, results, subjects)?;
        } else {
            table(&mut md, results, subjects, w)?;
        }
    }
    super::targets::write(&mut md, results)?;
    md.push_str(include_str!("why_not.md"));
    std::fs::write(out, md).with_context(|| format!("cannot write {}", out.display()))?;
    draw_chart(&chart, results, subjects)
}

fn header(md: &mut String, command: &str, chart: &Path) -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Written by `{command}` (in `xtask/src/bench/`). Machine: {cores} cores, {cpu}, \
         Linux {kernel}.\n"
    )?;
    writeln!(
        md,
        "Each repeat runs in a fresh network namespace on loopback (so no repeat inherits \
         another's TIME_WAIT sockets): the load generator and its backend (`bench/`, one \
         process), and the subject between them. `direct` is the \
         generator talking to the backend with no proxy: the limit of this machine. Each \
         cell is repeated; the table gives the median and (min-max). Ratios are between \
         medians of this one run. CPU s/GB is the whole machine's busy time (user, system, \
         softirq; from /proc/stat) per GB moved through the subject, generator and backend \
         included, so in-kernel forwarding is counted; the UDP rows also give it per \
         round trip (one datagram each way through the subject), in µs, and \
         the same for the run's own processes only (generator, backend and subject, \
         from /proc/<pid>/stat: other work on a shared machine is not in it, softirq work \
         charged to them is). Peak RSS is the subject's VmHWM during \
         the load (reset just before it, so start-up is not counted). On \
         2 cores the generator, the backend and the proxy share the CPUs: a proxy that \
         costs more CPU leaves less to the generator, which is part of what is measured.\n"
    )?;
    let file = chart
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("benchmarks.svg");
    writeln!(
        md,
        "![headline metric relative to direct; latency percentiles of request/response, alone \
         and beside floods]({file})\n"
    )?;
    Ok(())
}

fn table(md: &mut String, results: &Results, subjects: &[Subject], w: Workload) -> Result<()> {
    if !subjects.iter().any(|&s| results.contains_key(&(w, s))) {
        return Ok(()); // not in this (partial) run
    }
    let (key, unit) = w.headline();
    writeln!(md, "## {}\n", w.name())?;
    // UDP rows also give CPU per round trip: at 64 B a gigabyte is
    // eight million round trips, and the cost is per datagram.
    let per_round_trip = w.is_udp();
    writeln!(
        md,
        "| subject | {unit} | vs direct | vs plain | vs best peer | other medians | CPU s/GB |{} peak RSS |",
        if per_round_trip {
            " CPU µs/round trip | own CPU µs/round trip |"
        } else {
            ""
        }
    )?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|{}---|",
        if per_round_trip { "---|---|" } else { "" }
    )?;
    let best = best_peer(results, w);
    for &s in subjects {
        let Some(samples) = results.get(&(w, s)) else {
            continue;
        };
        let head = median_of(results, w, s, key);
        let others: Vec<String> = samples[0]
            .metrics
            .keys()
            .filter(|k| !matches!(k.as_str(), "bytes" | "seconds") && *k != key)
            .map(|k| format!("{k} {}", fmt_num(spread(samples, metric(k)).median)))
            .collect();
        let rss = spread(samples, peak_rss_mib);
        let cpu_round_trip = if per_round_trip {
            format!(
                " {} | {} |",
                fmt_spread(spread(samples, Sample::cpu_us_per_round_trip)),
                fmt_spread(spread(samples, Sample::own_cpu_us_per_round_trip))
            )
        } else {
            String::new()
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |{cpu_round_trip} {} |",
            s.name(),
            fmt_spread(spread(samples, metric(key))),
            fmt_ratio(ratio(head, median_of(results, w, Subject::Direct, key))),
            fmt_ratio(ratio(head, median_of(results, w, Subject::Plain, key))),
            best.map_or_else(
                || "-".to_owned(),
                |(peer, median)| format!(
                    "{} ({})",
                    fmt_ratio(ratio(head, Some(median))),
                    peer.name()
                )
            ),
            others.join(", "),
            fmt_spread(spread(samples, Sample::cpu_per_gb)),
            fmt_rss(rss.median),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The mixed row: the interactive connections' rate and latency, and
/// beside them what the floods moved, each against direct.
fn mixed_table(md: &mut String, results: &Results, subjects: &[Subject]) -> Result<()> {
    let w = Workload::Mixed;
    if !subjects.iter().any(|&s| results.contains_key(&(w, s))) {
        return Ok(());
    }
    writeln!(md, "## {}\n", w.name())?;
    writeln!(
        md,
        "8 interactive connections each send 64 B and wait for the echo (on blocking \
         threads of the generator), while 8 flood connections write and read 64 KiB chunks \
         without pause, all through the subject to one echo backend (on a runtime of its \
         own). Latency is per interactive request; the floods' Mbit/s is what came back to \
         them (echoed), their upload beside it.\n"
    )?;
    writeln!(
        md,
        "| subject | interactive requests/s | vs direct | vs best peer | p50 µs | p99 µs | \
         p99 vs direct | p99.9 µs | floods Mbit/s echoed | vs direct | vs plain | \
         floods Mbit/s up | CPU s/GB | peak RSS |"
    )?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    let best = best_peer(results, w);
    let median = |s, key| median_of(results, w, s, key);
    for &s in subjects {
        let Some(samples) = results.get(&(w, s)) else {
            continue;
        };
        let vs = |key, other| fmt_ratio(ratio(median(s, key), median(other, key)));
        let rss = spread(samples, peak_rss_mib);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.name(),
            fmt_spread(spread(samples, metric("requests_s"))),
            vs("requests_s", Subject::Direct),
            best.map_or_else(
                || "-".to_owned(),
                |(peer, best)| format!(
                    "{} ({})",
                    fmt_ratio(ratio(median(s, "requests_s"), Some(best))),
                    peer.name()
                )
            ),
            fmt_num(spread(samples, metric("p50_us")).median),
            fmt_spread(spread(samples, metric("p99_us"))),
            vs("p99_us", Subject::Direct),
            fmt_num(spread(samples, metric("p999_us")).median),
            fmt_spread(spread(samples, metric("flood_down_mbit_s"))),
            vs("flood_down_mbit_s", Subject::Direct),
            vs("flood_down_mbit_s", Subject::Plain),
            fmt_num(spread(samples, metric("flood_up_mbit_s")).median),
            fmt_spread(spread(samples, Sample::cpu_per_gb)),
            fmt_rss(rss.median),
        )?;
    }
    writeln!(md)?;
    // A saturated connection that never catches up stays in userspace:
    // whether the floods ran on the kernel path is part of the result.
    if let Some(armed) = median(Subject::Ebpf, "connections_armed") {
        writeln!(
            md,
            "mmproxy ebpf armed {armed:.0} of the 16 connections (the kernel path; median \
             of repeats).\n"
        )?;
    }
    Ok(())
}

fn draw_chart(path: &Path, results: &Results, subjects: &[Subject]) -> Result<()> {
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
    ];
    let workloads = Workload::all();
    let groups = workloads.len();
    let per_group = subjects.len();
    let root = SVGBackend::new(path, (1000, 1120)).into_drawing_area();
    root.fill(&WHITE).context("chart")?;
    let (root, lower) = root.split_vertically(480);
    draw_latency_panels(&lower, results, subjects)?;
    #[allow(clippy::cast_precision_loss)] // a handful of groups
    let x_max = groups as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Headline metric relative to direct (median of repeats)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..1.6f64)
        .context("chart")?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&|&x| group_label(x, groups, |i| short_name(workloads[i]).to_owned()))
        .y_desc("x direct")
        .draw()
        .context("chart")?;
    // Bars cut at the top of the axis, with their ratio: written at the
    // top so a cut bar is not read as 1.6x, on three staggered lines so
    // that neighbours' labels do not overlap.
    let mut cut = Vec::new();
    for (si, &s) in subjects.iter().enumerate() {
        let color = colors[si % colors.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = workloads
            .iter()
            .enumerate()
            .filter_map(|(wi, &w)| {
                let key = w.headline().0;
                let r = ratio(
                    median_of(results, w, s, key),
                    median_of(results, w, Subject::Direct, key),
                )?;
                #[allow(clippy::cast_precision_loss)]
                let x0 = wi as f64 + 0.1 + 0.8 * si as f64 / per_group as f64;
                #[allow(clippy::cast_precision_loss)]
                let x1 = x0 + 0.8 / per_group as f64;
                if r > 1.6 {
                    #[allow(clippy::cast_precision_loss)] // 0, 1 or 2
                    let line = (si % 3) as f64;
                    cut.push((x0, 1.58 - 0.08 * line, r));
                }
                Some(Rectangle::new(
                    [(x0, 0.0), (x1, r.min(1.6))],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .context("chart")?
            .label(s.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .draw_series(
            cut.into_iter()
                .map(|(x, y, r)| Text::new(format!("{r:.1}x"), (x, y), ("sans-serif", 11))),
        )
        .context("chart")?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .context("chart")?;
    root.present().context("chart")?;
    Ok(())
}

/// Request/response latency alone, and beside floods (the mixed row),
/// one panel each.
fn draw_latency_panels(lower: &Area<'_>, results: &Results, subjects: &[Subject]) -> Result<()> {
    // The two latency panels share one axis, so the cost of the floods is
    // read off bar heights, and one key right of them: inside a panel it
    // hid the tallest bars.
    let (panels, key) = lower.split_horizontally(910);
    let (alone, beside_floods) = panels.split_vertically(320);
    // Both panels give every subject of either a slot, the same one, so
    // a subject's bars sit above each other.
    let latency_subjects: Vec<Subject> = subjects
        .iter()
        .copied()
        .filter(|&s| {
            [Workload::RequestResponse, Workload::Mixed]
                .iter()
                .any(|&w| results.contains_key(&(w, s)))
        })
        .collect();
    let y_max = latency_axis_top(
        [Workload::RequestResponse, Workload::Mixed]
            .iter()
            .flat_map(|&w| {
                subjects
                    .iter()
                    .filter_map(move |&s| median_of(results, w, s, "p999_us"))
            }),
    );
    draw_latency(
        &alone,
        results,
        &latency_subjects,
        (Workload::RequestResponse, y_max),
        "Request/response latency, µs (median of repeats, log scale)",
    )?;
    draw_latency(
        &beside_floods,
        results,
        &latency_subjects,
        (Workload::Mixed, y_max),
        "Mixed: interactive latency beside 8 floods, µs (median of repeats, log scale)",
    )?;
    draw_percentile_key(&key)?;
    Ok(())
}

/// Bar groups sit at `0..groups` on the x axis; each is named at its
/// middle, every other tick stays blank.
fn group_label(x: f64, groups: usize, name: impl Fn(usize) -> String) -> String {
    let i = x.floor();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let idx = i as usize;
    if (x - i - 0.5).abs() < 1e-6 && idx < groups {
        name(idx)
    } else {
        String::new()
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The latency panels' bars: metric, key label, color.
const PERCENTILES: [(&str, &str, RGBColor); 3] = [
    ("p50_us", "p50", RGBColor(158, 202, 225)),
    ("p99_us", "p99", RGBColor(49, 130, 189)),
    ("p999_us", "p99.9", RGBColor(8, 48, 107)),
];

/// Latency percentiles of a request/response workload (`rr` alone, or
/// the mixed row's interactive connections) per subject, on a log axis
/// from 10 µs to `y_max`: the tail is where the subjects differ most. A
/// subject the workload did not run on keeps its slot, marked so.
fn draw_latency(
    area: &Area<'_>,
    results: &Results,
    shown: &[Subject],
    (workload, y_max): (Workload, f64),
    caption: &str,
) -> Result<()> {
    let label = |i: usize| {
        let s = shown[i];
        if results.contains_key(&(workload, s)) {
            s.name().to_owned()
        } else {
            // The subject's name is in the same slot of the panel above.
            "(not run)".to_owned()
        }
    };
    #[allow(clippy::cast_precision_loss)] // a handful of subjects
    let x_max = shown.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max.max(1.0), (10f64..y_max).log_scale())
        .context("chart")?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(shown.len() * 2 + 1)
        .x_label_formatter(&|&x| group_label(x, shown.len(), label))
        .y_label_formatter(&|us| format!("{us:.0}"))
        .y_desc("µs")
        .draw()
        .context("chart")?;
    for (pi, &(key, _, color)) in PERCENTILES.iter().enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = shown
            .iter()
            .enumerate()
            .filter_map(|(si, &s)| {
                let us = median_of(results, workload, s, key)?;
                #[allow(clippy::cast_precision_loss)]
                let x0 = si as f64 + 0.15 + 0.7 * pi as f64 / 3.0;
                Some(Rectangle::new(
                    [(x0, 10.0), (x0 + 0.7 / 3.0, us.clamp(10.0, y_max))],
                    color.filled(),
                ))
            })
            .collect();
        chart.draw_series(bars).context("chart")?;
    }
    Ok(())
}

/// The percentiles' colors, once for both latency panels.
fn draw_percentile_key(area: &Area<'_>) -> Result<()> {
    for (y, &(_, label, color)) in (60..).step_by(22).zip(PERCENTILES.iter()) {
        area.draw(&Rectangle::new([(8, y), (20, y + 12)], color.filled()))
            .context("chart")?;
        area.draw(&Text::new(label, (26, y), ("sans-serif", 14)))
            .context("chart")?;
    }
    Ok(())
}

/// The top of the latency panels' log axis: 20 ms, or the next power of
/// ten above the highest value shown, so no bar is cut off.
fn latency_axis_top(values: impl Iterator<Item = f64>) -> f64 {
    let highest = values.fold(0.0, f64::max);
    if highest < 20_000.0 {
        20_000.0
    } else {
        10f64.powf((highest * 1.01).log10().ceil())
    }
}

fn short_name(w: Workload) -> &'static str {
    match w {
        Workload::Flood => "flood",
        Workload::Bulk => "bulk",
        Workload::RequestResponse => "req/resp",
        Workload::Mixed => "mixed",
        Workload::ConnectionsPerSecond => "conn/s",
        Workload::ConnectionsEphemeralPort => "conn/s eph.",
        Workload::Udp64 => "UDP 64 B",
        Workload::Udp1400 => "UDP 1400 B",
    }
}

/// Peak RSS in MiB, or "-" where there is no subject process (direct).
fn fmt_rss(mib: f64) -> String {
    if mib.is_nan() {
        "-".to_owned()
    } else {
        format!("{} MiB", fmt_num(mib))
    }
}

#[cfg(test)]
mod tests {
    use super::latency_axis_top;

    #[test]
    fn latency_axis_fits_the_highest_bar() {
        assert!((latency_axis_top([300.0, 900.0].into_iter()) - 20_000.0).abs() < 1e-9);
        assert!((latency_axis_top(std::iter::empty()) - 20_000.0).abs() < 1e-9);
        assert!((latency_axis_top([35_000.0].into_iter()) - 100_000.0).abs() < 1e-6);
        assert!((latency_axis_top([100_000.0].into_iter()) - 1_000_000.0).abs() < 1e-3);
    }
}
