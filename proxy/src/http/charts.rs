//! Inline SVG for the status page: line charts (one line per pool) and the
//! topology timeline. Plain functions of the data, no script and no
//! external asset, so the page draws the same in any browser or in none.
//!
//! Charts have a fixed time axis of `slots` columns (the latest sample on
//! the right); a value is drawn at its column, and a missing or unknown
//! value breaks the line rather than being made up.

use super::html;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

/// Line colours, in legend order (none is the pools table's header blue,
/// which the screenshot test looks for).
pub const PALETTE: [&str; 8] = [
    "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22",
];
pub const LEADER: &str = "#6a3d9a";
pub const REPLICA: &str = "#a6cee3";
pub const NO_LEADER: &str = "#fb9a99";
pub const FAILOVER: &str = "#e31a1c";

const WIDTH: f64 = 600.0;
const LEFT: f64 = 64.0;
/// The timeline's left margin: room for member names.
const TIMELINE_LEFT: f64 = 140.0;
/// Characters of a member name shown (all of it in the tooltip).
const NAME_CHARS: usize = 20;
const RIGHT: f64 = 12.0;
const TOP: f64 = 26.0;
const PLOT_HEIGHT: f64 = 110.0;
const LEGEND_ROW: f64 = 16.0;
const TIMELINE_ROW: f64 = 18.0;
/// Members drawn in the timeline at most.
const MAX_ROWS: usize = 10;

/// Width of a plot right of the `left` margin.
fn plot_width(left: f64) -> f64 {
    WIDTH - left - RIGHT
}

/// One pool's values: (column, value), oldest first; None where the value
/// is unknown (e.g. no query finished, so no latency).
#[derive(Debug, Clone)]
pub struct Line<'a> {
    pub label: &'a str,
    pub points: Vec<(usize, Option<f64>)>,
}

#[derive(Debug)]
pub struct LineChart<'a> {
    /// The `<svg>` element's id.
    pub id: &'a str,
    /// Shown above the plot and as the SVG's accessible title.
    pub title: &'a str,
    /// Shown instead of the plot with fewer than two known values.
    pub empty: &'a str,
    /// Columns of the time axis (at least 2).
    pub slots: usize,
    pub lines: &'a [Line<'a>],
    /// Pools left out of the chart (named in the legend as a count).
    pub hidden: usize,
}

/// The smallest of 1, 2, 2.5 or 5 times a power of ten at or above `v`
/// (1 for nothing to show): the top of the value axis.
pub fn nice_max(v: f64) -> f64 {
    if !v.is_finite() || v <= 0.0 {
        return 1.0;
    }
    let unit = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * unit)
        .find(|top| *top >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * unit)
}

