//! How much of each CPU the machine takes away: one thread per CPU named,
//! pinned there, reads the monotonic clock in a loop for a while and
//! reports every gap over a microsecond between two reads (the thread was
//! not running: an interrupt, a preemption, or, in a virtual machine, the
//! host running something else on that vCPU, which the guest never sees).
//! A probe, not a test: it explains tails (ARCHITECTURE.md, "The tail is
//! the hypervisor's millisecond"); `scripts/gpu-check` runs it when it sits
//! beside the script.
//!
//! `cargo build --release --example cpu_gaps`, then
//! `cpu_gaps [MILLISECONDS] [CPU...]` (default: 300 ms on the first four
//! CPUs this process may use, where `afmesh bench` pins its ranks).

use std::time::{Duration, Instant};

/// Gaps longer than this are counted.
const GAP: Duration = Duration::from_micros(1);
/// Upper bounds of the histogram's buckets, in microseconds.
const BUCKETS: [u64; 6] = [2, 5, 10, 20, 50, 1000];
/// Gaps listed with their times, per CPU.
const LISTED: usize = 16;

/// What one CPU's thread saw.
struct Seen {
    cpu: usize,
    /// (start since the thread began, length) of each gap.
    gaps: Vec<(Duration, Duration)>,
    ran: Duration,
    pin_error: Option<String>,
}

fn watch(cpu: usize, run: Duration) -> Seen {
    let pin_error = afmesh::transport::shm::sys::pin_to_cpu(cpu)
        .err()
        .map(|e| e.to_string());
    let mut gaps = Vec::with_capacity(4096);
    let begin = Instant::now();
    let mut last = begin;
    loop {
        let now = Instant::now();
        let d = now - last;
        if d > GAP && gaps.len() < 1_000_000 {
            gaps.push((last - begin, d));
        }
        last = now;
        if now - begin >= run {
            break;
        }
    }
    Seen {
        cpu,
        gaps,
        ran: last - begin,
        pin_error,
    }
}

fn report(s: &Seen) {
    if let Some(e) = &s.pin_error {
        println!(
            "cpu {}: not pinned ({e}); the numbers below are wherever it ran",
            s.cpu
        );
    }
    let lost: Duration = s.gaps.iter().map(|g| g.1).sum();
    let mut counts = [0usize; BUCKETS.len() + 1];
    for (_, d) in &s.gaps {
        let us = d.as_micros() as u64;
        let i = BUCKETS
            .iter()
            .position(|&b| us < b)
            .unwrap_or(BUCKETS.len());
        counts[i] += 1;
    }
    let mut line = format!(
        "cpu {}: {} gaps over 1 us in {:.0} ms, {:.2}% of the time lost;",
        s.cpu,
        s.gaps.len(),
        s.ran.as_secs_f64() * 1e3,
        100.0 * lost.as_secs_f64() / s.ran.as_secs_f64().max(1e-9)
    );
    let mut lo = 1;
    for (i, &hi) in BUCKETS.iter().enumerate() {
        line.push_str(&format!(" {lo}-{hi} us {},", counts[i]));
        lo = hi;
    }
    line.push_str(&format!(" over {lo} us {}", counts[BUCKETS.len()]));
    println!("{line}");
    let listed: Vec<String> = s
        .gaps
        .iter()
        .filter(|g| g.1 >= Duration::from_micros(2))
        .take(LISTED)
        .map(|(at, d)| format!("{:.3}:{:.1}", at.as_secs_f64() * 1e3, d.as_secs_f64() * 1e6))
        .collect();
    println!(
        "  first gaps of 2 us or more (ms into the run:us long): {}",
        listed.join(" ")
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let ms = match args.next().map(|a| a.parse::<u64>()) {
        None => 300,
        Some(Ok(ms)) if (1..=10_000).contains(&ms) => ms,
        Some(_) => {
            eprintln!("usage: cpu_gaps [MILLISECONDS 1-10000] [CPU...]");
            std::process::exit(2);
        }
    };
    let mut cpus = Vec::new();
    for a in args {
        match a.parse::<usize>() {
            Ok(c) => cpus.push(c),
            Err(_) => {
                eprintln!("cpu_gaps: {a:?} is not a CPU number");
                std::process::exit(2);
            }
        }
    }
    if cpus.is_empty() {
        match afmesh::transport::shm::sys::allowed_cpus() {
            Ok(a) if !a.is_empty() => cpus = a.into_iter().take(4).collect(),
            Ok(_) => {
                eprintln!("cpu_gaps: this process may run on no CPU");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("cpu_gaps: reading this process's CPU set: {e}");
                std::process::exit(1);
            }
        }
    }
    let run = Duration::from_millis(ms);
    let threads: Vec<_> = cpus
        .iter()
        .map(|&cpu| std::thread::spawn(move || watch(cpu, run)))
        .collect();
    for t in threads {
        match t.join() {
            Ok(seen) => report(&seen),
            Err(_) => eprintln!("cpu_gaps: a watching thread panicked"),
        }
    }
}
