//! The committed bindings against the system's `infiniband/verbs.h`: every
//! size, offset and constant the backend relies on, compiled by the system
//! C compiler. A header change (or a bindgen mistake) fails here; rerun
//! `scripts/verbs-bindgen`.

use std::mem::{offset_of, size_of};

use super::sys::*;

/// `(C expression, Rust value)` pairs.
fn table() -> Vec<(&'static str, usize)> {
    macro_rules! size {
        ($t:ident) => {
            (
                concat!("sizeof(struct ", stringify!($t), ")"),
                size_of::<$t>(),
            )
        };
    }
    macro_rules! off {
        ($t:ident, $c:literal, $($r:tt)+) => {
            (
                concat!("offsetof(struct ", stringify!($t), ", ", $c, ")"),
                offset_of!($t, $($r)+),
            )
        };
    }
    macro_rules! val {
        ($c:ident) => {
            (stringify!($c), $c as usize)
        };
    }
    vec![
        size!(ibv_context),
        off!(ibv_context, "ops", ops),
        off!(ibv_context, "async_fd", async_fd),
        off!(ibv_context_ops, "poll_cq", poll_cq),
        off!(ibv_context_ops, "req_notify_cq", req_notify_cq),
        off!(ibv_context_ops, "post_srq_recv", post_srq_recv),
        off!(ibv_context_ops, "post_send", post_send),
        size!(ibv_device_attr),
        off!(ibv_device_attr, "max_cqe", max_cqe),
        off!(ibv_device_attr, "max_srq_wr", max_srq_wr),
        off!(ibv_device_attr, "phys_port_cnt", phys_port_cnt),
        size!(ibv_port_attr),
        off!(ibv_port_attr, "active_mtu", active_mtu),
        off!(ibv_port_attr, "gid_tbl_len", gid_tbl_len),
        off!(ibv_port_attr, "max_msg_sz", max_msg_sz),
        off!(ibv_port_attr, "lid", lid),
        off!(ibv_port_attr, "active_width", active_width),
        off!(ibv_port_attr, "active_speed", active_speed),
        off!(ibv_port_attr, "link_layer", link_layer),
        size!(ibv_gid_entry),
        off!(ibv_gid_entry, "gid_type", gid_type),
        size!(ibv_mr),
        off!(ibv_mr, "lkey", lkey),
        off!(ibv_mr, "rkey", rkey),
        size!(ibv_cq),
        off!(ibv_cq, "context", context),
        size!(ibv_comp_channel),
        off!(ibv_comp_channel, "fd", fd),
        size!(ibv_srq),
        off!(ibv_srq, "context", context),
        size!(ibv_srq_init_attr),
        off!(ibv_srq_init_attr, "attr.max_wr", attr.max_wr),
        size!(ibv_qp),
        off!(ibv_qp, "context", context),
        off!(ibv_qp, "qp_num", qp_num),
        size!(ibv_qp_init_attr),
        off!(ibv_qp_init_attr, "srq", srq),
        off!(ibv_qp_init_attr, "cap.max_inline_data", cap.max_inline_data),
        off!(ibv_qp_init_attr, "qp_type", qp_type),
        off!(ibv_qp_init_attr, "sq_sig_all", sq_sig_all),
        size!(ibv_qp_attr),
        off!(ibv_qp_attr, "path_mtu", path_mtu),
        off!(ibv_qp_attr, "dest_qp_num", dest_qp_num),
        off!(ibv_qp_attr, "ah_attr.grh.dgid", ah_attr.grh.dgid),
        off!(ibv_qp_attr, "ah_attr.dlid", ah_attr.dlid),
        off!(ibv_qp_attr, "ah_attr.is_global", ah_attr.is_global),
        off!(ibv_qp_attr, "ah_attr.port_num", ah_attr.port_num),
        off!(ibv_qp_attr, "min_rnr_timer", min_rnr_timer),
        off!(ibv_qp_attr, "rnr_retry", rnr_retry),
        size!(ibv_sge),
        size!(ibv_send_wr),
        off!(ibv_send_wr, "sg_list", sg_list),
        off!(ibv_send_wr, "opcode", opcode),
        off!(ibv_send_wr, "send_flags", send_flags),
        off!(ibv_send_wr, "imm_data", __bindgen_anon_1.imm_data),
        off!(ibv_send_wr, "wr.rdma.remote_addr", wr.rdma.remote_addr),
        off!(ibv_send_wr, "wr.rdma.rkey", wr.rdma.rkey),
        size!(ibv_recv_wr),
        size!(ibv_wc),
        off!(ibv_wc, "status", status),
        off!(ibv_wc, "opcode", opcode),
        off!(ibv_wc, "byte_len", byte_len),
        off!(ibv_wc, "imm_data", __bindgen_anon_1.imm_data),
        off!(ibv_wc, "qp_num", qp_num),
        size!(ibv_async_event),
        off!(ibv_async_event, "event_type", event_type),
        val!(IBV_WR_RDMA_WRITE),
        val!(IBV_WR_RDMA_WRITE_WITH_IMM),
        val!(IBV_WC_RECV_RDMA_WITH_IMM),
        val!(IBV_WC_WR_FLUSH_ERR),
        val!(IBV_WC_RETRY_EXC_ERR),
        val!(IBV_WC_RNR_RETRY_EXC_ERR),
        val!(IBV_SEND_SIGNALED),
        val!(IBV_SEND_INLINE),
        val!(IBV_ACCESS_LOCAL_WRITE),
        val!(IBV_ACCESS_REMOTE_WRITE),
        val!(IBV_ACCESS_RELAXED_ORDERING),
        val!(IBV_QPT_RC),
        val!(IBV_QPS_INIT),
        val!(IBV_QPS_RTR),
        val!(IBV_QPS_RTS),
        val!(IBV_QPS_ERR),
        val!(IBV_QP_STATE),
        val!(IBV_QP_AV),
        val!(IBV_QP_PATH_MTU),
        val!(IBV_QP_TIMEOUT),
        val!(IBV_QP_RETRY_CNT),
        val!(IBV_QP_RNR_RETRY),
        val!(IBV_QP_MAX_QP_RD_ATOMIC),
        val!(IBV_QP_MAX_DEST_RD_ATOMIC),
        val!(IBV_QP_MIN_RNR_TIMER),
        val!(IBV_QP_SQ_PSN),
        val!(IBV_QP_RQ_PSN),
        val!(IBV_QP_DEST_QPN),
        val!(IBV_QP_PORT),
        val!(IBV_QP_PKEY_INDEX),
        val!(IBV_QP_ACCESS_FLAGS),
        val!(IBV_PORT_ACTIVE),
        val!(IBV_LINK_LAYER_ETHERNET),
        val!(IBV_GID_TYPE_ROCE_V2),
        val!(IBV_EVENT_QP_FATAL),
        val!(IBV_EVENT_PORT_ERR),
    ]
}

