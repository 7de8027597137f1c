//! Unit tests of the stage machines.

use super::*;

#[test]
fn attention_cycle_and_busy() {
    let mut a = AttentionStages::new(3, 2);
    assert!(a.is_idle(1) && !a.is_idle(3));
    assert_eq!(a.dispatch(1, 5), Some(0));
    assert!(!a.is_idle(1));
    assert_eq!(a.dispatch(1, 5), None, "busy");
    assert_eq!(a.on_combine(1, 0, 0, 5), Ok(false));
    assert_eq!(a.on_combine(1, 0, 0, 5), Err(Reject::Duplicate));
    assert_eq!(a.missing(1), vec![1]);
    assert_eq!(a.on_combine(1, 1, 0, 4), Err(Reject::WrongTokens));
    assert_eq!(a.on_combine(1, 1, 0, 5), Ok(true));
    assert_eq!(
        a.dispatch(1, 5),
        None,
        "combined but not taken is still busy"
    );
    assert!(a.finish(1));
    assert!(a.is_idle(1));
    assert_eq!(a.on_combine(1, 1, 0, 5), Err(Reject::Stale));
    assert_eq!(a.dispatch(1, 7), Some(1));
    assert_eq!(a.on_combine(1, 0, 2, 7), Err(Reject::Ahead));
    assert_eq!(a.on_combine(1, 2, 1, 7), Err(Reject::NoSuchPeer));
    assert_eq!(a.on_combine(9, 0, 1, 7), Err(Reject::NoSuchStage));
}

#[test]
fn attention_abandon_makes_late_arrivals_stale() {
    let mut a = AttentionStages::new(1, 2);
    a.dispatch(0, 1);
    a.on_combine(0, 0, 0, 1).unwrap();
    a.abandon(0);
    assert_eq!(a.on_combine(0, 1, 0, 1), Err(Reject::Stale));
    assert_eq!(a.dispatch(0, 1), Some(1));
}

#[test]
fn ffn_cycle_oldest_first() {
    let mut f = FfnStages::new(3, 2);
    // Stage 2 completes first, then stage 0: stage 0 is still oldest by stage index.
    f.on_dispatch(2, 0, 0, 3).unwrap();
    assert_eq!(f.on_dispatch(2, 1, 0, 4), Ok(true));
    assert_eq!(f.oldest_complete(), Some(2));
    f.on_dispatch(0, 1, 0, 0).unwrap();
    assert_eq!(f.on_dispatch(0, 1, 0, 0), Err(Reject::Duplicate));
    assert_eq!(f.on_dispatch(0, 0, 0, 9), Ok(true));
    assert_eq!(f.oldest_complete(), Some(0));
    let (seq, toks) = f.hand_out(0).unwrap();
    assert_eq!((seq, toks), (0, vec![9, 0]));
    assert!(f.is_handed_out(0, 0) && !f.is_handed_out(0, 1) && !f.is_handed_out(2, 0));
    assert!(f.hand_out(0).is_none());
    assert_eq!(f.oldest_complete(), Some(2));
    assert!(f.respond(0, 0));
    assert!(!f.respond(0, 0));
    assert!(!f.is_handed_out(0, 0));
    assert_eq!(f.on_dispatch(0, 0, 0, 1), Err(Reject::Stale));
    assert_eq!(f.on_dispatch(0, 0, 2, 1), Err(Reject::Ahead));
    // Stage 0 at seq 1 completing is younger than stage 2 at seq 0.
    f.on_dispatch(0, 0, 1, 1).unwrap();
    f.on_dispatch(0, 1, 1, 1).unwrap();
    assert_eq!(f.oldest_complete(), Some(2));
    assert!(f.needs(0) && f.needs(1));
}

#[test]
fn ffn_missing_names_the_laggard() {
    let mut f = FfnStages::new(1, 3);
    f.on_dispatch(0, 0, 0, 1).unwrap();
    f.on_dispatch(0, 2, 0, 1).unwrap();
    assert_eq!(f.missing(), vec![1]);
}

/// `admits` gives exactly `count`'s verdict, without counting: over
/// every (stage, peer, sequence, tokens) around the live ones, at each
/// point of a few cycles.
#[test]
fn admits_agrees_with_count() {
    fn probe<C: StageCounter + Clone>(c: &C) {
        for stage in 0..3 {
            for from in 0..3 {
                for seq in 0..4u32 {
                    for tokens in [4u32, 5] {
                        let mut copy = c.clone();
                        let counted = copy.count(stage, from, seq, tokens).map(|_| ());
                        assert_eq!(c.admits(stage, from, seq, tokens), counted);
                    }
                }
            }
        }
    }
    let mut a = AttentionStages::new(2, 2);
    let mut f = FfnStages::new(2, 2);
    probe(&a);
    probe(&f);
    for round in 0..2u32 {
        a.dispatch(0, 5);
        probe(&a);
        a.on_combine(0, 1, round, 5).unwrap();
        probe(&a);
        a.on_combine(0, 0, round, 5).unwrap();
        probe(&a);
        a.finish(0);
        f.on_dispatch(1, 0, round, 4).unwrap();
        probe(&f);
        f.on_dispatch(1, 1, round, 4).unwrap();
        probe(&f);
        f.hand_out(1);
        probe(&f);
        f.respond(1, round);
        probe(&f);
    }
}

#[test]
fn counts_of_complete_batches_and_combines_follow_the_stages() {
    let mut f = FfnStages::new(2, 2);
    assert_eq!((f.complete_through(1), f.next_batch(1)), (Some(0), Some(0)));
    assert_eq!(f.on_dispatch(1, 0, 0, 3), Ok(false));
    assert_eq!(f.complete_through(1), Some(0));
    assert_eq!(f.on_dispatch(1, 1, 0, 3), Ok(true));
    assert_eq!((f.complete_through(1), f.next_batch(1)), (Some(1), Some(0)));
    assert!(f.hand_out(1).is_some());
    assert_eq!((f.complete_through(1), f.next_batch(1)), (Some(1), Some(1)));
    assert!(f.respond(1, 0));
    assert_eq!((f.complete_through(1), f.next_batch(1)), (Some(1), Some(1)));
    assert_eq!((f.complete_through(0), f.next_batch(0)), (Some(0), Some(0)));
    assert_eq!(f.complete_through(2), None);

    let mut a = AttentionStages::new(1, 1);
    assert_eq!(a.combined_through(0), Some(0));
    assert_eq!(a.dispatch(0, 4), Some(0));
    assert_eq!(a.combined_through(0), Some(0));
    assert_eq!(a.on_combine(0, 0, 0, 4), Ok(true));
    assert_eq!(a.combined_through(0), Some(1));
    assert!(a.finish(0));
    assert_eq!(a.combined_through(0), Some(1));
    assert_eq!(a.combined_through(1), None);
}
