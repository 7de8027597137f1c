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
            what: format!("sum output is not a whole number of {dtype:?} elements"),
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

    mod prop {
        use half::{bf16, f16};
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::select;

        use super::super::{sum_into, Dtype, CHUNK};

        /// Element bits in `dt`'s own encoding (the low 16 for f16, bf16).
        fn decode(dt: Dtype, bits: u32) -> f32 {
            match dt {
                Dtype::F32 => f32::from_bits(bits),
                Dtype::F16 => f16::from_bits(bits as u16).to_f32(),
                Dtype::Bf16 => bf16::from_bits(bits as u16).to_f32(),
            }
        }

        fn encode(dt: Dtype, x: f32) -> u32 {
            match dt {
                Dtype::F32 => x.to_bits(),
                Dtype::F16 => u32::from(f16::from_f32(x).to_bits()),
                Dtype::Bf16 => u32::from(bf16::from_f32(x).to_bits()),
            }
        }

        /// The little-endian bytes of `elems`, after `skew` bytes of junk so
        /// that the data starts at any alignment.
        fn bytes(dt: Dtype, elems: &[u32], skew: usize) -> Vec<u8> {
            let mut v = vec![0xa5; skew];
            for &e in elems {
                v.extend_from_slice(&e.to_le_bytes()[..dt.size()]);
            }
            v
        }

        /// The obvious loop, through `half`'s scalar conversions.
        fn reference(dt: Dtype, parts: &[Vec<u32>], i: usize) -> u32 {
            let mut acc = 0.0f32;
            for p in parts {
                acc += decode(dt, p[i]);
            }
            encode(dt, acc)
        }

        const SPECIAL: [f32; 18] = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40, // f32 subnormal, bf16 subnormal
            1.4e-45,
            6e-8,    // f16 smallest subnormal
            3.05e-5, // f16 subnormal
            6.1e-5,  // f16 smallest normal
            65504.0,
            65519.0, // rounds to f16 max
            65520.0, // rounds to f16 infinity
            1.0,
            1.000_977, // between f16 neighbours
            3.0e38,
        ];

        /// Any bit pattern (NaNs with payloads, subnormals, infinities),
        /// values close enough that sums round, and the edge cases.
        fn element(dt: Dtype) -> impl Strategy<Value = u32> {
            let mask = if dt == Dtype::F32 { u32::MAX } else { 0xffff };
            prop_oneof![
                3 => any::<u32>().prop_map(move |b| b & mask),
                2 => (-4096i32..4096).prop_map(move |i| encode(dt, i as f32 / 64.0)),
                1 => (select(&SPECIAL[..]), any::<bool>())
                    .prop_map(move |(x, neg)| encode(dt, if neg { -x } else { x })),
                1 => Just(if dt == Dtype::F32 { 0x7f80_0001 } else { 0x7c01 }),
            ]
        }

        /// A dtype, 1 to 8 partials of one length, and how far each is off
        /// alignment. Most lengths are short (the tail of a chunk); the
        /// rest run one chunk and a tail. Generating elements is what costs
        /// in a debug build, so longer inputs are left to the unit tests.
        fn case() -> impl Strategy<Value = (Dtype, Vec<Vec<u32>>, usize)> {
            let len = prop_oneof![3 => 0..=40usize, 1 => CHUNK - 8..=CHUNK + 40];
            (
                select(vec![Dtype::F32, Dtype::F16, Dtype::Bf16]),
                1..=8usize,
                len,
                0..4usize,
            )
                .prop_flat_map(|(dt, n, len, skew)| {
                    (Just(dt), vec(vec(element(dt), len), n), Just(skew))
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Bit for bit the reference, except that a NaN is only
            /// checked to be a NaN: which input's payload an f32 addition
            /// keeps is up to the compiler, which may swap the operands.
            #[test]
            fn sum_into_equals_the_scalar_reference((dt, parts, skew) in case()) {
                let es = dt.size();
                let len = parts[0].len();
                let owned: Vec<Vec<u8>> = parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| bytes(dt, p, (skew + j) % 4))
                    .collect();
                let refs: Vec<&[u8]> =
                    owned.iter().enumerate().map(|(j, b)| &b[(skew + j) % 4..]).collect();
                let want: Vec<u32> = (0..len).map(|i| reference(dt, &parts, i)).collect();
                let mut out_buf = vec![0u8; len * es + 3];
                let out = &mut out_buf[3 - skew % 4..][..len * es];
                sum_into(dt, &refs, out).unwrap();
                for (i, (got, &want)) in out.chunks_exact(es).zip(&want).enumerate() {
                    let mut b = [0u8; 4];
                    b[..es].copy_from_slice(got);
                    let got = u32::from_le_bytes(b);
                    if decode(dt, want).is_nan() {
                        prop_assert!(decode(dt, got).is_nan(), "{:?} [{}]: {:#x}", dt, i, got);
                    } else {
                        prop_assert_eq!(got, want, "{:?} [{}]", dt, i);
                    }
                }
            }
        }
    }
}