/// An axis label: no more digits than the magnitude needs.
pub fn number(v: f64) -> String {
    let s = if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// x of column `slot` on a time axis of `slots` columns.
fn x_of(slot: usize, slots: usize) -> f64 {
    LEFT + slot as f64 * plot_width(LEFT) / (slots.max(2) - 1) as f64
}

/// The `d` attribute of a line's path, and the points standing alone
/// (neighbours unknown), which a path cannot show.
pub fn path(points: &[(usize, Option<f64>)], slots: usize, top: f64) -> (String, Vec<(f64, f64)>) {
    let y_of = |v: f64| TOP + PLOT_HEIGHT - (v / top).clamp(0.0, 1.0) * PLOT_HEIGHT;
    let mut d = String::new();
    let mut alone = Vec::new();
    // The current run of adjacent known values.
    let mut run: Vec<(f64, f64)> = Vec::new();
    let mut flush = |run: &mut Vec<(f64, f64)>| {
        match run.as_slice() {
            [] => {}
            [p] => alone.push(*p),
            [first, rest @ ..] => {
                let _ = write!(
                    d,
                    "{}M{:.1} {:.1}",
                    if d.is_empty() { "" } else { " " },
                    first.0,
                    first.1
                );
                for (x, y) in rest {
                    let _ = write!(d, " L{x:.1} {y:.1}");
                }
            }
        }
        run.clear();
    };
    let mut previous: Option<usize> = None;
    for &(slot, v) in points {
        let adjacent = previous.is_some_and(|p| p + 1 == slot);
        match v {
            Some(v) if v.is_finite() => {
                if !adjacent {
                    flush(&mut run);
                }
                run.push((x_of(slot, slots), y_of(v)));
            }
            _ => flush(&mut run),
        }
        previous = Some(slot);
    }
    flush(&mut run);
    (d, alone)
}

/// Opens an `<svg>` of `height` with its accessible title and the visible
/// one, over a plot starting at `left`.
fn open(out: &mut String, id: &str, title: &str, height: f64, left: f64) {
    let id = html(id);
    let title = html(title);
    let _ = write!(
        out,
        "<svg id=\"{id}\" class=\"chart\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" \
         role=\"img\" aria-labelledby=\"{id}-title\"><title id=\"{id}-title\">{title}</title>\
         <text x=\"{left}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{title}</text>"
    );
}

/// The time axis labels under a plot from `left` whose bottom is at
/// `bottom`.
fn time_axis(out: &mut String, bottom: f64, left: f64) {
    let _ = write!(
        out,
        "<text x=\"{left}\" y=\"{:.0}\" font-size=\"11\" fill=\"#555\">15 min ago</text>\
         <text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" fill=\"#555\" text-anchor=\"end\">now</text>",
        bottom + 14.0,
        left + plot_width(left),
        bottom + 14.0
    );
}

/// A line chart, one line per pool, value axis from 0.
pub fn line_chart(out: &mut String, c: &LineChart<'_>) {
    let legend_rows = c.lines.len() + usize::from(c.hidden > 0);
    let bottom = TOP + PLOT_HEIGHT;
    let height = bottom + 24.0 + legend_rows as f64 * LEGEND_ROW;
    open(out, c.id, c.title, height, LEFT);
    let _ = write!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{PLOT_HEIGHT}\" fill=\"#fff\" stroke=\"#999\"/>",
        plot_width(LEFT)
    );
    time_axis(out, bottom, LEFT);
    let known = |l: &Line| l.points.iter().filter(|(_, v)| v.is_some_and(f64::is_finite)).count();
    if c.lines.iter().map(known).sum::<usize>() < 2 {
        let _ = write!(
            out,
            "<text class=\"empty\" x=\"{:.0}\" y=\"{:.0}\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">{}</text></svg>",
            LEFT + plot_width(LEFT) / 2.0,
            TOP + PLOT_HEIGHT / 2.0,
            html(c.empty)
        );
        return;
    }
    let max = c
        .lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|(_, v)| *v))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let top = nice_max(max);
    for (frac, label) in [(0.0, number(0.0)), (0.5, number(top / 2.0)), (1.0, number(top))] {
        let y = TOP + PLOT_HEIGHT - frac * PLOT_HEIGHT;
        if frac > 0.0 {
            let _ = write!(
                out,
                "<line x1=\"{LEFT}\" x2=\"{:.0}\" y1=\"{y:.0}\" y2=\"{y:.0}\" stroke=\"#ddd\"/>",
                LEFT + plot_width(LEFT)
            );
        }
        let _ = write!(
            out,
            "<text class=\"tick\" x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\">{label}</text>",
            LEFT - 6.0,
            y + 4.0
        );
    }
    for (i, line) in c.lines.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let label = html(line.label);
        let (d, alone) = path(&line.points, c.slots, top);
        let _ = write!(out, "<g class=\"series\" data-label=\"{label}\"><title>{label}</title>");
        if !d.is_empty() {
            let _ = write!(
                out,
                "<path d=\"{d}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" stroke-linejoin=\"round\"/>"
            );
        }
        for (x, y) in alone {
            let _ = write!(out, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"{colour}\"/>");
        }
        let y = bottom + 24.0 + i as f64 * LEGEND_ROW;
        let _ = write!(
            out,
            "</g><rect x=\"{LEFT}\" y=\"{:.0}\" width=\"12\" height=\"4\" fill=\"{colour}\"/>\
             <text x=\"{:.0}\" y=\"{y:.0}\" font-size=\"11\">{label}</text>",
            y - 5.0,
            LEFT + 18.0
        );
    }
    if c.hidden > 0 {
        let _ = write!(
            out,
            "<text x=\"{LEFT}\" y=\"{:.0}\" font-size=\"11\" fill=\"#555\">and {} more pools (not drawn)</text>",
            bottom + 24.0 + c.lines.len() as f64 * LEGEND_ROW,
            c.hidden
        );
    }
    out.push_str("</svg>");
}

