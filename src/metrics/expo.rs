//! Text expositions: writing families by hand, and merging several processes' scrapes into one
//! Prometheus text exposition (format 0.0.4) with an `app` label per source.
//!
//! Children answer OpenMetrics (what `prometheus-client` writes: counters typed under their
//! name without `_total`, `# UNIT` lines, a final `# EOF`). The merged output is the classic
//! text format every Prometheus and its parsers read: each family once (HELP, TYPE, then every
//! source's samples), counters typed under their `_total` sample name, no `# UNIT` or `# EOF`.

use std::fmt::Write as _;

/// One process's scrape and the `app` label its samples get (`None`: keep them as they are,
/// for families that already name their application).
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub app: Option<&'a str>,
    pub text: &'a str,
}

#[derive(Debug, Default)]
struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

/// A label value escaped for the exposition formats (`\`, `"`, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `line` with `app="…"` as its first label, unless it already has an `app` label.
fn relabel(line: &str, app: &str) -> String {
    let app = escape(app);
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_end);
    match rest.strip_prefix('{') {
        Some(labels) if labels.starts_with("app=") || labels.contains(",app=") => line.to_string(),
        Some(labels) if labels.starts_with('}') => format!("{name}{{app=\"{app}\"{labels}"),
        Some(labels) => format!("{name}{{app=\"{app}\",{labels}"),
        None => format!("{name}{{app=\"{app}\"}}{rest}"),
    }
}

/// The metric name of a sample line.
fn sample_name(line: &str) -> &str {
    &line[..line.find(['{', ' ']).unwrap_or(line.len())]
}

/// Whether sample `name` belongs to family `family` (its own name or a histogram/counter part).
fn belongs(name: &str, family: &str) -> bool {
    name == family
        || name.strip_prefix(family).is_some_and(|s| {
            ["_total", "_bucket", "_sum", "_count", "_created", "_info"].contains(&s)
        })
}

/// Merges the sources into one Prometheus text exposition, families in order of first
/// appearance, each listed once.
pub fn merge(sources: &[Source<'_>]) -> String {
    let mut fams: Vec<Family> = Vec::new();
    let find = |fams: &mut Vec<Family>, name: &str| -> usize {
        match fams.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                fams.push(Family { name: name.to_string(), ..Family::default() });
                fams.len() - 1
            }
        }
    };
    for src in sources {
        let mut current: Option<usize> = None;
        for line in src.text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix('#') {
                let mut parts = comment.trim_start().splitn(3, ' ');
                let (what, name, text) = (parts.next(), parts.next(), parts.next());
                let (Some(what @ ("HELP" | "TYPE")), Some(name)) = (what, name) else {
                    continue;
                };
                let i = find(&mut fams, name);
                let text = text.unwrap_or("").to_string();
                if what == "HELP" {
                    fams[i].help.get_or_insert(text);
                } else {
                    fams[i].kind.get_or_insert(text);
                }
                current = Some(i);
                continue;
            }
            let name = sample_name(line);
            let i = match current {
                Some(i) if belongs(name, &fams[i].name) => i,
                _ => find(&mut fams, name),
            };
            current = Some(i);
            let sample = match src.app {
                Some(app) => relabel(line, app),
                None => line.to_string(),
            };
            fams[i].samples.push(sample);
        }
    }
    let mut out = String::new();
    for f in &fams {
        let kind = match f.kind.as_deref() {
            None | Some("unknown") => "untyped",
            Some(k) => k,
        };
        // The classic format types a counter under its sample's name.
        let name = if kind == "counter" && !f.name.ends_with("_total") {
            format!("{}_total", f.name)
        } else {
            f.name.clone()
        };
        if let Some(help) = &f.help {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in &f.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
    out
}

/// The sum of every sample named exactly `name` in an exposition (`None` when there is none).
pub fn sum(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if sample_name(line) != name {
            continue;
        }
        // The value follows the labels (which may hold spaces inside quotes).
        let after = line.rfind('}').map_or(&line[name.len()..], |i| &line[i + 1..]);
        if let Some(v) = after.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Writes hand-made families (values read from a snapshot) in the exposition text format.
#[derive(Debug, Default)]
pub struct Writer {
    out: String,
}

impl Writer {
    /// Starts family `name` (a counter's samples are `name_total`).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample of the family just started.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let labels: Vec<String> =
            labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {value}", labels.join(","));
        }
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "# HELP twinkle_jobs Jobs.\n# TYPE twinkle_jobs counter\n\
        twinkle_jobs_total{op=\"sample\"} 3\n# HELP twinkle_q Queue.\n# TYPE twinkle_q gauge\n\
        twinkle_q 2\n# HELP h_seconds Lat.\n# TYPE h_seconds histogram\n# UNIT h_seconds seconds\n\
        h_seconds_sum 0.5\nh_seconds_count 1\nh_seconds_bucket{le=\"1.0\"} 1\n\
        h_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";

    #[test]
    fn sources_merge_into_one_family_each_with_their_app_label() {
        let text = merge(&[
            Source { app: Some("model"), text: CHILD },
            Source { app: Some("sampler"), text: CHILD },
            Source { app: None, text: "# TYPE twinkle_q gauge\ntwinkle_q{app=\"x\"} 1\n" },
        ]);
        assert_eq!(text.matches("# TYPE twinkle_jobs_total counter").count(), 1, "{text}");
        assert_eq!(text.matches("# TYPE twinkle_q gauge").count(), 1);
        assert!(text.contains("twinkle_jobs_total{app=\"model\",op=\"sample\"} 3"));
        assert!(text.contains("twinkle_jobs_total{app=\"sampler\",op=\"sample\"} 3"));
        assert!(text.contains("twinkle_q{app=\"sampler\"} 2"));
        assert!(text.contains("twinkle_q{app=\"x\"} 1"));
        assert!(text.contains("h_seconds_bucket{app=\"model\",le=\"+Inf\"} 1"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert_eq!(sum(&text, "twinkle_q"), Some(5.0));
        assert_eq!(sum(&text, "missing"), None);
    }

    #[test]
    fn relabel_keeps_an_existing_app_and_escapes() {
        assert_eq!(relabel("a{app=\"m\"} 1", "x"), "a{app=\"m\"} 1");
        assert_eq!(relabel("a{} 1", "x"), "a{app=\"x\"} 1");
        assert_eq!(relabel("a 1", "q\""), "a{app=\"q\\\"\"} 1");
        let mut w = Writer::default();
        w.family("g", "gauge", "G.").sample("g", &[("app", "m")], 1.5);
        assert_eq!(w.finish(), "# HELP g G.\n# TYPE g gauge\ng{app=\"m\"} 1.5\n");
    }
}
