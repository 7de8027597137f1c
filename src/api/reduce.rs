//! Element-wise sums of combine partials: the reduce half of the
//! reduce-scatter. Sums are accumulated in f32, in FFN-rank order, so the
//! result does not depend on which partial arrived first.

use half::f16;

use crate::error::{Error, Result};

/// Element type of a reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// `"f32"`, `"f16"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Parses `f32`, `f16` or `bf16`.
    pub fn parse(s: &str) -> Result<Dtype> {
        match s {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::Bf16),
            _ => Err(Error::config(format!(
                "dtype {s:?}: expected f32, f16 or bf16"
            ))),
        }
    }
}

const CHUNK: usize = 512;

/// bfloat16 is the top half of an f32.
#[inline(always)]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Round to nearest even, NaN stays NaN; branch-light so the loop
/// vectorizes (same results as `half::bf16::from_f32`).
#[inline(always)]
fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet = ((bits >> 16) | 0x0040) as u16;
    if x.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// Writes the element-wise sum of `parts` (each `out.len()` bytes of
/// `dtype` values, little-endian) into `out`.
pub fn sum_into(dtype: Dtype, parts: &[&[u8]], out: &mut [u8]) -> Result<()> {
    let es = dtype.size();
    if out.len() % es != 0 {
        return Err(Error::BufferSize {
            what: format!(
                "sum output is not a whole number of {} elements",
                dtype.name()
            ),
            need: out.len().div_ceil(es) * es,
            got: out.len(),
        });
    }
    for (j, p) in parts.iter().enumerate() {
        if p.len() != out.len() {
            return Err(Error::BufferSize {
                what: format!("sum output for partial {j}"),
                need: p.len(),
                got: out.len(),
            });
        }
    }
    let n = out.len() / es;
    let mut acc = [0f32; CHUNK];
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        let acc = &mut acc[..len];
        acc.iter_mut().for_each(|a| *a = 0.0);
        for p in parts {
            let src = &p[start * es..(start + len) * es];
            match dtype {
                Dtype::F32 => {
                    for (a, c) in acc.iter_mut().zip(src.chunks_exact(4)) {
                        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                Dtype::F16 => {
                    for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
                        *a += f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
                Dtype::Bf16 => {
                    for (a, c) in acc.iter_mut().zip(src.chunks_exact(2)) {
                        *a += bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
            }
        }
        let dst = &mut out[start * es..(start + len) * es];
        match dtype {
            Dtype::F32 => {
                for (a, d) in acc.iter().zip(dst.chunks_exact_mut(4)) {
                    d.copy_from_slice(&a.to_le_bytes());
                }
            }
            Dtype::F16 => {
                for (a, d) in acc.iter().zip(dst.chunks_exact_mut(2)) {
                    d.copy_from_slice(&f16::from_f32(*a).to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for (a, d) in acc.iter().zip(dst.chunks_exact_mut(2)) {
                    d.copy_from_slice(&f32_to_bf16(*a).to_le_bytes());
                }
            }
        }
        start += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<T: Copy>(v: &[T], f: impl Fn(T) -> Vec<u8>) -> Vec<u8> {
        v.iter().flat_map(|x| f(*x)).collect()
    }

    #[test]
    fn sums_each_dtype() {
        let a = [1.0f32, -2.5, 1000.0];
        let b = [0.5f32, 2.5, 24.0];
        for dt in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            let e = |x: f32| match dt {
                Dtype::F32 => x.to_le_bytes().to_vec(),
                Dtype::F16 => f16::from_f32(x).to_le_bytes().to_vec(),
                Dtype::Bf16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
            };
            let (pa, pb) = (enc(&a, e), enc(&b, e));
            let mut out = vec![0u8; pa.len()];
            sum_into(dt, &[&pa, &pb], &mut out).unwrap();
            assert_eq!(out, enc(&[1.5f32, 0.0, 1024.0], e), "{dt:?}");
        }
    }

    #[test]
    fn bf16_conversion_matches_half() {
        use half::bf16;
        let samples = [
            0.0f32,
            -0.0,
            1.0,
            1.003_906_2,
            1.0039063,
            3.4e38,
            -3.4e38,
            f32::INFINITY,
            1e-40,
            65504.0,
            0.1,
        ];
        for x in samples
            .into_iter()
            .chain((0..10_000).map(|i| f32::from_bits(i * 429_497)))
        {
            assert_eq!(f32_to_bf16(x), bf16::from_f32(x).to_bits(), "{x:e}");
            let b = bf16::from_f32(x);
            assert_eq!(bf16_to_f32(b.to_bits()).to_bits(), b.to_f32().to_bits());
        }
        assert!(bf16::from_bits(f32_to_bf16(f32::NAN)).is_nan());
    }

    #[test]
    fn long_inputs_cross_chunks_and_sizes_are_checked() {
        let n = CHUNK * 2 + 3;
        let p: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let mut out = vec![0u8; p.len()];
        sum_into(Dtype::F32, &[&p, &p, &p], &mut out).unwrap();
        let last = f32::from_le_bytes(out[out.len() - 4..].try_into().unwrap());
        assert_eq!(last, 3.0 * (n - 1) as f32);
        let mut short = vec![0u8; 8];
        assert!(matches!(
            sum_into(Dtype::F32, &[&p], &mut short),
            Err(Error::BufferSize { .. })
        ));
        let mut odd = vec![0u8; 3];
        assert!(sum_into(Dtype::F16, &[], &mut odd).is_err());
    }
}
