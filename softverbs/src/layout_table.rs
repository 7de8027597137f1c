// Generated from tests/c/layout.c's list: the Rust side of the layout check.
use std::mem::{offset_of, size_of};

use crate::abi::*;

/// (what, bytes) for every size and offset the C program prints.
pub fn table() -> Vec<(&'static str, usize)> {
    vec![
        ("size ibv_device", size_of::<ibv_device>()),
        ("size ibv_context", size_of::<ibv_context>()),
        ("size ibv_context_ops", size_of::<ibv_context_ops>()),
        ("size ibv_pd", size_of::<ibv_pd>()),
        ("size ibv_mr", size_of::<ibv_mr>()),
        ("size ibv_comp_channel", size_of::<ibv_comp_channel>()),
        ("size ibv_cq", size_of::<ibv_cq>()),
        ("size ibv_srq", size_of::<ibv_srq>()),
        ("size ibv_qp", size_of::<ibv_qp>()),
        ("size ibv_device_attr", size_of::<ibv_device_attr>()),
        ("size ibv_port_attr", size_of::<ibv_port_attr>()),
        ("size ibv_qp_cap", size_of::<ibv_qp_cap>()),
        ("size ibv_qp_init_attr", size_of::<ibv_qp_init_attr>()),
        ("size ibv_global_route", size_of::<ibv_global_route>()),
        ("size ibv_ah_attr", size_of::<ibv_ah_attr>()),
        ("size ibv_qp_attr", size_of::<ibv_qp_attr>()),
        ("size ibv_sge", size_of::<ibv_sge>()),
        ("size ibv_send_wr", size_of::<ibv_send_wr>()),
        ("size ibv_recv_wr", size_of::<ibv_recv_wr>()),
        ("size ibv_wc", size_of::<ibv_wc>()),
        ("size ibv_srq_attr", size_of::<ibv_srq_attr>()),
        ("size ibv_srq_init_attr", size_of::<ibv_srq_init_attr>()),
        ("size ibv_async_event", size_of::<ibv_async_event>()),
        ("size ibv_gid_entry", size_of::<ibv_gid_entry>()),
        (
            "off ibv_gid_entry.gid_type",
            offset_of!(ibv_gid_entry, gid_type),
        ),
        (
            "off ibv_async_event.event_type",
            offset_of!(ibv_async_event, event_type),
        ),
        (
            "off ibv_device.node_type",
            offset_of!(ibv_device, node_type),
        ),
        ("off ibv_device.name", offset_of!(ibv_device, name)),
        (
            "off ibv_device.ibdev_path",
            offset_of!(ibv_device, ibdev_path),
        ),
        ("off ibv_context.ops", offset_of!(ibv_context, ops)),
        ("off ibv_context.cmd_fd", offset_of!(ibv_context, cmd_fd)),
        ("off ibv_context.mutex", offset_of!(ibv_context, mutex)),
        (
            "off ibv_context.abi_compat",
            offset_of!(ibv_context, abi_compat),
        ),
        (
            "off ibv_context_ops.poll_cq",
            offset_of!(ibv_context_ops, poll_cq),
        ),
        (
            "off ibv_context_ops.req_notify_cq",
            offset_of!(ibv_context_ops, req_notify_cq),
        ),
        (
            "off ibv_context_ops.post_srq_recv",
            offset_of!(ibv_context_ops, post_srq_recv),
        ),
        (
            "off ibv_context_ops.post_send",
            offset_of!(ibv_context_ops, post_send),
        ),
        (
            "off ibv_context_ops.post_recv",
            offset_of!(ibv_context_ops, post_recv),
        ),
        ("off ibv_mr.length", offset_of!(ibv_mr, length)),
        ("off ibv_mr.lkey", offset_of!(ibv_mr, lkey)),
        ("off ibv_mr.rkey", offset_of!(ibv_mr, rkey)),
        ("off ibv_comp_channel.fd", offset_of!(ibv_comp_channel, fd)),
        ("off ibv_cq.cq_context", offset_of!(ibv_cq, cq_context)),
        ("off ibv_cq.cqe", offset_of!(ibv_cq, cqe)),
        ("off ibv_cq.mutex", offset_of!(ibv_cq, mutex)),
        ("off ibv_cq.cond", offset_of!(ibv_cq, cond)),
        (
            "off ibv_cq.comp_events_completed",
            offset_of!(ibv_cq, comp_events_completed),
        ),
        ("off ibv_srq.handle", offset_of!(ibv_srq, handle)),
        (
            "off ibv_srq.events_completed",
            offset_of!(ibv_srq, events_completed),
        ),
        ("off ibv_qp.srq", offset_of!(ibv_qp, srq)),
        ("off ibv_qp.qp_num", offset_of!(ibv_qp, qp_num)),
        ("off ibv_qp.state", offset_of!(ibv_qp, state)),
        ("off ibv_qp.qp_type", offset_of!(ibv_qp, qp_type)),
        ("off ibv_qp.mutex", offset_of!(ibv_qp, mutex)),
        (
            "off ibv_qp.events_completed",
            offset_of!(ibv_qp, events_completed),
        ),
        (
            "off ibv_device_attr.node_guid",
            offset_of!(ibv_device_attr, node_guid),
        ),
        (
            "off ibv_device_attr.max_qp",
            offset_of!(ibv_device_attr, max_qp),
        ),
        (
            "off ibv_device_attr.atomic_cap",
            offset_of!(ibv_device_attr, atomic_cap),
        ),
        (
            "off ibv_device_attr.max_srq_sge",
            offset_of!(ibv_device_attr, max_srq_sge),
        ),
        (
            "off ibv_device_attr.max_pkeys",
            offset_of!(ibv_device_attr, max_pkeys),
        ),
        (
            "off ibv_device_attr.phys_port_cnt",
            offset_of!(ibv_device_attr, phys_port_cnt),
        ),
        ("off ibv_port_attr.lid", offset_of!(ibv_port_attr, lid)),
        (
            "off ibv_port_attr.link_layer",
            offset_of!(ibv_port_attr, link_layer),
        ),
        (
            "off ibv_port_attr.port_cap_flags2",
            offset_of!(ibv_port_attr, port_cap_flags2),
        ),
        (
            "off ibv_qp_init_attr.cap",
            offset_of!(ibv_qp_init_attr, cap),
        ),
        (
            "off ibv_qp_init_attr.qp_type",
            offset_of!(ibv_qp_init_attr, qp_type),
        ),
        (
            "off ibv_qp_init_attr.sq_sig_all",
            offset_of!(ibv_qp_init_attr, sq_sig_all),
        ),
        (
            "off ibv_global_route.flow_label",
            offset_of!(ibv_global_route, flow_label),
        ),
        (
            "off ibv_global_route.traffic_class",
            offset_of!(ibv_global_route, traffic_class),
        ),
        ("off ibv_ah_attr.dlid", offset_of!(ibv_ah_attr, dlid)),
        (
            "off ibv_ah_attr.is_global",
            offset_of!(ibv_ah_attr, is_global),
        ),
        (
            "off ibv_ah_attr.port_num",
            offset_of!(ibv_ah_attr, port_num),
        ),
        (
            "off ibv_qp_attr.dest_qp_num",
            offset_of!(ibv_qp_attr, dest_qp_num),
        ),
        ("off ibv_qp_attr.cap", offset_of!(ibv_qp_attr, cap)),
        ("off ibv_qp_attr.ah_attr", offset_of!(ibv_qp_attr, ah_attr)),
        (
            "off ibv_qp_attr.alt_ah_attr",
            offset_of!(ibv_qp_attr, alt_ah_attr),
        ),
        (
            "off ibv_qp_attr.pkey_index",
            offset_of!(ibv_qp_attr, pkey_index),
        ),
        (
            "off ibv_qp_attr.min_rnr_timer",
            offset_of!(ibv_qp_attr, min_rnr_timer),
        ),
        (
            "off ibv_qp_attr.rnr_retry",
            offset_of!(ibv_qp_attr, rnr_retry),
        ),
        (
            "off ibv_qp_attr.rate_limit",
            offset_of!(ibv_qp_attr, rate_limit),
        ),
        ("off ibv_send_wr.num_sge", offset_of!(ibv_send_wr, num_sge)),
        ("off ibv_send_wr.opcode", offset_of!(ibv_send_wr, opcode)),
        (
            "off ibv_send_wr.send_flags",
            offset_of!(ibv_send_wr, send_flags),
        ),
        (
            "off ibv_send_wr.imm_data",
            offset_of!(ibv_send_wr, imm_data),
        ),
        (
            "off ibv_send_wr.wr.rdma.remote_addr",
            offset_of!(ibv_send_wr, wr),
        ),
        (
            "off ibv_send_wr.wr.rdma.rkey",
            offset_of!(ibv_send_wr, wr) + offset_of!(ibv_send_wr_wr, rkey_or_compare_add),
        ),
        ("off ibv_send_wr.qp_type", offset_of!(ibv_send_wr, qp_type)),
        ("off ibv_wc.status", offset_of!(ibv_wc, status)),
        ("off ibv_wc.byte_len", offset_of!(ibv_wc, byte_len)),
        ("off ibv_wc.imm_data", offset_of!(ibv_wc, imm_data)),
        ("off ibv_wc.src_qp", offset_of!(ibv_wc, src_qp)),
        ("off ibv_wc.wc_flags", offset_of!(ibv_wc, wc_flags)),
        ("off ibv_wc.slid", offset_of!(ibv_wc, slid)),
        (
            "off ibv_wc.dlid_path_bits",
            offset_of!(ibv_wc, dlid_path_bits),
        ),
        (
            "off ibv_srq_init_attr.attr",
            offset_of!(ibv_srq_init_attr, attr),
        ),
    ]
}
