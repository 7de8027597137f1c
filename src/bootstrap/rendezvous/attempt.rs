//! One attempt at forming the job: who has joined, what each asked for,
//! whether a newcomer fits (the first mismatch named by rank and field),
//! and the ranks everyone gets.

use std::time::Duration;

use super::{Attempt, Joiner, Member};
use crate::bootstrap::send;
use crate::error::Peer;
use crate::proto::{Message, Role};

impl Attempt {
    pub(super) fn size(&self) -> String {
        match (&self.m, self.n) {
            (Some((m, _)), Some(n)) => format!("{m}A+{n}F"),
            _ => "?A+?F".into(),
        }
    }

    pub(super) fn full(&self) -> bool {
        let (Some((m, _)), Some(n)) = (&self.m, self.n) else {
            return false;
        };
        let a = self.count(Role::Attention);
        a == *m as usize && self.members.len() == (m + n) as usize
    }

    pub(super) fn count(&self, role: Role) -> usize {
        self.members
            .iter()
            .filter(|x| x.joiner.ask.role == role)
            .count()
    }

    /// `"; missing: A1, F0"` from the explicit ranks; empty when unknown.
    pub(super) fn missing(&self) -> String {
        let (Some((m, _)), Some(n)) = (&self.m, self.n) else {
            return String::new();
        };
        let mut gone = Vec::new();
        for (role, cap) in [(Role::Attention, *m), (Role::Ffn, n)] {
            let asked: Vec<u32> = self
                .members
                .iter()
                .filter(|x| x.joiner.ask.role == role)
                .filter_map(|x| x.joiner.ask.preferred_rank)
                .collect();
            let unnamed = self.count(role) - asked.len();
            let free: Vec<u32> = (0..cap).filter(|r| !asked.contains(r)).collect();
            // Ranks that asked for none fill the lowest free ones.
            gone.extend(free.iter().skip(unnamed).map(|&r| label(role, r)));
        }
        if gone.is_empty() {
            String::new()
        } else {
            format!("; missing: {}", gone.join(", "))
        }
    }

    pub(super) fn name(&self, i: usize) -> String {
        let (role, r) = self.rank_of(i);
        match (
            self.members[i].rank,
            self.members[i].joiner.ask.preferred_rank,
        ) {
            (None, None) => self.members[i].joiner.name(),
            _ => label(role, r),
        }
    }

    /// Member `i`'s rank: assigned, asked for, or what it would be
    /// assigned now.
    pub(super) fn rank_of(&self, i: usize) -> (Role, u32) {
        let mem = &self.members[i];
        let role = mem.joiner.ask.role;
        let r = mem
            .rank
            .or(mem.joiner.ask.preferred_rank)
            .unwrap_or_else(|| {
                let (m, n) = (self.m.as_ref().map_or(0, |x| x.0), self.n.unwrap_or(0));
                assign_ranks(&self.members, m, n)[i]
            });
        (role, r)
    }

