//! StepMesh launch scripts, unchanged: every process configured from the
//! `DMLC_*` / `STEPMESH_GPU` environment alone (no flags), a scheduler
//! process started the way StepMesh starts one, and nodes of two
//! processes through `DMLC_GROUP_SIZE`, instance `g` of every node in
//! instance group `g`'s own mesh. Every process is killed on every path
//! out (`Proc` kills on drop).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{afmesh, Proc};

/// `afmesh <args>` with only the given configuration in its environment:
/// no `AFMESH_*`/`DMLC_*` inherited from the test's.
fn launch(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = afmesh();
    for (k, _) in std::env::vars() {
        if k.starts_with("AFMESH_") || k.starts_with("DMLC_") || k.starts_with("STEPMESH_") {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args);
    c
}

/// A small self-checking workload, one JSON line per rank.
const RUN: [&str; 12] = [
    "run", "--json", "--quiet", "--tokens", "4", "--hidden", "64", "--iters", "5", "--warmup", "1",
    "--stages",
];

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let rest = &json[json
        .find(&k)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + k.len()..];
    &rest[..rest.find([',', '}']).unwrap()]
}

/// Links of a rank's JSON line: each lists its `sent_bytes`, and so does
/// the rank once.
fn links(json: &str) -> usize {
    json.matches("\"sent_bytes\":").count() - 1
}

/// Waits for every rank; each exits 0 with zero verification errors, its
/// (role, rank) is the expected one, and it has the expected links.
fn check_ranks(ranks: &mut [(Proc, &str, u32, usize)]) {
    for (p, role, want, peers) in ranks.iter_mut() {
        let st = p.wait_exit(Duration::from_secs(60));
        let out = p.output();
        assert!(st.success(), "{}:\n{out}", p.name);
        let line = out
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{}: no JSON line:\n{out}", p.name));
        assert_eq!(json_field(line, "role"), format!("\"{role}\""), "{line}");
        assert_eq!(json_field(line, "rank"), want.to_string(), "{line}");
        assert_eq!(json_field(line, "errors"), "0", "{line}");
        assert_eq!(links(line), *peers, "{}: {line}", p.name);
    }
}

fn check_scheduler(s: &mut Proc, mesh: &str) {
    let st = s.wait_exit(Duration::from_secs(30));
    let out = s.output();
    assert!(st.success(), "scheduler:\n{out}");
    assert!(out.contains(&format!("{mesh} (epoch")), "scheduler:\n{out}");
}

/// StepMesh's launch with `DMLC_GROUP_SIZE=2`: two worker nodes and one
/// server node of two processes each, every process the same command
/// (`afmesh run`) told apart by `DMLC_ROLE`, `DMLC_NODE_RANK` and
/// `STEPMESH_GPU`, the scheduler included. As in StepMesh, instance `g`
/// of a node talks only to instance `g` of the others: two disjoint
/// 2A+1F meshes, ranked by node, each FFN rank linked to two workers
/// (not four), each worker to one server.
#[test]
fn two_instance_groups_form_two_meshes_from_dmlc_alone() {
    let port = free_port();
    let job = format!("stepmesh-a-{}", std::process::id());
    let base = vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", port),
        ("DMLC_NUM_WORKER", "2".into()),
        ("DMLC_NUM_SERVER", "1".into()),
        ("DMLC_GROUP_SIZE", "2".into()),
        ("AFMESH_JOB", job),
    ];
    let with = |extra: &[(&'static str, &str)]| {
        let mut e = base.clone();
        e.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        e
    };
    let mut run = RUN.to_vec();
    run.push("2");
    let mut sched = Proc::spawn(
        "scheduler",
        launch(&run, &with(&[("DMLC_ROLE", "scheduler")])),
    );
    sched.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let mut ranks = Vec::new();
    for (dmlc, role, node, peers) in [
        ("server", "ffn", 0u32, 2usize),
        ("worker", "attention", 0, 1),
        ("worker", "attention", 1, 1),
    ] {
        for gpu in [0u32, 1] {
            let env = with(&[
                ("DMLC_ROLE", dmlc),
                ("DMLC_NODE_RANK", &node.to_string()),
                ("STEPMESH_GPU", &gpu.to_string()),
            ]);
            let p = Proc::spawn(&format!("{dmlc} node {node} gpu {gpu}"), launch(&run, &env));
            ranks.push((p, role, node, peers));
        }
    }
    check_ranks(&mut ranks);
    check_scheduler(&mut sched, "2 instance groups, each a mesh 2A+1F");
}

