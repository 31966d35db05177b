//! Benchmark results: the table printed on stdout and the JSON report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::peers::Measurement;

/// The outcome of one query on one peer: the best of its runs, or the error.
pub type Outcome = Result<Measurement, String>;

/// All runs of one query.
pub struct QueryResult {
    /// Query name, e.g. `q3`.
    pub query: String,
    /// Outcome per peer, in the order of [`Report::peers`].
    pub outcomes: Vec<Outcome>,
}

/// A whole benchmark run.
pub struct Report {
    /// Peer names; the last one is the baseline the ratios divide by.
    pub peers: Vec<String>,
    /// Per-query results.
    pub queries: Vec<QueryResult>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonOutcome {
    ms: Option<f64>,
    rows: Option<u64>,
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonQuery {
    query: String,
    results: BTreeMap<String, JsonOutcome>,
    /// Peer time divided by the baseline's.
    ratios: BTreeMap<String, f64>,
    /// Set when peers returned different row counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    row_count_mismatch: Option<String>,
}

fn ms(m: &Measurement) -> f64 {
    m.elapsed.as_secs_f64() * 1000.0
}

/// The geometric mean of `values` (`None` when empty).
pub fn geometric_mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let log_sum: f64 = values.iter().map(|v| v.ln()).sum();
    Some((log_sum / values.len() as f64).exp())
}

impl Report {
    fn baseline(&self) -> usize {
        self.peers.len() - 1
    }

    /// The ratio of peer `i`'s time to the baseline's for `q`, when both succeeded.
    fn ratio(&self, q: &QueryResult, i: usize) -> Option<f64> {
        match (&q.outcomes[i], &q.outcomes[self.baseline()]) {
            (Ok(a), Ok(b)) if b.elapsed.as_nanos() > 0 => Some(ms(a) / ms(b)),
            _ => None,
        }
    }

