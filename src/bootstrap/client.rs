//! A rank's side of the rendezvous.

use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use super::{connect_retry, recv, send};
use crate::error::{Error, Result};
use crate::proto::{Entry, Message, Role};

/// A rank's connection to the rendezvous server, from hello to bye.
#[derive(Debug)]
pub struct Session {
    stream: TcpStream,
    server: String,
    io_timeout: Duration,
    /// The mesh's epoch.
    pub epoch: u64,
    /// This rank's role.
    pub role: Role,
    /// This rank's rank.
    pub rank: u32,
    /// Every rank of the mesh.
    pub entries: Vec<Entry>,
    said_bye: bool,
}

/// A connection to the server on which the hello has not been sent yet:
/// the rank first learns its own address as the server sees it, so it can
/// bind its link listener there.
#[derive(Debug)]
pub struct Connecting {
    stream: TcpStream,
    server: String,
}

impl Connecting {
    /// Connects to the server, retrying until `timeout`.
    pub fn connect(server: &str, timeout: Duration) -> Result<Connecting> {
        let stream = connect_retry(server, timeout, "connect to scheduler")?;
        Ok(Connecting {
            stream,
            server: server.to_string(),
        })
    }

    /// The local IP this connection uses: the address peers on the same
    /// network can reach us at.
    pub fn local_ip(&self) -> Result<IpAddr> {
        self.stream
            .local_addr()
            .map(|a| a.ip())
            .map_err(|e| Error::io("local address of scheduler connection", e))
    }

    /// Sends the hello and waits (up to `timeout`) for the address book.
    pub fn join(
        mut self,
        hello: Message,
        io_timeout: Duration,
        timeout: Duration,
    ) -> Result<Session> {
        send(&mut self.stream, &hello, io_timeout, &self.server)?;
        match recv(&mut self.stream, timeout, &self.server)? {
            Message::AddressBook {
                epoch,
                role,
                rank,
                entries,
            } => Ok(Session {
                stream: self.stream,
                server: self.server,
                io_timeout,
                epoch,
                role,
                rank,
                entries,
                said_bye: false,
            }),
            Message::Refused { reason } => Err(Error::config(format!(
                "scheduler {} refused this rank: {reason}",
                self.server
            ))),
            other => Err(Error::BadFrame {
                peer: self.server,
                reason: format!("expected the address book, got {other:?}"),
            }),
        }
    }
}

impl Session {
    /// Waits (up to `timeout`) until every rank of the mesh reaches the barrier.
    pub fn barrier(&mut self, timeout: Duration) -> Result<()> {
        send(
            &mut self.stream,
            &Message::BarrierEnter { epoch: self.epoch },
            self.io_timeout,
            &self.server,
        )?;
        match recv(&mut self.stream, timeout, &self.server)? {
            Message::BarrierRelease { epoch } if epoch == self.epoch => Ok(()),
            other => Err(Error::BadFrame {
                peer: self.server.clone(),
                reason: format!("expected barrier release, got {other:?}"),
            }),
        }
    }

    /// Entries of one role, indexed by rank.
    pub fn peers(&self, role: Role) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.role == role)
            .cloned()
            .collect();
        v.sort_by_key(|e| e.rank);
        v
    }

    /// Tells the server we are leaving in order.
    pub fn bye(&mut self) {
        if !self.said_bye {
            self.said_bye = true;
            let _ = send(
                &mut self.stream,
                &Message::Bye,
                Duration::from_millis(500),
                &self.server,
            );
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.bye();
    }
}
