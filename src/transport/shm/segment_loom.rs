//! Model checking of the doorbell: `scripts/loom` runs these under every
//! interleaving and every value a load may see (within a bound on
//! preemptions). The code under test is production's: `Ring` and
//! `Bell::{bump, count_external, park}`, over loom's memory; only the
//! futex is a stand-in.

use super::super::ring::{model::ModelSlots, Ring};
use super::*;
use crate::sync::AtomicU32 as ModelWord;
use crate::transport::notice::Notice;
use loom::sync::{Condvar, Mutex};

/// The control page's three words.
struct Words {
    sleeping: ModelWord,
    bell: ModelWord,
    external: ModelWord,
}

impl Words {
    fn new() -> Arc<Words> {
        Arc::new(Words {
            sleeping: ModelWord::new(0),
            bell: ModelWord::new(0),
            external: ModelWord::new(0),
        })
    }

    fn bell(&self) -> Bell<'_, ModelWord> {
        Bell {
            sleeping: &self.sleeping,
            bell: &self.bell,
            external: &self.external,
        }
    }
}

/// A futex as the kernel keeps one: `wait` sleeps only if the word
/// still holds `seen` when checked under the lock that `wake` takes,
/// and then until a `wake`. No timeout: a consumer that sleeps and is
/// never rung stays asleep, and loom reports the model deadlocked.
struct Futex {
    lock: Mutex<()>,
    woken: Condvar,
}

impl Futex {
    fn new() -> Arc<Futex> {
        Arc::new(Futex {
            lock: Mutex::new(()),
            woken: Condvar::new(),
        })
    }

    fn wait(&self, word: &ModelWord, seen: u32) {
        let g = self.lock.lock().unwrap();
        if word.load(Ordering::Relaxed) == seen {
            drop(self.woken.wait(g).unwrap());
        }
    }

    fn wake(&self) {
        let _g = self.lock.lock().unwrap();
        self.woken.notify_all();
    }
}

const NOTICE: Notice = Notice {
    region: 0,
    offset: 64,
    len: 8,
    imm: Some(7),
    close: false,
};

/// A producer pushes one notice and rings (`Segment::ring_doorbell`)
/// while the consumer parks as `ShmTransport::poll` does, until it has
/// the notice. The lost wakeup (the consumer's re-check misses the push
/// and the producer misses `sleeping`, so the consumer sleeps unrung)
/// shows as a deadlock.
#[test]
fn doorbell_never_misses_a_push() {
    loom::model(|| {
        let slots = ModelSlots::new(2);
        let mut producer = Ring::over(slots.clone());
        let consumer = Ring::over(slots);
        let (words, futex) = (Words::new(), Futex::new());
        let t = {
            let (words, futex) = (words.clone(), futex.clone());
            loom::thread::spawn(move || {
                assert!(producer.push(&NOTICE.encode()));
                if words.bell().bump() {
                    futex.wake();
                }
            })
        };
        let mut got = None;
        while got.is_none() {
            words.bell().park(
                || {
                    got = consumer.pop();
                    got.is_some()
                },
                |word, seen| futex.wait(word, seen),
            );
        }
        t.join().unwrap();
        assert_eq!(got.map(|b| Notice::decode(&b)), Some(Ok(NOTICE)));
    });
}

/// As above for another backend's event (`Doorbell::ring`, which a
/// tcp reader calls): a parked consumer always learns of it.
#[test]
fn doorbell_never_misses_an_external_event() {
    loom::model(|| {
        let (words, futex) = (Words::new(), Futex::new());
        let t = {
            let (words, futex) = (words.clone(), futex.clone());
            loom::thread::spawn(move || {
                if words.bell().count_external() {
                    futex.wake();
                }
            })
        };
        // ShmTransport::external_changed, from a count of 0.
        let mut changed = false;
        while !changed {
            words.bell().park(
                || {
                    changed = words.bell().external() != 0;
                    changed
                },
                |word, seen| futex.wait(word, seen),
            );
        }
        t.join().unwrap();
    });
}
