//! Sim meshes with ranks on their own threads: blocking waits, messages
//! sent before or after the peer arrives, a full send window waited out,
//! and `interrupt` waking a blocked wait without losing what arrived.

#![allow(clippy::unwrap_used)]

#[path = "common/sim_mesh.rs"]
mod sim_mesh;

use std::time::Duration;

use afmesh::transport::sim::{Faults, SimNetwork};
use afmesh::{sim_mesh, Error};
use sim_mesh::*;

#[test]
fn threaded_ranks_with_blocking_waits() {
    let net = SimNetwork::new(11);
    net.set_auto(true);
    let (attn, ffn) = sim_mesh(&net, 2, 2, spec(3, 8)).unwrap();
    let layers = 20u32;
    let fs: Vec<_> = ffn
        .into_iter()
        .map(|mut f| {
            std::thread::spawn(move || {
                for _ in 0..layers * 3 {
                    let b = f.get_batch(Duration::from_secs(10)).unwrap();
                    let outs: Vec<Vec<u8>> = (0..b.senders())
                        .map(|a| vec![f.rank() as u8 + 1; b.token_count(a) * OUT_ROW as usize])
                        .collect();
                    let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
                    f.respond(b, &refs).unwrap();
                }
            })
        })
        .collect();
    let as_: Vec<_> = attn
        .into_iter()
        .map(|mut a| {
            std::thread::spawn(move || {
                for l in 0..layers {
                    let hs: Vec<_> = (0..3)
                        .map(|s| a.dispatch(s, &tokens_for(a.rank(), l, s, 8), &[]).unwrap())
                        .collect();
                    for h in hs {
                        let c = a.wait_combine(h, Duration::from_secs(10)).unwrap();
                        assert_eq!(c.partial(0).unwrap(), &[1u8; 64][..]);
                        assert_eq!(c.partial(1).unwrap(), &[2u8; 64][..]);
                    }
                }
            })
        })
        .collect();
    for t in as_.into_iter().chain(fs) {
        t.join().unwrap();
    }
}

#[test]
fn sent_before_the_peers_arrival() {
    // Every write is Sent 10 ns after it is posted and lands 20 µs later.
    let net = run_mesh(
        2,
        3,
        3,
        4,
        17,
        Faults {
            delay_ns: 20_000,
            jitter_ns: 5_000,
            sent_delay_ns: Some(10),
            ..Faults::default()
        },
    );
    assert_eq!(net.stats().sent, net.stats().delivered);
}

#[test]
fn sent_after_the_peers_arrival_and_combine() {
    let net = SimNetwork::new(21);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    // Writes land after 1 µs; their Sent comes 1 ms after the post.
    net.set_faults_everywhere(Faults {
        delay_ns: 1_000,
        sent_delay_ns: Some(1_000_000),
        ..Faults::default()
    });
    let a = &mut attn[0];
    let h = dispatch(a, 0, 0, 3);
    assert!(net.step(), "the dispatch lands");
    let b = ffn[0]
        .try_get_batch()
        .unwrap()
        .expect("the batch is complete");
    let out = ffn_rows(b.tokens(0), 0);
    ffn[0].respond(b, &[&out]).unwrap();
    assert!(net.step(), "the combine lands");
    // Both Sents are still pending, yet the combine is complete.
    assert_eq!(net.pending(), 2);
    assert!(check_combined(a, h, 0, 3));
    assert_eq!(net.pending(), 2);
    // The next dispatch of the stage waits for its slot's Sent: a thread
    // plays the network while it does.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stepper = {
        let (net, done) = (net.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if !net.step() {
                    std::thread::yield_now();
                }
            }
        })
    };
    let h = dispatch(a, 1, 0, 2);
    let b = ffn[0].get_batch(Duration::from_secs(5)).unwrap();
    assert_eq!(b.tokens(0), &tokens_for(0, 1, 0, 2)[..]);
    let out = ffn_rows(b.tokens(0), 0);
    ffn[0].respond(b, &[&out]).unwrap();
    let c = a.wait_combine(h, Duration::from_secs(5)).unwrap();
    assert_eq!(c.partial(0).unwrap(), &out[..]);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    stepper.join().unwrap();
    assert_eq!(net.stats().sent, 4);
}