/// The topology at one sample, for the timeline.
#[derive(Debug, Clone)]
pub struct Moment<'a> {
    pub slot: usize,
    pub at: SystemTime,
    pub leader: Option<&'a str>,
    pub replicas: &'a [Arc<str>],
    /// The leader changed since the previous sample.
    pub failover: bool,
}

/// "HH:MM:SS UTC".
fn clock(t: SystemTime) -> String {
    let s = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s % 3600 / 60, s % 60)
}

/// What a member was at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Leader,
    Replica,
    Absent,
}

/// `name`, cut to `max` characters (with an ellipsis) for a row label.
fn short(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_owned()
    } else {
        let mut s: String = name.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// The leader/replica timeline: a row per member (leader, serving reads,
/// neither), periods without a leader shaded, failovers marked.
pub fn timeline(out: &mut String, id: &str, slots: usize, moments: &[Moment<'_>]) {
    let mut members: Vec<&str> = Vec::new();
    for m in moments {
        for name in m.leader.into_iter().chain(m.replicas.iter().map(|r| &**r)) {
            if !members.contains(&name) {
                members.push(name);
            }
        }
    }
    let hidden = members.len().saturating_sub(MAX_ROWS);
    members.truncate(MAX_ROWS);
    let rows = members.len().max(1) as f64;
    let bottom = TOP + 8.0 + rows * TIMELINE_ROW;
    let legend = bottom + 30.0;
    let height = legend + 8.0;
    let left = TIMELINE_LEFT;
    open(out, id, "Leader and replicas serving reads", height, left);
    time_axis(out, bottom, left);
    let _ = write!(
        out,
        "<rect x=\"{left}\" y=\"{TOP}\" width=\"{}\" height=\"{:.0}\" fill=\"#fff\" stroke=\"#999\"/>",
        plot_width(left),
        bottom - TOP
    );
    if moments.len() < 2 {
        let _ = write!(
            out,
            "<text class=\"empty\" x=\"{:.0}\" y=\"{:.0}\" font-size=\"12\" fill=\"#555\" text-anchor=\"middle\">\
             collecting: the timeline needs two samples (one every 5 s)</text></svg>",
            left + plot_width(left) / 2.0,
            TOP + (bottom - TOP) / 2.0
        );
        return;
    }
    let col = plot_width(left) / slots.max(1) as f64;
    let x = |slot: usize| left + slot as f64 * col;
    // Runs of adjacent samples with the same value: (first, last, value).
    fn runs<T: PartialEq + Copy>(moments: &[Moment<'_>], f: impl Fn(&Moment<'_>) -> T) -> Vec<(usize, usize, T)> {
        let mut v: Vec<(usize, usize, T)> = Vec::new();
        for m in moments {
            let now = f(m);
            match v.last_mut() {
                Some((_, last, value)) if *last + 1 == m.slot && *value == now => *last = m.slot,
                _ => v.push((m.slot, m.slot, now)),
            }
        }
        v
    }
    let when = |slot: usize| {
        moments
            .iter()
            .find(|m| m.slot == slot)
            .map_or_else(String::new, |m| clock(m.at))
    };
    for (first, last, none) in runs(moments, |m| m.leader.is_none()) {
        if none {
            let _ = write!(
                out,
                "<rect class=\"no-leader\" x=\"{:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{NO_LEADER}\">\
                 <title>no leader from {} to {}: writes held</title></rect>",
                x(first),
                (last + 1 - first) as f64 * col,
                bottom - TOP,
                when(first),
                when(last)
            );
        }
    }
    for (row, name) in members.iter().enumerate() {
        let y = TOP + 4.0 + row as f64 * TIMELINE_ROW;
        let label = html(name);
        let _ = write!(
            out,
            "<text x=\"{:.0}\" y=\"{:.0}\" font-size=\"11\" text-anchor=\"end\"><title>{label}</title>{}</text>",
            left - 6.0,
            y + 11.0,
            html(&short(name, NAME_CHARS))
        );
        let role = |m: &Moment<'_>| {
            if m.leader == Some(*name) {
                Role::Leader
            } else if m.replicas.iter().any(|r| **r == **name) {
                Role::Replica
            } else {
                Role::Absent
            }
        };
        for (first, last, r) in runs(moments, role) {
            let (colour, what) = match r {
                Role::Leader => (LEADER, "leader"),
                Role::Replica => (REPLICA, "serving reads"),
                Role::Absent => continue,
            };
            let _ = write!(
                out,
                "<rect class=\"{}\" x=\"{:.1}\" y=\"{y:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{colour}\">\
                 <title>{label}: {what} from {} to {}</title></rect>",
                if r == Role::Leader { "leader" } else { "replica" },
                x(first),
                (last + 1 - first) as f64 * col,
                TIMELINE_ROW - 4.0,
                when(first),
                when(last)
            );
        }
    }
    let mut last_leader: Option<&str> = None;
    for m in moments {
        if m.failover {
            let fx = x(m.slot);
            let _ = write!(
                out,
                "<g class=\"failover\"><title>leader changed {} \u{2192} {} (sample at {})</title>\
                 <line x1=\"{fx:.1}\" x2=\"{fx:.1}\" y1=\"{:.0}\" y2=\"{bottom:.0}\" stroke=\"{FAILOVER}\" stroke-width=\"2\"/>\
                 <path d=\"M{:.1} {:.0} L{:.1} {:.0} L{fx:.1} {:.0} Z\" fill=\"{FAILOVER}\"/></g>",
                html(last_leader.unwrap_or("none")),
                html(m.leader.unwrap_or("none")),
                clock(m.at),
                TOP - 2.0,
                fx - 5.0,
                TOP - 10.0,
                fx + 5.0,
                TOP - 10.0,
                TOP - 2.0
            );
        }
        if m.leader.is_some() {
            last_leader = m.leader;
        }
    }
    // Legend: what the colours mean.
    let mut lx = left;
    for (colour, what) in [
        (LEADER, "leader"),
        (REPLICA, "serving reads"),
        (NO_LEADER, "no leader"),
        (FAILOVER, "failover"),
    ] {
        let _ = write!(
            out,
            "<rect x=\"{lx:.0}\" y=\"{:.0}\" width=\"12\" height=\"8\" fill=\"{colour}\"/>\
             <text x=\"{:.0}\" y=\"{legend:.0}\" font-size=\"11\">{what}</text>",
            legend - 8.0,
            lx + 16.0
        );
        lx += 110.0;
    }
    if hidden > 0 {
        let _ = write!(
            out,
            "<text x=\"{lx:.0}\" y=\"{legend:.0}\" font-size=\"11\" fill=\"#555\">and {hidden} more members</text>"
        );
    }
    out.push_str("</svg>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(lines: &[Line<'_>]) -> String {
        let mut out = String::new();
        line_chart(
            &mut out,
            &LineChart {
                id: "c",
                title: "t",
                empty: "nothing yet",
                slots: 5,
                lines,
                hidden: 0,
            },
        );
        out
    }

    #[test]
    fn axis_tops_and_labels() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(10.0), 10.0);
        assert_eq!(nice_max(11.0), 20.0);
        assert_eq!(nice_max(0.23), 0.25);
        assert_eq!(nice_max(420.0), 500.0);
        assert_eq!(number(0.0), "0");
        assert_eq!(number(12.5), "12.5");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(250.0), "250");
    }

    #[test]
    fn path_points_sit_on_the_axes() {
        // 5 columns over 524 px: 131 px apart; top 10 over 110 px.
        let (d, alone) = path(&[(0, Some(0.0)), (1, Some(5.0)), (2, Some(10.0))], 5, 10.0);
        assert_eq!(d, "M64.0 136.0 L195.0 81.0 L326.0 26.0");
        assert!(alone.is_empty());
        // Unknown values and missing columns break the line; a lone known
        // value is a point.
        let (d, alone) = path(
            &[
                (0, Some(1.0)),
                (1, Some(1.0)),
                (2, None),
                (3, Some(2.0)),
                (4, Some(10.0)),
            ],
            5,
            10.0,
        );
        assert_eq!(d, "M64.0 125.0 L195.0 125.0 M457.0 114.0 L588.0 26.0");
        assert!(alone.is_empty());
        let (d, alone) = path(&[(0, Some(5.0)), (2, Some(5.0)), (3, None)], 5, 10.0);
        assert_eq!(d, "");
        assert_eq!(alone, [(64.0, 81.0), (326.0, 81.0)]);
        // Out of range values are clamped to the plot.
        let (d, _) = path(&[(3, Some(-1.0)), (4, Some(99.0))], 5, 10.0);
        assert_eq!(d, "M457.0 136.0 L588.0 26.0");
    }

    #[test]
    fn line_chart_draws_each_pool_with_a_legend() {
        let lines = [
            Line {
                label: "app/app rw",
                points: vec![(3, Some(2.0)), (4, Some(4.0))],
            },
            Line {
                label: "app/app ro",
                points: vec![(4, Some(1.0))],
            },
        ];
        let svg = chart(&lines);
        assert!(svg.starts_with("<svg id=\"c\" ") && svg.ends_with("</svg>"), "{svg}");
        // Top of the axis: 5 (nice above 4): 2 is at mid height.
        assert!(
            svg.contains("<path d=\"M457.0 92.0 L588.0 48.0\" fill=\"none\" stroke=\"#d62728\""),
            "{svg}"
        );
        assert!(
            svg.contains("<circle cx=\"588.0\" cy=\"114.0\" r=\"2.5\" fill=\"#2ca02c\"/>"),
            "{svg}"
        );
        for tick in [
            ">0</text>",
            ">2.5</text>",
            ">5</text>",
            ">15 min ago</text>",
            ">now</text>",
        ] {
            assert!(svg.contains(tick), "{tick}: {svg}");
        }
        assert!(svg.contains("<title>app/app rw</title>") && svg.contains("<title>app/app ro</title>"));
        assert!(!svg.contains("class=\"empty\""));
        assert!(!svg.contains("http://"), "inline SVG in HTML needs no namespace URL");
    }

    #[test]
    fn line_chart_empty_with_fewer_than_two_values() {
        for lines in [
            vec![],
            vec![Line {
                label: "a",
                points: vec![(4, Some(3.0))],
            }],
            vec![Line {
                label: "a",
                points: vec![(3, None), (4, None)],
            }],
        ] {
            let svg = chart(&lines);
            assert!(svg.contains("<text class=\"empty\""), "{svg}");
            assert!(svg.contains(">nothing yet</text></svg>"), "{svg}");
            assert!(!svg.contains("<path"), "{svg}");
        }
    }

    #[test]
    fn text_is_escaped() {
        let lines = [Line {
            label: "<db>/\"u\"&x",
            points: vec![(0, Some(1.0)), (1, Some(1.0))],
        }];
        let mut out = String::new();
        line_chart(
            &mut out,
            &LineChart {
                id: "x\"y",
                title: "a<b",
                empty: "",
                slots: 5,
                lines: &lines,
                hidden: 2,
            },
        );
        assert!(
            !out.contains("<db>") && !out.contains("\"u\"") && !out.contains("a<b"),
            "{out}"
        );
        assert!(out.contains("&lt;db&gt;/&quot;u&quot;&amp;x") && out.contains("a&lt;b") && out.contains("x&quot;y"));
        assert!(out.contains("and 2 more pools"));
        let replicas: Vec<Arc<str>> = vec![Arc::from("<r>")];
        let at = SystemTime::UNIX_EPOCH;
        let moments = [
            Moment {
                slot: 0,
                at,
                leader: Some("<l>"),
                replicas: &replicas,
                failover: false,
            },
            Moment {
                slot: 1,
                at,
                leader: Some("<l>"),
                replicas: &replicas,
                failover: false,
            },
        ];
        let mut out = String::new();
        timeline(&mut out, "t", 5, &moments);
        assert!(!out.contains("<l>") && !out.contains("<r>"), "{out}");
        assert!(
            out.contains("&lt;l&gt;: leader") && out.contains("&lt;r&gt;: serving reads"),
            "{out}"
        );
    }

    #[test]
    fn timeline_rows_segments_and_failovers() {
        let ab: Vec<Arc<str>> = vec![Arc::from("b")];
        let a: Vec<Arc<str>> = vec![Arc::from("a")];
        let none: Vec<Arc<str>> = vec![];
        let t = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(3600 + s);
        let m = |slot, leader, replicas, failover| Moment {
            slot,
            at: t(slot as u64 * 5),
            leader,
            replicas,
            failover,
        };
        // a leads with b reading; a fails; no leader for one sample; b leads, a back as replica.
        let moments = [
            m(0, Some("a"), &ab[..], false),
            m(1, Some("a"), &ab[..], false),
            m(2, None, &none[..], false),
            m(3, Some("b"), &a[..], true),
            m(4, Some("b"), &a[..], false),
        ];
        let mut out = String::new();
        timeline(&mut out, "topo", 5, &moments);
        // 5 columns of 89.6 px from x 140.
        assert!(
            out.contains("<rect class=\"leader\" x=\"140.0\" y=\"30\" width=\"179.2\""),
            "{out}"
        );
        assert!(
            out.contains("<title>a: leader from 01:00:00 UTC to 01:00:05 UTC</title>"),
            "{out}"
        );
        assert!(
            out.contains("<rect class=\"replica\" x=\"140.0\" y=\"48\" width=\"179.2\""),
            "{out}"
        );
        assert!(
            out.contains("<rect class=\"leader\" x=\"408.8\" y=\"48\" width=\"179.2\""),
            "{out}"
        );
        assert!(
            out.contains("<rect class=\"replica\" x=\"408.8\" y=\"30\" width=\"179.2\""),
            "{out}"
        );
        assert!(
            out.contains("<rect class=\"no-leader\" x=\"319.2\" y=\"26\" width=\"89.6\""),
            "{out}"
        );
        assert_eq!(out.matches("class=\"failover\"").count(), 1);
        assert!(
            out.contains("<title>leader changed a \u{2192} b (sample at 01:00:15 UTC)</title>"),
            "{out}"
        );
        assert!(out.contains("<line x1=\"408.8\" x2=\"408.8\""), "{out}");

        let mut out = String::new();
        timeline(&mut out, "topo", 5, &moments[..1]);
        assert!(
            out.contains("class=\"empty\"") && !out.contains("class=\"leader\""),
            "{out}"
        );
    }
}
