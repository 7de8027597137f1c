//! Unit tests of the configuration: the environment, DMLC_* names, refusals.

use super::*;
use std::collections::HashMap;

fn cfg(vars: &[(&str, &str)]) -> Result<MeshConfig> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    MeshConfig::from_lookup(|k| m.get(k).cloned())
}

#[test]
fn dmlc_names_work() {
    let c = cfg(&[
        ("DMLC_ROLE", "server"),
        ("DMLC_PS_ROOT_URI", "10.0.0.1"),
        ("DMLC_PS_ROOT_PORT", "8123"),
        ("DMLC_NUM_WORKER", "2"),
        ("DMLC_NUM_SERVER", "4"),
        ("DMLC_NODE_RANK", "1"),
    ])
    .unwrap();
    assert_eq!(c.scheduler, "10.0.0.1:8123");
    assert_eq!(
        (c.attention, c.ffn, c.rank, c.role),
        (2, 4, Some(1), Some(Role::Ffn))
    );
}

#[test]
fn afmesh_names_win() {
    let c = cfg(&[
        ("AFMESH_SCHEDULER", "h:1"),
        ("DMLC_PS_ROOT_URI", "x"),
        ("AFMESH_NUM_ATTENTION", "3"),
        ("DMLC_NUM_WORKER", "9"),
        ("AFMESH_NUM_FFN", "1"),
        ("AFMESH_ROLE", "attention"),
        ("AFMESH_POLL", "spin"),
    ])
    .unwrap();
    assert_eq!((c.scheduler.as_str(), c.attention, c.ffn), ("h:1", 3, 1));
    assert_eq!(c.poll, PollPolicy::Spin);
}