#[test]
fn a_full_send_window_is_waited_out() {
    // One write in flight per link: the three stages' dispatches queue
    // behind each other's Sent, and every combine still arrives intact.
    let net = SimNetwork::new(23);
    net.set_auto(true);
    net.set_window(1);
    let (attn, ffn) = sim_mesh(&net, 2, 2, spec(3, 8)).unwrap();
    net.set_faults_everywhere(Faults {
        delay_ns: 500,
        jitter_ns: 2_000,
        sent_delay_ns: Some(3_000),
        ..Faults::default()
    });
    let layers = 10u32;
    let fs: Vec<_> = ffn
        .into_iter()
        .map(|mut f| {
            std::thread::spawn(move || {
                for _ in 0..layers * 3 {
                    let b = f.get_batch(Duration::from_secs(10)).unwrap();
                    let me = f.rank();
                    let outs: Vec<Vec<u8>> = (0..b.senders())
                        .map(|a| ffn_rows(b.tokens(a), me))
                        .collect();
                    let refs: Vec<&[u8]> = outs.iter().map(|v| &v[..]).collect();
                    f.respond(b, &refs).unwrap();
                }
            })
        })
        .collect();
    let as_: Vec<_> = attn
        .into_iter()
        .map(|mut a| {
            std::thread::spawn(move || {
                for l in 0..layers {
                    let hs: Vec<_> = (0..3).map(|s| (s, dispatch(&mut a, l, s, 5))).collect();
                    for (s, h) in hs {
                        let rows = tokens_for(a.rank(), l, s, 5);
                        let c = a.wait_combine(h, Duration::from_secs(10)).unwrap();
                        for f in 0..2 {
                            assert_eq!(c.partial(f).unwrap(), &ffn_rows(&rows, f as u32)[..]);
                        }
                    }
                }
            })
        })
        .collect();
    for t in as_.into_iter().chain(fs) {
        t.join().unwrap();
    }
}

#[test]
fn interrupt_wakes_a_blocked_get_batch_on_another_thread() {
    let net = SimNetwork::new(21);
    net.set_auto(true);
    let (mut attn, ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let mut f = ffn.into_iter().next().unwrap();
    let stop = f.interrupter();
    let (ready, waiting) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        ready.send(()).unwrap();
        // No attention rank sends: only the interrupt ends this wait.
        let start = std::time::Instant::now();
        let r = f.get_batch(Duration::from_secs(30));
        (f, r.map(|b| b.stage()), start.elapsed())
    });
    waiting.recv().unwrap();
    stop.interrupt();
    let (mut f, r, took) = t.join().unwrap();
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert!(took < Duration::from_secs(1), "woke after {took:?}");
    // One interrupt, one wait: the rank is still usable and serves the
    // next batch.
    let h = attn[0]
        .dispatch(0, &tokens_for(0, 0, 0, 2), &side_for(0, 0))
        .unwrap();
    let b = f.get_batch(Duration::from_secs(10)).unwrap();
    let out = vec![7u8; 2 * OUT_ROW as usize];
    f.respond(b, &[&out]).unwrap();
    let c = attn[0].wait_combine(h, Duration::from_secs(10)).unwrap();
    assert_eq!(c.partial(0).unwrap(), &out[..]);
}

#[test]
fn interrupt_wakes_a_blocked_wait_combine_and_keeps_the_combine() {
    let net = SimNetwork::new(22);
    net.set_auto(true);
    let (attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let mut a = attn.into_iter().next().unwrap();
    let stop = a.interrupter();
    let h = a.dispatch(0, &tokens_for(0, 0, 0, 1), &[]).unwrap();
    let t = std::thread::spawn(move || {
        let r = a.wait_combine(h, Duration::from_secs(30)).map(|_| ());
        (a, r)
    });
    stop.interrupt();
    let (mut a, r) = t.join().unwrap();
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    // Nothing was consumed: the stage is still in flight and its combine
    // arrives once the FFN answers.
    let b = ffn[0].get_batch(Duration::from_secs(10)).unwrap();
    let out = vec![3u8; OUT_ROW as usize];
    ffn[0].respond(b, &[&out]).unwrap();
    let c = a.wait_combine(h, Duration::from_secs(10)).unwrap();
    assert_eq!(c.partial(0).unwrap(), &out[..]);
}

#[test]
fn a_pending_interrupt_does_not_hide_an_answer_that_is_there() {
    let net = SimNetwork::new(23);
    let (mut attn, mut ffn) = sim_mesh(&net, 1, 1, spec(1, 4)).unwrap();
    let _h = attn[0].dispatch(0, &[], &[]).unwrap();
    net.deliver_all();
    let stop = ffn[0].interrupter();
    stop.interrupt();
    // The batch is there: it is returned, and the interrupt stays pending
    // for the next wait that would block.
    let b = ffn[0].get_batch(Duration::from_secs(1)).unwrap();
    ffn[0].respond(b, &[&[]]).unwrap();
    let r = ffn[0].get_batch(Duration::from_secs(30)).map(|_| ());
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
}
