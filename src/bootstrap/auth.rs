//! Proving a cluster token on a connection without sending it.
//!
//! Every bootstrap connection (rank to scheduler, attention rank to FFN
//! rank) opens with a mutual challenge–response. Each side contributes a
//! fresh 32-byte nonce; each proves the token with
//! `HMAC-SHA256(token, label ‖ nonce_initiator ‖ nonce_acceptor)`, where the
//! label names its side, so one side's proof is never valid as the other's
//! and a recorded proof never verifies again. Proofs are compared in
//! constant time. The initiator proves first: the scheduler, which anyone
//! on the network may reach, computes no MAC for a stranger.
//!
//! A connection where exactly one side holds a token is refused, both
//! ways: a rank never joins an unauthenticated scheduler by accident.
//!
//! This keeps out strangers and ranks of other jobs. It does not encrypt or
//! protect the bytes that follow the handshake: it is not TLS.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{recv, send};
use crate::error::{Error, Result};
use crate::proto::bootstrap::{BOOTSTRAP_VERSION, MAC_LEN, NONCE_LEN};
use crate::proto::Message;

const INITIATOR: &[u8] = b"afmesh-auth-1 initiator";
const ACCEPTOR: &[u8] = b"afmesh-auth-1 acceptor";

/// A cluster token: a secret every rank and the scheduler of a job share.
/// Its `Debug` form does not show it.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl Token {
    /// A token from its text; surrounding whitespace is not part of it
    /// (so `AFMESH_TOKEN=$(cat f)` and `AFMESH_TOKEN_FILE=f` agree).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Token> {
        let b = secret.as_ref().trim_ascii();
        if b.is_empty() {
            return Err(Error::config("the cluster token is empty"));
        }
        Ok(Token(b.into()))
    }

    /// A token read from a file (its whole content, whitespace trimmed).
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Token> {
        let p = path.as_ref();
        let b = std::fs::read(p)
            .map_err(|e| Error::io(format!("read token file {}", p.display()), e))?;
        Token::new(b).map_err(|_| Error::config(format!("token file {} is empty", p.display())))
    }

    fn mac(
        &self,
        label: &[u8],
        initiator: &[u8; NONCE_LEN],
        acceptor: &[u8; NONCE_LEN],
    ) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        m.update(label);
        m.update(initiator);
        m.update(acceptor);
        m
    }

    fn prove(&self, label: &[u8], ni: &[u8; NONCE_LEN], na: &[u8; NONCE_LEN]) -> [u8; MAC_LEN] {
        self.mac(label, ni, na).finalize().into_bytes().into()
    }

    /// Constant-time check of a peer's proof.
    fn verify(
        &self,
        label: &[u8],
        ni: &[u8; NONCE_LEN],
        na: &[u8; NONCE_LEN],
        mac: &[u8; MAC_LEN],
    ) -> bool {
        self.mac(label, ni, na).verify_slice(mac).is_ok()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)
        .map_err(|e| Error::io("random nonce", std::io::Error::other(e.to_string())))?;
    Ok(n)
}

/// The connecting side's half of the handshake, on a fresh connection to
/// `peer`. A refusal or a peer that cannot prove the token is
/// [`Error::Auth`].
pub(crate) fn initiate(
    s: &mut TcpStream,
    token: Option<&Token>,
    timeout: Duration,
    peer: &str,
) -> Result<()> {
    let ni = nonce()?;
    send(
        s,
        &Message::Greeting {
            version: BOOTSTRAP_VERSION,
            nonce: ni,
            token: token.is_some(),
        },
        timeout,
        peer,
    )?;
    let na = match recv(s, timeout, peer)? {
        Message::Challenge { nonce } => nonce,
        other => return Err(unexpected(other, "a challenge", peer)),
    };
    let Some(t) = token else {
        return Ok(());
    };
    send(
        s,
        &Message::Proof {
            mac: t.prove(INITIATOR, &ni, &na),
        },
        timeout,
        peer,
    )?;
    match recv(s, timeout, peer)? {
        Message::Proof { mac } if t.verify(ACCEPTOR, &ni, &na, &mac) => Ok(()),
        Message::Proof { .. } => {
            let why = "its proof of the cluster token is wrong";
            let _ = send(
                s,
                &Message::AuthRefused {
                    reason: format!("the connecting rank rejected {why}"),
                },
                timeout,
                peer,
            );
            Err(Error::Auth(format!("{peer}: {why}")))
        }
        other => Err(unexpected(other, "a proof", peer)),
    }
}

