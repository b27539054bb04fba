//! The closing markdown: per store, endpoint and load, ours beside the
//! baseline and their ratios; then each server's memory after its load.

use std::fmt::Write as _;

use crate::drive::{Stats, Timing};
use crate::server::Memory;
use crate::{Endpoint, Load, StoreKind};

struct Row {
    store: StoreKind,
    endpoint: Endpoint,
    load: Load,
    ours: Stats,
    baseline: Option<Stats>,
}

/// Everything measured in one run.
pub struct Report {
    timing: Timing,
    loads: Vec<Load>,
    rows: Vec<Row>,
    memory: Vec<(StoreKind, Option<Memory>, Option<Memory>)>,
}

impl Report {
    /// An empty report of a run with these settings.
    pub fn new(timing: Timing, loads: Vec<Load>) -> Report {
        Report {
            timing,
            loads,
            rows: Vec::new(),
            memory: Vec::new(),
        }
    }

    /// One measurement.
    pub fn add(
        &mut self,
        store: StoreKind,
        endpoint: Endpoint,
        load: Load,
        ours: Stats,
        baseline: Option<Stats>,
    ) {
        self.rows.push(Row {
            store,
            endpoint,
            load,
            ours,
            baseline,
        });
    }

    /// The servers' memory after the load on `store`.
    pub fn memory(&mut self, store: StoreKind, ours: Option<Memory>, baseline: Option<Memory>) {
        self.memory.push((store, ours, baseline));
    }

    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let loads: Vec<String> = self.loads.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "\n## Request-path load bench\n\n{} s measured after {} s of warm-up per cell; \
             loads (connections×streams): {}. Latencies in µs. \
             ours/base: throughput ratio (higher is better) and p50 ratio (lower is better).\n",
            self.timing.duration.as_secs(),
            self.timing.warmup.as_secs(),
            loads.join(", ")
        );
        out.push_str(
            "| store | endpoint | load | ours rps | p50 | p99 | p99.9 | base rps | p50 | p99 | p99.9 | rps ours/base | p50 ours/base | errors |\n",
        );
        out.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            let o = &r.ours;
            let _ = write!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} ",
                r.store.name(),
                r.endpoint.name(),
                r.load,
                o.rps(),
                o.micros(0.50),
                o.micros(0.99),
                o.micros(0.999)
            );
            let mut errors = o.errors;
            match &r.baseline {
                Some(b) => {
                    errors += b.errors;
                    let _ = write!(
                        out,
                        "| {:.0} | {:.0} | {:.0} | {:.0} | {} | {} ",
                        b.rps(),
                        b.micros(0.50),
                        b.micros(0.99),
                        b.micros(0.999),
                        ratio(o.rps(), b.rps()),
                        ratio(o.micros(0.50), b.micros(0.50)),
                    );
                }
                None => out.push_str("| – | – | – | – | – | – "),
            }
            let _ = writeln!(out, "| {errors} |");
        }
        out.push_str(
            "\nServer memory after the load (MiB; `/proc/<pid>/status` of each server process):\n\n\
             | store | ours VmHWM | ours VmRSS | base VmHWM | base VmRSS |\n|---|---:|---:|---:|---:|\n",
        );
        for (store, ours, base) in &self.memory {
            let cell = |m: &Option<Memory>| match m {
                Some(m) => (
                    format!("{:.1}", m.peak_mib),
                    format!("{:.1}", m.current_mib),
                ),
                None => ("–".to_owned(), "–".to_owned()),
            };
            let (op, oc) = cell(ours);
            let (bp, bc) = cell(base);
            let _ = writeln!(out, "| {} | {op} | {oc} | {bp} | {bc} |", store.name());
        }
        out
    }
}

/// `a / b` as a percentage ("–" without a baseline figure).
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.0} %", 100.0 * a / b)
    } else {
        "–".to_owned()
    }
}