    /// Why `j` cannot join this attempt, naming it and the field.
    pub(super) fn problem(&self, j: &Joiner) -> Option<String> {
        let who = j.name();
        let ask = &j.ask;
        if let Some((job, from)) = &self.job {
            if *job != ask.job {
                return Some(format!(
                    "{who} asked for job \"{}\", the job is \"{job}\" (set by {from})",
                    ask.job
                ));
            }
        }
        if ask.groups != self.groups {
            return Some(format!(
                "{who} expects {} instance groups, the job has {}: start every process with the same DMLC_GROUP_SIZE",
                ask.groups, self.groups
            ));
        }
        if ask.m == 0 || ask.n == 0 {
            return Some(format!(
                "{who} asked for a {}A+{}F mesh: a mesh needs at least one attention and one FFN rank",
                ask.m, ask.n
            ));
        }
        if let (Some((m, from)), Some(n)) = (&self.m, self.n) {
            if (*m, n) != (ask.m, ask.n) {
                return Some(format!(
                    "{who} expects a {}A+{}F mesh, the job is {m}A+{n}F (set by {from})",
                    ask.m, ask.n
                ));
            }
        }
        if let Some((g, from)) = &self.geometry {
            let h = &ask.geometry;
            let diffs: Vec<String> = [
                ("stages", h.stages, g.stages),
                ("max_tokens", h.max_tokens, g.max_tokens),
                ("row_bytes", h.row_bytes, g.row_bytes),
                ("out_row_bytes", h.out_row_bytes, g.out_row_bytes),
                ("side_bytes", h.side_bytes, g.side_bytes),
            ]
            .iter()
            .filter(|(_, mine, theirs)| mine != theirs)
            .map(|(field, mine, theirs)| format!("{field} {mine}, the job has {theirs}"))
            .collect();
            if !diffs.is_empty() {
                return Some(format!(
                    "{who} asked for {} (set by {from})",
                    diffs.join("; ")
                ));
            }
        }
        if let Some((l, from)) = &self.layout {
            if *l != ask.layout {
                return Some(format!(
                    "{who} asked for the {} stage layout, the job has {l} (set by {from})",
                    ask.layout
                ));
            }
        }
        // The mesh size is the job's by now.
        let role = ask.role;
        let cap = match role {
            Role::Attention => ask.m,
            Role::Ffn => ask.n,
        };
        if let Some(p) = ask.preferred_rank {
            if p >= cap {
                return Some(format!(
                    "an {role} rank (host {}, {}) asked for rank {p}, the job has {cap} {role} ranks (0..={})",
                    ask.host_id,
                    j.from,
                    cap - 1
                ));
            }
            if let Some(other) = self
                .members
                .iter()
                .find(|x| x.joiner.ask.role == role && x.joiner.ask.preferred_rank == Some(p))
            {
                return Some(format!(
                    "{who} is asked for twice: by host {} ({}) and by host {} ({})",
                    other.joiner.ask.host_id, other.joiner.from, ask.host_id, j.from
                ));
            }
        }
        if self.count(role) >= cap as usize {
            return Some(format!(
                "{who} is one {role} rank too many: all {cap} have joined"
            ));
        }
        None
    }
}

pub(super) fn label(role: Role, rank: u32) -> String {
    peer(role, rank).to_string()
}

pub(super) fn peer(role: Role, rank: u32) -> Peer {
    match role {
        Role::Attention => Peer::Attention(rank),
        Role::Ffn => Peer::Ffn(rank),
    }
}

pub(super) fn refuse(j: &mut Joiner, reason: &str) {
    let _ = send(
        &mut j.stream,
        &Message::Refused {
            reason: reason.to_string(),
        },
        Duration::from_secs(1),
        &j.from.to_string(),
    );
}