#[test]
fn bindings_match_the_system_header() {
    let header = std::path::Path::new("/usr/include/infiniband/verbs.h");
    if !header.exists() {
        // The build never needs the header; this check does (scripts/test
        // installs libibverbs-dev).
        eprintln!("no {}: drift check skipped", header.display());
        return;
    }
    let t = table();
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\nint main(void) {\n",
    );
    for (expr, _) in &t {
        c.push_str(&format!("    printf(\"%zu\\n\", (size_t)({expr}));\n"));
    }
    c.push_str("    return 0;\n}\n");
    let dir = std::env::temp_dir().join(format!("afmesh-verbs-drift-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let src = dir.join("drift.c");
    let bin = dir.join("drift");
    std::fs::write(&src, c).expect("write drift.c");
    let st = std::process::Command::new("cc")
        .args(["-std=gnu11", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "compiling the drift check failed");
    let out = std::process::Command::new(&bin).output().expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    let c_vals: Vec<usize> = text.lines().map(|l| l.parse().expect("number")).collect();
    assert_eq!(c_vals.len(), t.len());
    let wrong: Vec<String> = t
        .iter()
        .zip(&c_vals)
        .filter(|((_, r), c)| r != *c)
        .map(|((e, r), c)| format!("{e}: C {c}, Rust {r}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "src/transport/verbs/sys.rs drifted from verbs.h (rerun scripts/verbs-bindgen):\n{}",
        wrong.join("\n")
    );
}

/// Stripes of a gathered message cover its bytes once, in order, each
/// from the right slice.
#[test]
fn stripes_cover_the_gathered_bytes_once() {
    let sg = [
        ibv_sge {
            addr: 1000,
            length: 64,
            lkey: 1,
        },
        ibv_sge {
            addr: 50_000,
            length: 1000,
            lkey: 2,
        },
        ibv_sge {
            addr: 90_000,
            length: 37,
            lkey: 3,
        },
    ];
    let total: u64 = sg.iter().map(|s| u64::from(s.length)).sum();
    for stripes in 1..=7u64 {
        let each = total.div_ceil(stripes).next_multiple_of(64);
        // (lkey, addr) of every byte, as the stripes name them.
        let mut bytes = Vec::new();
        for k in 0..stripes {
            let from = (k * each).min(total);
            let to = (from + each).min(total);
            let mut part = [ibv_sge::default(); super::MAX_SGE];
            let n = super::stripe(&sg, from, to, &mut part);
            let len: u64 = part[..n].iter().map(|s| u64::from(s.length)).sum();
            assert_eq!(len, to - from, "{stripes} stripes, stripe {k}");
            for s in &part[..n] {
                for i in 0..u64::from(s.length) {
                    bytes.push((s.lkey, s.addr + i));
                }
            }
        }
        let want: Vec<(u32, u64)> = sg
            .iter()
            .flat_map(|s| (0..u64::from(s.length)).map(move |i| (s.lkey, s.addr + i)))
            .collect();
        assert_eq!(bytes, want, "{stripes} stripes");
    }
}

/// Both ends of a link pick the same rail pair (each sees it mirrored);
/// with equal rail counts rail i meets rail i; a full mesh with at least
/// as many peers as rails uses every rail of every rank; unequal counts
/// still put every link on a rail both ends have.
#[test]
fn rail_pairs_agree_at_both_ends_and_spread_links() {
    use super::qp::rail_pairs;
    for ra in 1..=4usize {
        for rf in 1..=4usize {
            for a in 0..5u32 {
                for f in 0..5u32 {
                    let at_a: Vec<_> = rail_pairs(a, f, ra, rf).collect();
                    let at_f: Vec<_> = rail_pairs(f, a, rf, ra).map(|(x, y)| (y, x)).collect();
                    assert_eq!(at_a, at_f, "A{a} ({ra} rails) and F{f} ({rf})");
                    assert!(at_a.iter().all(|&(x, y)| x < ra && y < rf));
                    if ra == rf {
                        assert_eq!(at_a[0].0, at_a[0].1, "rail i meets rail i");
                    }
                }
            }
            // A rank with as many peers as its rails has a link on each.
            for a in 0..3u32 {
                let used: std::collections::BTreeSet<usize> = (0..ra as u32)
                    .map(|f| rail_pairs(a, f, ra, rf).next().unwrap().0)
                    .collect();
                assert_eq!(used.len(), ra, "A{a} with {ra} rails, {ra} peers");
            }
        }
    }
}
