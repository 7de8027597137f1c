//! `afmesh bench --sweep KEY=V1,V2,...`: which workload parameter a series
//! varies, and how each value applies to a point.

use anyhow::{Context, Result};

use crate::WorkloadArgs;

/// The key a sweep varies, and its values.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub key: SweepKey,
    pub values: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepKey {
    Tokens,
    Hidden,
    Attention,
    Ffn,
    Stages,
}

impl SweepKey {
    const ALL: [SweepKey; 5] = [
        SweepKey::Tokens,
        SweepKey::Hidden,
        SweepKey::Attention,
        SweepKey::Ffn,
        SweepKey::Stages,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SweepKey::Tokens => "tokens",
            SweepKey::Hidden => "hidden",
            SweepKey::Attention => "attention",
            SweepKey::Ffn => "ffn",
            SweepKey::Stages => "stages",
        }
    }

    pub fn apply(self, v: u32, wa: &mut WorkloadArgs, m: &mut u32, n: &mut u32) {
        match self {
            SweepKey::Tokens => wa.tokens = v,
            SweepKey::Hidden => wa.hidden = v,
            SweepKey::Attention => *m = v,
            SweepKey::Ffn => *n = v,
            SweepKey::Stages => wa.stages = v,
        }
    }
}

impl Sweep {
    /// `KEY=V1,V2,...`.
    pub fn parse(s: &str) -> Result<Sweep> {
        let names = || SweepKey::ALL.map(SweepKey::name).join(", ");
        let (k, vs) = s.split_once('=').with_context(|| {
            format!(
                "--sweep {s}: expected KEY=V1,V2,... with KEY one of {}",
                names()
            )
        })?;
        let key = SweepKey::ALL
            .into_iter()
            .find(|key| key.name() == k.trim())
            .with_context(|| {
                format!("--sweep {s}: unknown key {k}; expected one of {}", names())
            })?;
        let values = vs
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v > 0)
                    .with_context(|| format!("--sweep {s}: {v} is not a positive integer"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Sweep { key, values })
    }
}