/// A process whose `DMLC_GROUP_SIZE` differs from the scheduler's is
/// refused at once, naming the variable, instead of waiting out the setup
/// timeout.
#[test]
fn a_group_size_the_scheduler_does_not_share_is_refused() {
    let port = free_port();
    let base = vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", port),
        ("DMLC_NUM_WORKER", "1".into()),
        ("DMLC_NUM_SERVER", "1".into()),
        ("AFMESH_JOB", format!("stepmesh-c-{}", std::process::id())),
    ];
    let mut sched_env = base.clone();
    sched_env.extend([
        ("DMLC_ROLE", "scheduler".to_string()),
        ("DMLC_GROUP_SIZE", "2".into()),
    ]);
    let sched = Proc::spawn("scheduler", launch(&["scheduler"], &sched_env));
    sched.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    let mut env = base;
    env.extend([
        ("DMLC_ROLE", "worker".to_string()),
        ("STEPMESH_GPU", "0".into()),
        ("AFMESH_SETUP_TIMEOUT_MS", "20000".into()),
    ]);
    let mut p = Proc::spawn("worker", launch(&RUN[..11], &env));
    let st = p.wait_exit(Duration::from_secs(10));
    let out = p.output();
    assert!(!st.success(), "{out}");
    assert!(
        out.contains("expects 1 instance groups, the job has 2") && out.contains("DMLC_GROUP_SIZE"),
        "{out}"
    );
}

/// `afmesh scheduler` with no flags listens where `DMLC_PS_ROOT_URI` and
/// `DMLC_PS_ROOT_PORT` say and admits the counts the environment gives;
/// two worker nodes (`DMLC_NODE_RANK` 0 and 1) and a server node.
#[test]
fn afmesh_scheduler_listens_where_dmlc_says() {
    let port = free_port();
    let job = format!("stepmesh-b-{}", std::process::id());
    let base = vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", port.clone()),
        ("DMLC_NUM_WORKER", "2".into()),
        ("DMLC_NUM_SERVER", "1".into()),
        ("AFMESH_JOB", job),
    ];
    let with = |extra: &[(&'static str, &str)]| {
        let mut e = base.clone();
        e.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        e
    };
    let mut sched = Proc::spawn(
        "scheduler",
        launch(&["scheduler"], &with(&[("DMLC_ROLE", "scheduler")])),
    );
    let line = sched.wait_line(Duration::from_secs(10), |l| l.contains("listening on"));
    assert!(line.ends_with(&format!("127.0.0.1:{port}")), "{line}");
    let mut run = RUN.to_vec();
    run.push("2");
    let mut ranks = Vec::new();
    for (dmlc, role, node, peers) in [
        ("server", "ffn", 0u32, 2usize),
        ("worker", "attention", 0, 1),
        ("worker", "attention", 1, 1),
    ] {
        let env = with(&[("DMLC_ROLE", dmlc), ("DMLC_NODE_RANK", &node.to_string())]);
        let p = Proc::spawn(&format!("{dmlc} node {node}"), launch(&run, &env));
        ranks.push((p, role, node, peers));
    }
    check_ranks(&mut ranks);
    check_scheduler(&mut sched, "mesh 2A+1F");
}

/// A rank past the mesh is refused at once, naming the terms of
/// StepMesh's formula, instead of waiting out the setup timeout.
#[test]
fn a_rank_past_the_group_is_refused_by_name() {
    let env = vec![
        ("DMLC_PS_ROOT_URI", "127.0.0.1".to_string()),
        ("DMLC_PS_ROOT_PORT", "9".into()),
        ("DMLC_NUM_WORKER", "1".into()),
        ("DMLC_NUM_SERVER", "1".into()),
        ("DMLC_GROUP_SIZE", "2".into()),
        ("DMLC_ROLE", "worker".into()),
        ("STEPMESH_GPU", "2".into()),
    ];
    let mut p = Proc::spawn("worker gpu 2", launch(&RUN[..11], &env));
    let st = p.wait_exit(Duration::from_secs(10));
    let out = p.output();
    assert!(!st.success(), "{out}");
    // Instance rank 2 is group 0's rank 1, past its 1 worker node.
    assert!(
        out.contains("STEPMESH_GPU 2") && out.contains("1 attention ranks"),
        "{out}"
    );
}

/// Where the environment's address cannot be bound here, `afmesh
/// scheduler` says where the address came from and how to override it.
#[test]
fn an_unbindable_root_uri_is_named() {
    let env = vec![
        // TEST-NET-1: never an address of this host.
        ("DMLC_PS_ROOT_URI", "192.0.2.1".to_string()),
        ("DMLC_PS_ROOT_PORT", "8123".into()),
    ];
    let mut p = Proc::spawn("scheduler", launch(&["scheduler"], &env));
    let st = p.wait_exit(Duration::from_secs(10));
    let out = p.output();
    assert!(!st.success(), "{out}");
    assert!(
        out.contains("192.0.2.1:8123")
            && out.contains("DMLC_PS_ROOT_URI")
            && out.contains("--bind"),
        "{out}"
    );
}
