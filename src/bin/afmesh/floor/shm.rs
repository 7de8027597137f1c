//! The shared-memory exchange floor's two processes (see the module docs
//! of [`super`] for the protocol and why the receivers read).

use std::sync::atomic::Ordering;
use std::time::Instant;

use afmesh::Histogram;
use anyhow::{bail, Result};

use super::mailbox::Mailboxes;
use super::{parts as split, PeerArgs, Waiter};
pub(super) fn attention(args: &PeerArgs, boxes: &Mailboxes) -> Result<Histogram> {
    let a = args.rank as usize;
    let n = args.ffn as usize;
    let (d, c) = args.sizes(a);
    let mut src = vec![0x5au8; d];
    let parts = split(d, args.stages);
    let back_parts = split(c, args.stages);
    let mut back = vec![0u8; c];
    let mut seen = 0u64;
    let per_layer = u64::from(args.stages);
    let read = !args.no_read;
    // Fixed size, whatever --iters is.
    let mut lat = Histogram::new();
    for layer in 0..args.layers() {
        let first = u64::from(layer) * per_layer + 1;
        let last = first + per_layer - 1;
        let t = Instant::now();
        for (k, &(at, len)) in (first..).zip(&parts) {
            if read {
                // Each row's stamp, rewritten per layer as the workload's.
                for r in row_words(len, args.row) {
                    let v = k ^ r as u64;
                    src[at + r..at + r + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            for f in 0..n {
                boxes.put_dispatch(a, f, at, &src[at..at + len]);
                boxes.request(a, f).store(k, Ordering::Release);
            }
        }
        // Replies come in order per pair: the last one means all are in.
        let mut w = Waiter::new(args.cpu.is_some(), args.timeout());
        for f in 0..n {
            while boxes.reply(a, f).load(Ordering::Acquire) != last {
                w.relax(|| format!("F{f}'s replies to layer {layer}"))?;
            }
        }
        if layer >= args.warmup {
            lat.record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        if read {
            // Every byte of every reply, after the time is taken: the
            // workload checks them there.
            for f in 0..n {
                for &(at, len) in &back_parts {
                    boxes.get_combine(a, f, at, &mut back[at..at + len]);
                }
                seen = back
                    .iter()
                    .fold(seen, |s, &b| s.rotate_left(3) ^ u64::from(b));
            }
        }
    }
    std::hint::black_box(seen);
    Ok(lat)
}

/// Offsets of the word each token row starts with, in a message of `len`
/// bytes with rows of `row` bytes (none when `row` is under a word).
fn row_words(len: usize, row: u64) -> impl Iterator<Item = usize> {
    let row = usize::try_from(row).unwrap_or(0);
    let count = if row < 8 { 0 } else { len.div_ceil(row) };
    (0..count)
        .map(move |r| r * row)
        .filter(move |&at| at + 8 <= len)
}

pub(super) fn ffn(args: &PeerArgs, boxes: &Mailboxes) -> Result<()> {
    let f = args.rank as usize;
    let m = args.attention as usize;
    let mut replies: Vec<Vec<u8>> = (0..m).map(|a| vec![0xa5u8; args.sizes(a).1]).collect();
    let parts: Vec<_> = (0..m)
        .map(|a| split(args.sizes(a).1, args.stages))
        .collect();
    let in_parts: Vec<_> = (0..m)
        .map(|a| split(args.sizes(a).0, args.stages))
        .collect();
    let read = !args.no_read;
    let per_layer = u64::from(args.stages);
    // Per attention rank: the next message to answer.
    let mut next = vec![1u64; m];
    for layer in 0..args.layers() {
        let last = (u64::from(layer) + 1) * per_layer;
        let mut w = Waiter::new(args.cpu.is_some(), args.timeout());
        // Answer each attention rank's messages in the order they land.
        while next.iter().any(|&k| k <= last) {
            let mut answered = false;
            for (a, k) in next.iter_mut().enumerate() {
                if *k > last {
                    continue;
                }
                let r = boxes.request(a, f).load(Ordering::Acquire);
                if r > last {
                    bail!("A{a} raised message {r} before layer {layer} was answered");
                }
                while *k <= r {
                    let i = ((*k - 1) % per_layer) as usize;
                    let (at, len) = parts[a][i];
                    if read {
                        // Each input row's word, answered in the matching
                        // reply row, as the workload's FFN does.
                        let (in_at, in_len) = in_parts[a][i];
                        let outs = row_words(len, args.out_row);
                        for (r, o) in row_words(in_len, args.row).zip(outs) {
                            let mut w = [0u8; 8];
                            boxes.get_dispatch(a, f, in_at + r, &mut w);
                            let v = u64::from_le_bytes(w) ^ (f as u64 + 1);
                            replies[a][at + o..at + o + 8].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                    boxes.put_combine(a, f, at, &replies[a][at..at + len]);
                    boxes.reply(a, f).store(*k, Ordering::Release);
                    *k += 1;
                    answered = true;
                }
            }
            if answered {
                w.progressed();
            } else {
                w.relax(|| format!("layer {layer} from the attention ranks"))?;
            }
        }
    }
    Ok(())
}