/// The accepting side's half of the handshake; `me` names this side in
/// refusals (`"the scheduler"`, `"F0"`). A failed proof is [`Error::Auth`]
/// (the peer has been told why); anything else that is not the protocol is
/// another error.
pub(crate) fn accept(
    s: &mut TcpStream,
    token: Option<&Token>,
    timeout: Duration,
    me: &str,
    from: &str,
) -> Result<()> {
    let (ni, offered) = match recv(s, timeout, from) {
        Ok(Message::Greeting { nonce, token, .. }) => (nonce, token),
        Ok(other) => {
            return Err(Error::BadFrame {
                peer: from.to_string(),
                reason: format!("expected a greeting, got {}", other.kind()),
            })
        }
        Err(e @ Error::BadFrame { .. }) => {
            // Best effort: a rank of another version learns why (Refused
            // decodes in every version).
            let _ = send(
                s,
                &Message::Refused {
                    reason: e.to_string(),
                },
                timeout,
                from,
            );
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let refuse = |s: &mut TcpStream, reason: String| {
        let _ = send(
            s,
            &Message::AuthRefused {
                reason: reason.clone(),
            },
            timeout,
            from,
        );
        Err(Error::Auth(reason))
    };
    match (token, offered) {
        (Some(_), false) => {
            return refuse(
                s,
                format!("{me} requires the cluster token (AFMESH_TOKEN or AFMESH_TOKEN_FILE) and none was offered"),
            )
        }
        (None, true) => {
            return refuse(
                s,
                format!("{me} has no cluster token, but one was offered: give every rank and the scheduler the same token"),
            )
        }
        _ => {}
    }
    let na = nonce()?;
    send(s, &Message::Challenge { nonce: na }, timeout, from)?;
    let Some(t) = token else {
        return Ok(());
    };
    match recv(s, timeout, from)? {
        Message::Proof { mac } if t.verify(INITIATOR, &ni, &na, &mac) => {}
        Message::Proof { .. } => {
            return refuse(s, format!("wrong cluster token for {me}"));
        }
        other => {
            return Err(Error::BadFrame {
                peer: from.to_string(),
                reason: format!("expected a proof, got {}", other.kind()),
            })
        }
    }
    send(
        s,
        &Message::Proof {
            mac: t.prove(ACCEPTOR, &ni, &na),
        },
        timeout,
        from,
    )
}

fn unexpected(m: Message, want: &str, peer: &str) -> Error {
    match m {
        Message::AuthRefused { reason } => Error::Auth(format!("{peer}: {reason}")),
        Message::Refused { reason } => Error::config(format!("{peer} refused: {reason}")),
        other => Error::BadFrame {
            peer: peer.to_string(),
            reason: format!("expected {want}, got {}", other.kind()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    /// Runs both halves over loopback; returns (initiator, acceptor).
    fn pair(i: Option<&str>, a: Option<&str>) -> (Result<()>, Result<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = a.map(|s| Token::new(s).unwrap());
        let acceptor = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, a.as_ref(), T, "the scheduler", "rank")
        });
        let i = i.map(|s| Token::new(s).unwrap());
        let mut s = TcpStream::connect(addr).unwrap();
        let r = initiate(&mut s, i.as_ref(), T, "scheduler");
        (r, acceptor.join().unwrap())
    }

    #[test]
    fn same_token_and_no_token_pass() {
        let (i, a) = pair(Some("s3cret"), Some("s3cret"));
        assert!(i.is_ok() && a.is_ok(), "{i:?} {a:?}");
        let (i, a) = pair(None, None);
        assert!(i.is_ok() && a.is_ok(), "{i:?} {a:?}");
    }

    #[test]
    fn wrong_or_missing_token_is_auth_at_both_ends() {
        for (i, a, says) in [
            (Some("one"), Some("two"), "wrong cluster token"),
            (None, Some("two"), "requires the cluster token"),
            (Some("one"), None, "has no cluster token"),
        ] {
            let (ri, ra) = pair(i, a);
            match (&ri, &ra) {
                (Err(Error::Auth(m)), Err(Error::Auth(n))) => {
                    assert!(m.contains(says) && n.contains(says), "{m} / {n}");
                }
                _ => panic!("{i:?}/{a:?}: {ri:?} {ra:?}"),
            }
        }
    }

    #[test]
    fn proofs_are_bound_to_side_and_nonces() {
        let t = Token::new("k").unwrap();
        let (x, y) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = t.prove(INITIATOR, &x, &y);
        assert!(t.verify(INITIATOR, &x, &y, &p));
        assert!(
            !t.verify(ACCEPTOR, &x, &y, &p),
            "a proof is one side's only"
        );
        assert!(!t.verify(INITIATOR, &y, &x, &p), "nonces are ordered");
        assert!(!Token::new("k2").unwrap().verify(INITIATOR, &x, &y, &p));
    }

    #[test]
    fn token_text_is_trimmed_and_never_shown() {
        let t = Token::new("  abc\n").unwrap();
        assert_eq!(&*t.0, b"abc");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert!(Token::new(" \n").is_err());
    }
}
