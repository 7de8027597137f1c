//! Which batch a stream-ordered FFN rank's echo check waits for.

/// The batch (stage, layer) whose landing a stream-ordered FFN rank's
/// echo stream waits for, enqueued right after the rank answered stage
/// `s` (`layer_of[x]`: the layer of stage `x`'s next batch, counted when
/// batches are handed out). Normally that stage's own next batch: the
/// attention ranks need this answer before they send it, so the wait is
/// enqueued before its batch can land and every check exercises a real
/// wait. With few hardware queues (`few_queues`) a wait parked there
/// would hold up this rank's answers to the layer's other stages, which
/// the attention ranks need first (ARCHITECTURE.md, "Stream waits under
/// one hardware queue"): then the next stage's next batch, and only once
/// every stage is answered up to the layer before it. `None`: no wait.
pub(super) fn echo_target(
    s: u32,
    stages: u32,
    layer_of: &[u32],
    layers: u32,
    few_queues: bool,
) -> Option<(u32, u32)> {
    let (stage, guard) = if few_queues {
        ((s + 1) % stages.max(1), true)
    } else {
        (s, false)
    };
    let layer = *layer_of.get(stage as usize)?;
    let ready = !guard || layer_of.iter().all(|&l| l >= layer);
    (layer < layers && ready).then_some((stage, layer))
}

#[cfg(test)]
mod tests {
    use super::echo_target;

    #[test]
    fn echo_waits_for_the_same_stage_normally() {
        // 3 stages, layer 0 just answered through stage 1: stage 1's next
        // batch is layer 1's.
        assert_eq!(echo_target(1, 3, &[1, 1, 0], 4, false), Some((1, 1)));
        // One stage: its next layer, none after the last.
        assert_eq!(echo_target(0, 1, &[2], 4, false), Some((0, 2)));
        assert_eq!(echo_target(0, 1, &[4], 4, false), None);
    }

    #[test]
    fn echo_waits_for_the_next_stage_under_few_queues() {
        // Layer 0 answered through stage 1: stage 2's layer-0 batch.
        assert_eq!(echo_target(1, 3, &[1, 1, 0], 4, true), Some((2, 0)));
        // Layer 0 answered on every stage: stage 0's layer-1 batch.
        assert_eq!(echo_target(2, 3, &[1, 1, 1], 4, true), Some((0, 1)));
        // One stage: the same stage, as normally.
        assert_eq!(echo_target(0, 1, &[2], 4, true), Some((0, 2)));
        // The last layer answered: nothing more comes.
        assert_eq!(echo_target(2, 3, &[4, 4, 4], 4, true), None);
    }

    #[test]
    fn no_wait_parked_ahead_of_an_answer_still_owed() {
        // Stage 1's layer-0 batch was handed out (and answered) before
        // stage 0's: after answering stage 0 the next stage's next batch
        // is layer 1's, but stage 2 still owes its layer-0 answer, which
        // the attention ranks need before they send layer 1.
        assert_eq!(echo_target(0, 3, &[1, 1, 0], 4, true), None);
    }
}
