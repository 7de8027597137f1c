//! The job summary a standalone scheduler prints when a mesh finishes: the
//! results every `afmesh run` rank reported before leaving, side by side,
//! so a cluster benchmark is `afmesh scheduler` plus one `afmesh run` per
//! host, and the slowest link is named.

use afmesh::{Histogram, Role};
use serde_json::Value;

/// One link as an attention rank saw it: the round trip of each message
/// (dispatch posted → combine back) and the bytes it sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub from: String,
    pub to: String,
    pub sent_bytes: u64,
    pub gbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One attention rank's layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Layers {
    pub rank: String,
    pub layers: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// The whole job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobSummary {
    pub transport: String,
    pub attention: Vec<Layers>,
    pub links: Vec<Link>,
    /// Ranks that left without reporting, or whose report did not parse.
    pub silent: Vec<String>,
    /// FFN ranks that answered stages last, over every attention rank:
    /// (peer, stages, mean lateness in us), most often first.
    pub stragglers: Vec<(String, u64, f64)>,
}

fn us(ns: Option<u64>) -> f64 {
    ns.map_or(0.0, |v| v as f64 / 1e3)
}

fn histogram(v: &Value) -> Option<Histogram> {
    let words: Option<Vec<u64>> = v.as_array()?.iter().map(Value::as_u64).collect();
    Histogram::from_words(&words?)
}

/// Gathers `reports` (role, rank, the rank's JSON object) of an M×N job.
pub fn gather(reports: &[(Role, u32, String)], m: u32, n: u32) -> JobSummary {
    let mut s = JobSummary::default();
    let name = |role: Role, r: u32| match role {
        Role::Attention => format!("A{r}"),
        Role::Ffn => format!("F{r}"),
    };
    for (role, r) in (0..m)
        .map(|r| (Role::Attention, r))
        .chain((0..n).map(|r| (Role::Ffn, r)))
    {
        let Some(v) = reports
            .iter()
            .find(|(ro, rr, _)| *ro == role && *rr == r)
            .and_then(|(_, _, t)| serde_json::from_str::<Value>(t).ok())
        else {
            s.silent.push(name(role, r));
            continue;
        };
        if role == Role::Ffn {
            continue;
        }
        if let Some(t) = v["transport"].as_str() {
            if s.transport.is_empty() {
                s.transport = t.to_string();
            } else if !s.transport.split(',').any(|x| x == t) {
                s.transport = format!("{},{t}", s.transport);
            }
        }
        let lat = histogram(&v["lat_ns"]);
        s.attention.push(Layers {
            rank: name(role, r),
            layers: lat.as_ref().map_or(0, Histogram::count),
            p50_us: us(lat.as_ref().and_then(|h| h.quantile(0.5))),
            p99_us: us(lat.as_ref().and_then(|h| h.quantile(0.99))),
            errors: v["errors"].as_u64().unwrap_or(0),
        });
        for st in v["stragglers"].as_array().into_iter().flatten() {
            let (Some(peer), Some(count), Some(mean)) = (
                st["peer"].as_str(),
                st["count"].as_u64(),
                st["mean_late_us"].as_f64(),
            ) else {
                continue;
            };
            match s.stragglers.iter_mut().find(|x| x.0 == peer) {
                Some(x) => {
                    let total = x.1 + count;
                    x.2 = (x.2 * x.1 as f64 + mean * count as f64) / total.max(1) as f64;
                    x.1 = total;
                }
                None => s.stragglers.push((peer.to_string(), count, mean)),
            }
        }
        let secs = v["elapsed_s"].as_f64().unwrap_or(0.0);
        for l in v["links"].as_array().into_iter().flatten() {
            let rt = histogram(&l["rt_ns"]);
            let sent = l["sent_bytes"].as_u64().unwrap_or(0);
            s.links.push(Link {
                from: name(role, r),
                to: l["peer"].as_str().unwrap_or("?").to_string(),
                sent_bytes: sent,
                gbps: if secs > 0.0 {
                    sent as f64 / secs / 1e9
                } else {
                    0.0
                },
                p50_us: us(rt.as_ref().and_then(|h| h.quantile(0.5))),
                p99_us: us(rt.as_ref().and_then(|h| h.quantile(0.99))),
            });
        }
    }
    s.stragglers
        .sort_by(|a, b| b.1.cmp(&a.1).then(b.2.total_cmp(&a.2)));
    s
}

impl JobSummary {
    /// The link with the slowest median round trip.
    pub fn slowest(&self) -> Option<&Link> {
        self.links
            .iter()
            .max_by(|a, b| a.p50_us.total_cmp(&b.p50_us))
    }