    fn row_mismatch(&self, q: &QueryResult) -> Option<String> {
        let rows: Vec<(String, u64)> = self
            .peers
            .iter()
            .zip(&q.outcomes)
            .filter_map(|(p, o)| o.as_ref().ok().map(|m| (p.clone(), m.rows)))
            .collect();
        let differ = rows.windows(2).any(|w| w[0].1 != w[1].1);
        differ.then(|| {
            rows.iter()
                .map(|(p, r)| format!("{p}={r}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    /// Queries on which every peer succeeded.
    fn complete(&self) -> impl Iterator<Item = &QueryResult> {
        self.queries
            .iter()
            .filter(|q| q.outcomes.iter().all(Result::is_ok))
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let base = &self.peers[self.baseline()];
        let others: Vec<usize> = (0..self.baseline()).collect();
        let mut header = vec!["query".to_string()];
        header.extend(self.peers.iter().map(|p| format!("{p} ms")));
        header.extend(others.iter().map(|&i| format!("{}/{base}", self.peers[i])));
        let mut rows = vec![header];
        let mut notes = Vec::new();
        for q in &self.queries {
            let mut row = vec![q.query.clone()];
            for (peer, outcome) in self.peers.iter().zip(&q.outcomes) {
                match outcome {
                    Ok(m) => row.push(format!("{:.0}", ms(m))),
                    Err(e) => {
                        row.push("error".into());
                        notes.push(format!("{} on {peer}: {e}", q.query));
                    }
                }
            }
            for &i in &others {
                row.push(self.ratio(q, i).map_or("-".into(), |r| format!("{r:.2}")));
            }
            if let Some(m) = self.row_mismatch(q) {
                notes.push(format!("{}: row counts differ: {m}", q.query));
            }
            rows.push(row);
        }
        let complete: Vec<&QueryResult> = self.complete().collect();
        let mut total = vec![format!("total ({})", complete.len())];
        for i in 0..self.peers.len() {
            let sum: f64 = complete
                .iter()
                .map(|q| q.outcomes[i].as_ref().map(ms).unwrap_or(0.0))
                .sum();
            total.push(format!("{sum:.0}"));
        }
        let mut geo = vec!["geomean".to_string()];
        geo.extend(std::iter::repeat_n(String::new(), self.peers.len()));
        for &i in &others {
            let sum_peer: f64 = complete
                .iter()
                .filter_map(|q| q.outcomes[i].as_ref().ok())
                .map(ms)
                .sum();
            let sum_base: f64 = complete
                .iter()
                .filter_map(|q| q.outcomes[self.baseline()].as_ref().ok())
                .map(ms)
                .sum();
            total.push(if sum_base > 0.0 {
                format!("{:.2}", sum_peer / sum_base)
            } else {
                "-".into()
            });
            let ratios: Vec<f64> = complete.iter().filter_map(|q| self.ratio(q, i)).collect();
            geo.push(geometric_mean(&ratios).map_or("-".into(), |g| format!("{g:.2}")));
        }
        rows.push(total);
        rows.push(geo);

        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (n, row) in rows.iter().enumerate() {
            if n == 1 || n == rows.len() - 2 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                let _ = writeln!(out, "{}", rule.join("  "));
            }
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    if c == 0 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        for note in notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }

    /// The JSON report.
    pub fn json(&self, context: serde_json::Value) -> serde_json::Value {
        let queries: Vec<JsonQuery> = self
            .queries
            .iter()
            .map(|q| JsonQuery {
                query: q.query.clone(),
                results: self
                    .peers
                    .iter()
                    .zip(&q.outcomes)
                    .map(|(p, o)| {
                        let outcome = match o {
                            Ok(m) => JsonOutcome {
                                ms: Some(ms(m)),
                                rows: Some(m.rows),
                                error: None,
                                detail: m.detail.clone(),
                            },
                            Err(e) => JsonOutcome {
                                ms: None,
                                rows: None,
                                error: Some(e.clone()),
                                detail: None,
                            },
                        };
                        (p.clone(), outcome)
                    })
                    .collect(),
                ratios: (0..self.baseline())
                    .filter_map(|i| self.ratio(q, i).map(|r| (self.peers[i].clone(), r)))
                    .collect(),
                row_count_mismatch: self.row_mismatch(q),
            })
            .collect();
        let complete: Vec<&QueryResult> = self.complete().collect();
        let total_ms: BTreeMap<String, f64> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let sum = complete
                    .iter()
                    .filter_map(|q| q.outcomes[i].as_ref().ok())
                    .map(ms)
                    .sum();
                (p.clone(), sum)
            })
            .collect();
        let geomean: BTreeMap<String, Option<f64>> = (0..self.baseline())
            .map(|i| {
                let ratios: Vec<f64> = complete.iter().filter_map(|q| self.ratio(q, i)).collect();
                (self.peers[i].clone(), geometric_mean(&ratios))
            })
            .collect();
        serde_json::json!({
            "context": context,
            "baseline": self.peers[self.baseline()],
            "queries": queries,
            "totals": {
                "completeQueries": complete.len(),
                "ms": total_ms,
                "geomeanRatio": geomean,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn measured(ms: u64, rows: u64) -> Outcome {
        Ok(Measurement {
            elapsed: Duration::from_millis(ms),
            rows,
            detail: None,
        })
    }

    fn report() -> Report {
        Report {
            peers: vec!["kiln".into(), "datafusion".into()],
            queries: vec![
                QueryResult {
                    query: "q1".into(),
                    outcomes: vec![measured(200, 4), measured(100, 4)],
                },
                QueryResult {
                    query: "q2".into(),
                    outcomes: vec![measured(800, 10), measured(100, 10)],
                },
                QueryResult {
                    query: "q3".into(),
                    outcomes: vec![Err("boom".into()), measured(100, 10)],
                },
            ],
        }
    }

    #[test]
    fn geometric_mean_of_ratios() {
        assert_eq!(geometric_mean(&[]), None);
        let g = geometric_mean(&[2.0, 8.0]).unwrap();
        assert!((g - 4.0).abs() < 1e-12, "geomean of 2 and 8 is 4, got {g}");
    }

    #[test]
    fn totals_skip_failed_queries() {
        let json = report().json(serde_json::Value::Null);
        assert_eq!(json["totals"]["completeQueries"], 2);
        assert_eq!(json["totals"]["ms"]["kiln"], 1000.0);
        assert_eq!(json["totals"]["ms"]["datafusion"], 200.0);
        let g = json["totals"]["geomeanRatio"]["kiln"].as_f64().unwrap();
        assert!(
            (g - 4.0).abs() < 1e-9,
            "geomean of 2x and 8x is 4x, got {g}"
        );
        assert_eq!(json["queries"][2]["results"]["kiln"]["error"], "boom");
    }

    #[test]
    fn table_shows_ratios_errors_and_totals() {
        let table = report().table();
        assert!(table.contains("kiln/datafusion"), "{table}");
        assert!(table.contains("8.00"), "q2 ratio: {table}");
        assert!(table.contains("note: q3 on kiln: boom"), "{table}");
        assert!(table.contains("total (2)"), "{table}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("geomean") && l.ends_with("4.00")),
            "{table}"
        );
    }

    #[test]
    fn row_count_mismatch_is_reported() {
        let mut r = report();
        r.queries[0].outcomes[0] = measured(200, 5);
        assert!(
            r.table()
                .contains("q1: row counts differ: kiln=5 datafusion=4")
        );
    }
}