/// Ranks in join order: the asked-for rank (unique, checked at admission),
/// then the lowest free one.
pub(super) fn assign_ranks(members: &[Member], m: u32, n: u32) -> Vec<u32> {
    let mut ranks = vec![u32::MAX; members.len()];
    for role in [Role::Attention, Role::Ffn] {
        let cap = if role == Role::Attention { m } else { n } as usize;
        let mut taken = vec![false; cap];
        let mine: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].joiner.ask.role == role)
            .collect();
        for &i in &mine {
            if let Some(p) = members[i].joiner.ask.preferred_rank {
                if (p as usize) < cap && !taken[p as usize] {
                    taken[p as usize] = true;
                    ranks[i] = p;
                }
            }
        }
        for &i in &mine {
            if ranks[i] == u32::MAX {
                if let Some(free) = taken.iter().position(|t| !t) {
                    taken[free] = true;
                    ranks[i] = free as u32;
                }
            }
        }
    }
    ranks
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn joiner(role: Role, rank: Option<u32>, m: u32, n: u32, max_tokens: u32) -> Joiner {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        Joiner {
            from: stream.local_addr().unwrap(),
            stream,
            ask: Ask {
                job: "j".into(),
                group: 0,
                groups: 1,
                role,
                preferred_rank: rank,
                m,
                n,
                geometry: Geometry {
                    stages: 3,
                    max_tokens,
                    row_bytes: 1024,
                    out_row_bytes: 2048,
                    side_bytes: 0,
                },
                layout: StageLayout::Slots,
                host_id: "h".into(),
                endpoints: Vec::new(),
            },
        }
    }

    fn attempt_with(members: Vec<Joiner>) -> Attempt {
        let first = &members[0];
        let name = first.name();
        Attempt {
            groups: 1,
            m: Some((first.ask.m, name.clone())),
            n: Some(first.ask.n),
            job: Some((first.ask.job.clone(), name.clone())),
            geometry: Some((first.ask.geometry, name.clone())),
            layout: Some((first.ask.layout, name)),
            members: members
                .into_iter()
                .enumerate()
                .map(|(i, joiner)| Member {
                    id: i as u64,
                    joiner,
                    rank: None,
                    entered: false,
                    left: false,
                    report: None,
                    synced: [0; 3],
                    synced_all: [0; 3],
                })
                .collect(),
            deadline: Instant::now(),
            phase: Phase::Gathering,
        }
    }

    #[test]
    fn geometry_mismatch_names_the_rank_and_the_field() {
        let a = attempt_with(vec![joiner(Role::Ffn, Some(0), 2, 1, 128)]);
        let p = a
            .problem(&joiner(Role::Attention, Some(1), 2, 1, 64))
            .unwrap();
        assert_eq!(p, "A1 asked for max_tokens 64, the job has 128 (set by F0)");
    }

    #[test]
    fn a_group_count_mismatch_names_the_variable() {
        let a = attempt_with(vec![joiner(Role::Ffn, Some(0), 1, 1, 8)]);
        let mut j = joiner(Role::Attention, Some(0), 1, 1, 8);
        (j.ask.group, j.ask.groups) = (1, 2);
        let p = a.problem(&j).unwrap();
        assert!(
            p.contains("A0 of instance group 1 expects 2 instance groups, the job has 1")
                && p.contains("DMLC_GROUP_SIZE"),
            "{p}"
        );
    }

    #[test]
    fn layout_mismatch_names_the_rank_and_both_layouts() {
        let a = attempt_with(vec![joiner(Role::Ffn, Some(0), 2, 1, 128)]);
        let mut j = joiner(Role::Attention, Some(1), 2, 1, 128);
        j.ask.layout = StageLayout::Matrix;
        let p = a.problem(&j).unwrap();
        assert_eq!(
            p,
            "A1 asked for the matrix stage layout, the job has slots (set by F0)"
        );
    }

    #[test]
    fn a_rank_asked_for_twice_or_out_of_range_is_refused() {
        let a = attempt_with(vec![joiner(Role::Ffn, Some(0), 1, 2, 8)]);
        let p = a.problem(&joiner(Role::Ffn, Some(0), 1, 2, 8)).unwrap();
        assert!(p.starts_with("F0 is asked for twice"), "{p}");
        let p = a.problem(&joiner(Role::Ffn, Some(2), 1, 2, 8)).unwrap();
        assert!(
            p.contains("asked for rank 2, the job has 2 ffn ranks"),
            "{p}"
        );
        assert!(a.problem(&joiner(Role::Ffn, Some(1), 1, 2, 8)).is_none());
        assert!(a.problem(&joiner(Role::Ffn, None, 1, 2, 8)).is_none());
    }

    #[test]
    fn size_mismatch_and_surplus_are_named() {
        let a = attempt_with(vec![joiner(Role::Attention, Some(0), 1, 1, 8)]);
        let p = a.problem(&joiner(Role::Ffn, Some(0), 2, 1, 8)).unwrap();
        assert_eq!(p, "F0 expects a 2A+1F mesh, the job is 1A+1F (set by A0)");
        let p = a.problem(&joiner(Role::Attention, None, 1, 1, 8)).unwrap();
        assert!(p.contains("one attention rank too many"), "{p}");
    }

    #[test]
    fn unnamed_ranks_get_the_lowest_free_rank() {
        let a = attempt_with(vec![
            joiner(Role::Ffn, None, 1, 3, 8),
            joiner(Role::Ffn, Some(0), 1, 3, 8),
        ]);
        assert_eq!(assign_ranks(&a.members, 1, 3), vec![1, 0]);
        assert_eq!(a.rank_of(0), (Role::Ffn, 1));
        assert_eq!(a.missing(), "; missing: A0, F2");
    }
}