    /// The table a person reads.
    pub fn text(&self) -> String {
        let mut o = format!(
            "afmesh job summary ({}):\n  rank   layers    p50_us    p99_us  errors\n",
            if self.transport.is_empty() {
                "no transport reported"
            } else {
                &self.transport
            }
        );
        for a in &self.attention {
            o += &format!(
                "  {:<5} {:>7} {:>9.1} {:>9.1} {:>7}\n",
                a.rank, a.layers, a.p50_us, a.p99_us, a.errors
            );
        }
        o += "  link        sent_MB    GB/s  rt_p50_us  rt_p99_us\n";
        for l in &self.links {
            o += &format!(
                "  {:<10} {:>8.2} {:>7.3} {:>10.1} {:>10.1}\n",
                format!("{}->{}", l.from, l.to),
                l.sent_bytes as f64 / 1e6,
                l.gbps,
                l.p50_us,
                l.p99_us
            );
        }
        if let Some(l) = self.slowest() {
            let mut p50s: Vec<f64> = self.links.iter().map(|l| l.p50_us).collect();
            p50s.sort_by(f64::total_cmp);
            let median = p50s[p50s.len() / 2];
            o += &format!(
                "  slowest link: {}->{} (round trip p50 {:.1} us, {:.2}x the median link)\n",
                l.from,
                l.to,
                l.p50_us,
                if median > 0.0 { l.p50_us / median } else { 1.0 }
            );
        }
        for (i, (peer, count, mean)) in self.stragglers.iter().take(3).enumerate() {
            o += &format!(
                "  {}{peer} answered last in {count} stages, {mean:.1} us after the one before (mean)\n",
                if i == 0 { "stragglers: " } else { "            " }
            );
        }
        if !self.silent.is_empty() {
            o += &format!("  no report from: {}\n", self.silent.join(", "));
        }
        o
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let attention: Vec<Value> = self
            .attention
            .iter()
            .map(|a| {
                serde_json::json!({"rank": a.rank, "layers": a.layers, "p50_us": a.p50_us,
                    "p99_us": a.p99_us, "errors": a.errors})
            })
            .collect();
        let links: Vec<Value> = self
            .links
            .iter()
            .map(|l| {
                serde_json::json!({"from": l.from, "to": l.to, "sent_bytes": l.sent_bytes,
                    "gbps": l.gbps, "rt_p50_us": l.p50_us, "rt_p99_us": l.p99_us})
            })
            .collect();
        serde_json::json!({"job_summary": {
            "transport": self.transport,
            "attention": attention,
            "links": links,
            "slowest": self.slowest().map(|l| format!("{}->{}", l.from, l.to)),
            "silent": self.silent,
            "stragglers": self.stragglers.iter().map(|(peer, count, mean)| {
                serde_json::json!({"peer": peer, "count": count, "mean_late_us": mean})
            }).collect::<Vec<_>>(),
        }})
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hist(values: &[u64]) -> String {
        let mut h = Histogram::new();
        for v in values {
            h.record(*v);
        }
        crate::bench::words_json(&h)
    }

    #[test]
    fn gathers_layers_links_and_the_slowest() {
        let a0 = format!(
            r#"{{"role":"attention","transport":"tcp","rank":0,"errors":0,"elapsed_s":2.0,"stragglers":[{{"peer":"F1","count":3,"mean_late_us":2.0}},{{"peer":"F0","count":1,"mean_late_us":9.0}}],"lat_ns":{},"links":[{{"peer":"F0","sent_bytes":2000000000,"rt_ns":{}}},{{"peer":"F1","sent_bytes":1000000000,"rt_ns":{}}}]}}"#,
            hist(&[100_000, 200_000]),
            hist(&[50_000]),
            hist(&[900_000]),
        );
        let reports = vec![
            (Role::Attention, 0, a0),
            (Role::Ffn, 0, r#"{"role":"ffn","rank":0}"#.to_string()),
        ];
        let s = gather(&reports, 1, 2);
        assert_eq!(s.transport, "tcp");
        assert_eq!(s.attention.len(), 1);
        assert_eq!(s.attention[0].layers, 2);
        assert_eq!(s.links.len(), 2);
        assert!((s.links[0].gbps - 1.0).abs() < 1e-9);
        let slow = s.slowest().unwrap();
        assert_eq!((slow.from.as_str(), slow.to.as_str()), ("A0", "F1"));
        assert_eq!(s.silent, vec!["F1".to_string()]);
        let text = s.text();
        assert!(text.contains("slowest link: A0->F1"), "{text}");
        let v: Value = serde_json::from_str(&s.json()).unwrap();
        assert_eq!(v["job_summary"]["slowest"], "A0->F1");
        assert_eq!(v["job_summary"]["stragglers"][0]["peer"], "F1");
        assert_eq!(v["job_summary"]["stragglers"][0]["count"], 3);
        assert!(
            text.contains("stragglers: F1 answered last in 3 stages"),
            "{text}"
        );
    }
}
