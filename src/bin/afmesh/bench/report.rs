//! A measured point as the bench reports it: the table, the JSON line,
//! and the per-link latencies gathered from the ranks.

use super::*;

impl Point {
    /// The top stragglers as a JSON array.
    pub(super) fn stragglers_json(&self) -> String {
        let items: Vec<String> = self
            .stragglers
            .iter()
            .map(|(peer, count, mean)| {
                format!("{{\"peer\":\"{peer}\",\"count\":{count},\"mean_late_us\":{mean:.3}}}")
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    pub(super) const TABLE_HEADER: &'static str = "transport  shape (MxN stages tokens hidden)  bytes/layer  iters   p50 us   p99 us p99.9 us     GB/s floor us  ratio  xchg us  x ratio";

    /// Whether every byte checked out; the first error otherwise.
    pub(super) fn verified(&self) -> Result<()> {
        if self.errors > 0 {
            bail!(
                "verification failed: {}",
                self.first_error.as_deref().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// One line of the sweep's table.
    pub(super) fn table_row(&self) -> String {
        let wa = &self.work;
        let shape = format!(
            "{}x{} {} {} {}",
            self.m, self.n, wa.stages, wa.tokens, wa.hidden
        );
        format!(
            "{:<9}  {shape:<32}  {:>11}  {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.3} {:>8.2} {:>6.2} {:>8.2} {:>8.2}{}",
            self.transport,
            self.layer_bytes,
            wa.iters,
            self.lat.p50,
            self.lat.p99,
            self.lat.p999,
            self.goodput,
            self.floor_p50,
            self.ratio,
            self.floors.exchange,
            self.lat.p50 / self.floors.exchange,
            if self.errors > 0 {
                "  NOT VERIFIED"
            } else {
                ""
            },
        )
    }

    /// The point as one JSON object.
    pub(super) fn json(&self) -> String {
        let (wa, floors, m, n, transport) =
            (&self.work, &self.floors, self.m, self.n, &self.transport);
        let Summary {
            p50,
            p99,
            p999,
            max,
            mean,
        } = self.lat;
        let (goodput, copies, floor_p50, floor_name, ratio) = (
            self.goodput,
            self.copies,
            self.floor_p50,
            &self.floor_name,
            self.ratio,
        );
        let (ffn_us, net_us, pin, errors) = (self.ffn_us, self.net_us, self.pin, self.errors);
        let verified = errors == 0;
        let or_null = |v: Option<f64>| v.map_or_else(|| "null".to_string(), |v| format!("{v:.2}"));
        let (polled_us, memcpy_us) = (or_null(floors.polled), or_null(floors.memcpy));
        let unread_us = or_null(floors.unread);
        format!(
            "{{\"transport\":\"{transport}\",\"layout\":\"{}\",\"attention\":{m},\"ffn\":{n},\"tokens\":{},\"hidden\":{},\"dispatch_dtype\":\"{}\",\"combine_dtype\":\"{}\",\"stages\":{},\"iters\":{},\"warmup\":{},\"layer_bytes\":{},\"mean_us\":{mean:.2},\"p50_us\":{p50:.2},\"p99_us\":{p99:.2},\"p999_us\":{p999:.2},\"max_us\":{max:.2},\"goodput_gbps\":{goodput:.6},\"copies_per_msg\":{copies:.3},\"floor_us\":{floor_p50:.2},\"floor\":\"{floor_name}\",\"floor_exchange_us\":{:.2},\"floor_exchange_p99_us\":{:.2},\"floor_polled_us\":{polled_us},\"floor_memcpy_us\":{memcpy_us},\"floor_exchange_unread_us\":{unread_us},\"ratio\":{ratio:.3},\"ratio_exchange\":{:.3},\"ffn_us\":{ffn_us:.2},\"net_us\":{net_us:.2},\"pinned\":{pin},\"preempted_spins\":{},\"spun_ms\":{:.3},\"spin_gaps\":{},\"spin_gap_ms\":{:.3},\"steal_ms\":{},\"verified\":{verified},\"errors\":{errors},{}\"first_error\":{}{},\"stragglers\":{}}}",
            wa.layout.map_or_else(
                || std::env::var("AFMESH_LAYOUT").unwrap_or_else(|_| "slots".into()),
                |l| l.name().to_string()
            ),
            wa.tokens,
            wa.hidden,
            elem(wa.dispatch_dtype),
            elem(wa.combine_dtype),
            wa.stages,
            wa.iters,
            wa.warmup,
            self.layer_bytes,
            floors.exchange,
            floors.exchange_p99,
            p50 / floors.exchange,
            self.preempted_spins,
            self.spin_gaps.spun_us as f64 / 1e3,
            self.spin_gaps.gaps,
            self.spin_gaps.lost_us as f64 / 1e3,
            self.steal_ms
                .map_or_else(|| "null".to_string(), |v| v.to_string()),
            self.verbs.map_or_else(String::new, |v| format!(
                "\"wrs_per_msg\":{:.3},\"signaled_per_msg\":{:.3},\"flushes_per_msg\":{:.3},\"port_gbps\":{:.3},\"line_rate_pct\":{},",
                v.wrs_per_msg,
                v.signaled_per_msg,
                v.flushes_per_msg,
                v.port_gbps,
                or_null(v.line_rate_pct)
            )),
            json_str(self.first_error.as_deref()),
            match &self.nccl {
                None => String::new(),
                Some(Ok(x)) => format!(
                    ",\"device\":\"cuda\",\"nccl_p50_us\":{:.2},\"nccl_p99_us\":{:.2}",
                    x.p50, x.p99
                ),
                Some(Err(e)) => format!(
                    ",\"device\":\"cuda\",\"nccl_p50_us\":null,\"nccl_p99_us\":null,\"nccl_note\":{}",
                    json_str(Some(e))
                ),
            },
            self.stragglers_json()
        )
    }

    /// The point as the bench's report.
    pub(super) fn print(&self) {
        let (wa, floors, m, n, transport) =
            (&self.work, &self.floors, self.m, self.n, &self.transport);
        let Summary {
            p50,
            p99,
            p999,
            max,
            mean,
        } = self.lat;
        let (d, c) = wa.workload().layer_bytes(m, n);
        let (goodput, copies, floor_p50, floor_name, ratio) = (
            self.goodput,
            self.copies,
            self.floor_p50,
            &self.floor_name,
            self.ratio,
        );
        let (ffn_us, net_us, errors) = (self.ffn_us, self.net_us, self.errors);
        let verified = errors == 0;
        println!("afmesh bench: {m}A x {n}F over {transport}, {} stages, {} tokens x {} hidden ({} out, {} back)", wa.stages, wa.tokens, wa.hidden, elem(wa.dispatch_dtype), elem(wa.combine_dtype));
        println!(
            "  layer moves   {:.3} MB ({:.3} dispatch + {:.3} combine)",
            (d + c) as f64 / 1e6,
            d as f64 / 1e6,
            c as f64 / 1e6
        );
        println!(
            "  per layer     mean {mean:.1} us  p50 {p50:.1} us  p99 {p99:.1} us  p99.9 {p999:.1} us  max {max:.1} us"
        );
        println!("  goodput       {goodput:.2} GB/s");
        println!(
            "  copies        {copies:.2} per message (bytes the library copied / bytes it sent)"
        );
        println!("  floor         {floor_p50:.2} us (the same bytes: {floor_name}); the faster of");
        println!(
            "    exchange    {:.2} us, p99 {:.2} us ({})",
            floors.exchange, floors.exchange_p99, floors.exchange_name
        );
        if let Some(polled) = floors.polled {
            println!(
                "    polled      {polled:.2} us (the same, sockets polled instead of blocking)"
            );
        }
        if let Some(memcpy) = floors.memcpy {
            println!("    memcpy      {memcpy:.2} us (1 thread copies the layer once)");
        }
        if let Some(unread) = floors.unread {
            println!(
                "  not a floor   {unread:.2} us (the shm exchange with receivers that never read: no byte crosses the cores)"
            );
        }
        if let Some(v) = self.verbs {
            println!(
                "  verbs         {:.2} work requests, {:.2} signalled, {:.2} flushes/probes per message; port {:.1} Gb/s{}",
                v.wrs_per_msg,
                v.signaled_per_msg,
                v.flushes_per_msg,
                v.port_gbps,
                v.line_rate_pct
                    .map_or_else(String::new, |p| format!(", {p:.1}% of line rate"))
            );
        }
        match &self.nccl {
            Some(Ok(x)) => println!(
                "  nccl          p50 {:.2} us  p99 {:.2} us (send/recv of the same pattern; afmesh p50 {:.2}x faster)",
                x.p50,
                x.p99,
                x.p50 / p50
            ),
            Some(Err(e)) => println!("  nccl          skipped: {e}"),
            None => {}
        }
        println!(
            "  ratio         p50/floor = {ratio:.2}  (p50/exchange = {:.2})",
            p50 / floors.exchange
        );
        println!("  trace         ffn {ffn_us:.1} us, network {net_us:.1} us per message (mean)");
        if self.preempted_spins > 0 {
            println!(
                "  contention    {} waits lost their core to another task mid-spin (they, and the waits after, parked instead)",
                self.preempted_spins
            );
        }
        let g = self.spin_gaps;
        if g.gaps > 0 {
            println!(
                "  gaps          in the timed layers the ranks' spinning waits lost {:.2} of {:.1} ms ({:.2}%) to {} gaps of 5 us or more: interrupts, preemption, or the hypervisor (a tail the machine adds)",
                g.lost_us as f64 / 1e3,
                g.spun_us as f64 / 1e3,
                100.0 * g.lost_us as f64 / g.spun_us.max(1) as f64,
                g.gaps
            );
        }
        if let Some(ms) = self.steal_ms.filter(|&ms| ms > 0) {
            println!(
                "  steal         {ms} ms of this VM's CPU time went to other guests while the mesh ran (/proc/stat): stalls no library can avoid"
            );
        }
        if self.stragglers.is_empty() {
            println!("  stragglers    none (one FFN rank)");
        }
        for (i, (peer, count, mean)) in self.stragglers.iter().take(3).enumerate() {
            println!(
                "  {}{peer} answered last in {count} stages, {mean:.1} us after the one before (mean)",
                if i == 0 { "stragglers    " } else { "              " }
            );
        }
        self.print_links();
        println!("  verified      {verified} ({errors} errors)");
    }

    /// Per-link latency percentiles, as the ranks' histograms have them.
    pub(super) fn print_links(&self) {
        const SHOWN: usize = 16;
        if self.links.is_empty() {
            return;
        }
        println!(
            "  per link      p50/p99 us: round trip | dispatch arrival | ffn | combine arrival"
        );
        let q = |h: &Option<Histogram>| match h {
            Some(h) => format!(
                "{:.1}/{:.1}",
                h.quantile(0.5).unwrap_or(0) as f64 / 1e3,
                h.quantile(0.99).unwrap_or(0) as f64 / 1e3
            ),
            None => "-".into(),
        };
        for ((a, f), hs) in self.links.iter().take(SHOWN) {
            println!(
                "    {a}->{f:<6} {} | {} | {} | {}",
                q(&hs[0]),
                q(&hs[1]),
                q(&hs[2]),
                q(&hs[3])
            );
        }
        if self.links.len() > SHOWN {
            println!(
                "    ... {} more links (--json ranks have them all)",
                self.links.len() - SHOWN
            );
        }
    }
}

/// Adds a rank's per-peer histograms (its `afmesh run --json` line's
/// `links`) to `links`, keyed by (attention rank, FFN rank).
pub(super) fn collect_links(
    line: &str,
    links: &mut BTreeMap<(String, String), [Option<Histogram>; 4]>,
) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return;
    };
    let (Some(role), Some(rank)) = (v["role"].as_str(), v["rank"].as_u64()) else {
        return;
    };
    let hist = |x: &serde_json::Value| -> Option<Histogram> {
        let words: Option<Vec<u64>> = x.as_array()?.iter().map(|w| w.as_u64()).collect();
        Histogram::from_words(&words?)
    };
    for l in v["links"].as_array().into_iter().flatten() {
        let Some(peer) = l["peer"].as_str() else {
            continue;
        };
        let (key, slots) = if role == "attention" {
            (
                (format!("A{rank}"), peer.to_string()),
                [(0, "rt_ns"), (3, "arr_ns")],
            )
        } else {
            (
                (peer.to_string(), format!("F{rank}")),
                [(2, "ffn_ns"), (1, "arr_ns")],
            )
        };
        let e = links.entry(key).or_default();
        for (i, k) in slots {
            if let Some(h) = hist(&l[k]) {
                e[i] = Some(h);
            }
        }
    }
}

pub(super) fn elem(e: crate::workload::Elem) -> &'static str {
    match e {
        crate::workload::Elem::Fp8 => "fp8",
        crate::workload::Elem::Bf16 => "bf16",
        crate::workload::Elem::F32 => "f32",
    }
}