#[test]
fn transport_and_cpu() {
    let base = [
        ("AFMESH_SCHEDULER", "h:1"),
        ("AFMESH_NUM_ATTENTION", "1"),
        ("AFMESH_NUM_FFN", "1"),
    ];
    let with = |extra: (&str, &str)| {
        let mut v = base.to_vec();
        v.push(extra);
        cfg(&v)
    };
    assert_eq!(
        with(("AFMESH_TRANSPORT", "shm")).unwrap().transport,
        TransportKind::Shm
    );
    assert_eq!(with(("AFMESH_CPU", "1")).unwrap().cpu, Some(1));
    let e = with(("AFMESH_TRANSPORT", "pigeon"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("AFMESH_TRANSPORT") && e.contains("pigeon"),
        "{e}"
    );
    let e = with(("AFMESH_CPU", "first")).unwrap_err().to_string();
    assert!(e.contains("AFMESH_CPU"), "{e}");
    assert_eq!(cfg(&base).unwrap().transport, TransportKind::Auto);
}

#[test]
fn token_from_the_environment_or_a_file() {
    let base = [
        ("AFMESH_SCHEDULER", "h:1"),
        ("AFMESH_NUM_ATTENTION", "1"),
        ("AFMESH_NUM_FFN", "1"),
    ];
    let with = |extra: &[(&str, &str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        cfg(&v)
    };
    assert!(with(&[]).unwrap().token.is_none());
    let c = with(&[("AFMESH_TOKEN", "s3cret")]).unwrap();
    assert!(c.token.is_some());
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "Debug hides the token"
    );
    let path = std::env::temp_dir().join(format!("afmesh-token-{}", std::process::id()));
    std::fs::write(&path, "s3cret\n").unwrap();
    let p = path.to_string_lossy().into_owned();
    assert!(with(&[("AFMESH_TOKEN_FILE", &p)]).unwrap().token.is_some());
    let e = with(&[("AFMESH_TOKEN_FILE", &p), ("AFMESH_TOKEN", "x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("both set"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = with(&[("AFMESH_TOKEN_FILE", &p)]).unwrap_err().to_string();
    assert!(e.contains("AFMESH_TOKEN_FILE") && e.contains(&p), "{e}");
    let e = with(&[("AFMESH_TOKEN", " ")]).unwrap_err().to_string();
    assert!(e.contains("AFMESH_TOKEN") && e.contains("empty"), "{e}");
}

#[test]
fn errors_name_the_variable() {
    let e = cfg(&[("AFMESH_SCHEDULER", "h:1"), ("AFMESH_NUM_FFN", "1")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("AFMESH_NUM_ATTENTION") && e.contains("DMLC_NUM_WORKER"),
        "{e}"
    );
    let e = cfg(&[
        ("AFMESH_SCHEDULER", "h:1"),
        ("DMLC_NUM_WORKER", "two"),
        ("AFMESH_NUM_FFN", "1"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("DMLC_NUM_WORKER=\"two\""), "{e}");
    let e = cfg(&[
        ("AFMESH_SCHEDULER", "h:1"),
        ("DMLC_NUM_WORKER", "1"),
        ("AFMESH_NUM_FFN", "1"),
        ("DMLC_ROLE", "coordinator"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("DMLC_ROLE") && e.contains("scheduler"), "{e}");
    let e = cfg(&[("DMLC_PS_ROOT_URI", "h")]).unwrap_err().to_string();
    assert!(e.contains("DMLC_PS_ROOT_PORT"), "{e}");
    let e = cfg(&[("DMLC_PS_ROOT_URI", "h"), ("DMLC_PS_ROOT_PORT", "70000")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("DMLC_PS_ROOT_PORT=70000"), "{e}");
}

const STEPMESH: [(&str, &str); 5] = [
    ("DMLC_PS_ROOT_URI", "10.0.0.1"),
    ("DMLC_PS_ROOT_PORT", "8123"),
    ("DMLC_NUM_WORKER", "2"),
    ("DMLC_NUM_SERVER", "1"),
    ("DMLC_GROUP_SIZE", "4"),
];

fn stepmesh(extra: &[(&str, &str)]) -> Result<MeshConfig> {
    let mut v = STEPMESH.to_vec();
    v.extend_from_slice(extra);
    cfg(&v)
}

#[test]
fn stepmesh_groups_are_meshes_of_nodes() {
    // 2 worker nodes and 1 server node of 4 processes each: 4 meshes of
    // 2A+1F, instance g of every node in mesh g, ranked by node.
    let c = stepmesh(&[
        ("DMLC_ROLE", "worker"),
        ("DMLC_NODE_RANK", "1"),
        ("STEPMESH_GPU", "3"),
    ])
    .unwrap();
    assert_eq!((c.attention, c.ffn, c.group_size), (2, 1, 4));
    assert_eq!(
        (c.role, c.group, c.rank),
        (Some(Role::Attention), 3, Some(1))
    );
    // The offset shifts the instance rank (1 + 2 = 3: group 3, node 0);
    // node rank defaults to 0 like fserver's.
    let c = stepmesh(&[
        ("DMLC_ROLE", "server"),
        ("STEPMESH_GPU", "1"),
        ("DMLC_RANK_OFFSET", "2"),
    ])
    .unwrap();
    assert_eq!((c.role, c.group, c.rank), (Some(Role::Ffn), 3, Some(0)));
    // DMLC_INSTANCE_ID must agree with the group.
    let ok = [
        ("DMLC_ROLE", "server"),
        ("STEPMESH_GPU", "2"),
        ("DMLC_INSTANCE_ID", "2"),
    ];
    assert_eq!(stepmesh(&ok).unwrap().group, 2);
    let e = stepmesh(&[
        ("DMLC_ROLE", "server"),
        ("STEPMESH_GPU", "2"),
        ("DMLC_INSTANCE_ID", "1"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("DMLC_INSTANCE_ID=1") && e.contains("instance group 2"),
        "{e}"
    );
    // None of the three: a group of one lets the scheduler pick; a larger
    // group cannot place the process.
    let one = [("DMLC_ROLE", "server"), ("DMLC_GROUP_SIZE", "1")];
    assert_eq!(stepmesh(&one).unwrap().rank, None);
    let e = stepmesh(&[("DMLC_ROLE", "server")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DMLC_GROUP_SIZE=4") && e.contains("STEPMESH_GPU"),
        "{e}"
    );
    // A rank past the mesh names every term.
    let e = stepmesh(&[
        ("DMLC_ROLE", "server"),
        ("DMLC_NODE_RANK", "1"),
        ("STEPMESH_GPU", "0"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("rank 1")
            && e.contains("DMLC_GROUP_SIZE 4 × DMLC_NODE_RANK 1")
            && e.contains("1 ffn ranks"),
        "{e}"
    );
    let e = stepmesh(&[("DMLC_GROUP_SIZE", "0")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("DMLC_GROUP_SIZE=0"), "{e}");
    let e = stepmesh(&[("STEPMESH_GPU", "gpu0")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("STEPMESH_GPU=\"gpu0\""), "{e}");
}

#[test]
fn afmesh_names_keep_their_meaning_beside_a_group() {
    let c = stepmesh(&[
        ("AFMESH_NUM_ATTENTION", "3"),
        ("AFMESH_RANK", "2"),
        ("DMLC_NODE_RANK", "5"),
        ("STEPMESH_GPU", "1"),
        ("AFMESH_ROLE", "attention"),
    ])
    .unwrap();
    // The mesh's size and the rank in it, as set; the group from DMLC_*.
    assert_eq!((c.attention, c.ffn, c.rank, c.group), (3, 1, Some(2), 1));
}

#[test]
fn the_scheduler_role_is_reported_and_configures_the_server() {
    let c = stepmesh(&[("DMLC_ROLE", "scheduler")]).unwrap();
    assert!(c.is_scheduler);
    assert_eq!(c.role, None);
    let s = c.scheduler_config();
    assert_eq!((s.attention, s.ffn, s.groups), (Some(2), Some(1), 4));
    assert_eq!(c.scheduler, "10.0.0.1:8123");
    // Joining as a rank says what the process is instead.
    let e = crate::Mesh::new(c.clone())
        .join(crate::StageSpec {
            stages: 1,
            max_tokens: 1,
            row_bytes: 8,
            out_row_bytes: 8,
            side_bytes: 0,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("configured as the scheduler"), "{e}");
    assert!(
        cfg(&[
            ("AFMESH_ROLE", "scheduler"),
            ("AFMESH_SCHEDULER", "h:1"),
            ("AFMESH_NUM_ATTENTION", "1"),
            ("AFMESH_NUM_FFN", "1"),
        ])
        .unwrap()
        .is_scheduler
    );
}

#[test]
fn a_standalone_scheduler_reads_what_is_set() {
    let look = |vars: &[(&str, &str)]| {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        MeshConfig::scheduler_from_lookup(|k| m.get(k).cloned())
    };
    let s = look(&[]).unwrap();
    assert!(s.addr.is_none() && s.attention.is_none() && s.ffn.is_none());
    let s = look(&STEPMESH).unwrap();
    assert_eq!(s.addr.as_deref(), Some("10.0.0.1:8123"));
    assert_eq!((s.attention, s.ffn, s.groups), (Some(2), Some(1), 4));
    let s = look(&[
        ("AFMESH_SCHEDULER", "127.0.0.1:9"),
        ("DMLC_PS_ROOT_URI", "x"),
    ])
    .unwrap();
    assert_eq!(s.addr.as_deref(), Some("127.0.0.1:9"));
    let s = look(&[("DMLC_PS_ROOT_URI", "fe80::1"), ("DMLC_PS_ROOT_PORT", "7")]).unwrap();
    assert_eq!(s.addr.as_deref(), Some("[fe80::1]:7"));
    let e = look(&[("DMLC_PS_ROOT_PORT", "7")]).unwrap_err().to_string();
    assert!(e.contains("DMLC_PS_ROOT_URI"), "{e}");
}

#[test]
fn zero_timeouts_are_refused_by_name() {
    for var in ["AFMESH_IO_TIMEOUT_MS", "AFMESH_SETUP_TIMEOUT_MS"] {
        let e = cfg(&[
            ("AFMESH_SCHEDULER", "h:1"),
            ("AFMESH_NUM_ATTENTION", "1"),
            ("AFMESH_NUM_FFN", "1"),
            (var, "0"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains(var) && e.contains("at least 1 ms"), "{e}");
        let c = cfg(&[
            ("AFMESH_SCHEDULER", "h:1"),
            ("AFMESH_NUM_ATTENTION", "1"),
            ("AFMESH_NUM_FFN", "1"),
            (var, "1"),
        ])
        .unwrap();
        assert_eq!(c.io_timeout.min(c.setup_timeout), Duration::from_millis(1));
    }
}

#[test]
fn the_stage_layout_comes_from_afmesh_layout() {
    let base = [
        ("AFMESH_SCHEDULER", "h:1"),
        ("AFMESH_NUM_ATTENTION", "2"),
        ("AFMESH_NUM_FFN", "2"),
    ];
    assert_eq!(cfg(&base).unwrap().layout, StageLayout::Slots);
    for (v, want) in [
        ("matrix", StageLayout::Matrix),
        ("slots", StageLayout::Slots),
    ] {
        let mut vars = base.to_vec();
        vars.push(("AFMESH_LAYOUT", v));
        assert_eq!(cfg(&vars).unwrap().layout, want);
    }
    let mut vars = base.to_vec();
    vars.push(("AFMESH_LAYOUT", "rows"));
    let e = cfg(&vars).unwrap_err().to_string();
    assert!(
        e.contains("AFMESH_LAYOUT=\"rows\"") && e.contains("slots or matrix"),
        "{e}"
    );
}
