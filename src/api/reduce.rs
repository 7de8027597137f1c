//! Element-wise sums of combine partials: the reduce half of the
//! reduce-scatter. Sums are accumulated in f32, in FFN-rank order, so the
//! result does not depend on which partial arrived first; f16 and bf16 are
//! rounded once, to nearest even, when the sum is stored, with the same bits
//! as `half`'s `from_f32` (NaN stays NaN, overflow goes to infinity,
//! subnormals are kept).
//!
//! The sum sits on the combine path, so it is written to run at memory
//! speed: the output is walked in chunks small enough that an f32
//! accumulator for one chunk stays in L1, every partial's slice of the chunk
//! is added into it, and the chunk is rounded and stored once, so each byte
//! of input is read once and each byte of output written once. The inner
//! loops are plain loops over slices, conversions included, which LLVM
//! vectorises; `pulp` compiles them once more for AVX2 and AVX-512 and picks
//! the widest the CPU has at run time, and on AVX-512 f16 is converted by
//! the hardware, through `pulp`'s safe wrappers of the intrinsics. The
//! `unsafe` that takes stays inside `pulp`. Partials are byte slices with
//! any alignment, so they are read through `chunks_exact` and
//! `from_le_bytes` (or an unaligned read of a whole vector), never cast.

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

/// Elements per chunk: the accumulator is 4 KiB, small beside L1 and the
/// lines streaming in from the partials, and long enough that the work per
/// chunk (a few loop heads per partial) is noise.
const CHUNK: usize = 1024;

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
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    let quiet = bits | 0x0040_0000;
    // Select, then narrow once: one pack per vector instead of two.
    ((if x.is_nan() { quiet } else { rounded }) >> 16) as u16
}

/// IEEE binary16 to f32, exactly, with the same bits as
/// `half::f16::to_f32`. Every case is computed and one selected, so the
/// loop around it vectorises; `half`'s own slice conversion calls out to
/// F16C eight elements at a time, which costs more than this whole loop.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let mag = u32::from(h & 0x7fff) << 13;
    // A normal: exponent and mantissa move to the f32 positions and the
    // exponent is rebiased (15 to 127), in integers.
    let normal = mag + ((127 - 15) << 23);
    // A subnormal, m * 2^-24: set the exponent to -14 to read 2^-14 + m *
    // 2^-24 and subtract 2^-14, exactly. No operand is itself subnormal,
    // which would cost a microcode assist per vector on x86.
    let bias = f32::from_bits((127 - 14) << 23);
    let subnormal = (f32::from_bits(mag + bias.to_bits()) - bias).to_bits();
    // Infinity keeps a zero mantissa; a NaN keeps its payload, quieted.
    let quiet = if mag > 0x0f80_0000 { 0x0040_0000 } else { 0 };
    let special = 0x7f80_0000 | quiet | mag;
    f32::from_bits(
        sign | if mag >= 0x0f80_0000 {
            special
        } else if mag < 0x0080_0000 {
            subnormal
        } else {
            normal
        },
    )
}

/// f32 to IEEE binary16, rounding to nearest even, with the same bits as
/// `half::f16::from_f32` (and F16C): too large becomes infinity, too small
/// a subnormal or zero, NaN a quiet NaN with the top of its payload. All
/// three cases are computed and one selected, so the loop vectorises.
#[inline(always)]
fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let mag = bits & 0x7fff_ffff;
    // |x| < 2^-14, an f16 subnormal: adding 2^-1 (exponent 126) leaves the
    // ten f16 mantissa bits at the bottom of the f32, rounded to nearest
    // even by the add itself; a carry into bit 10 is the smallest normal.
    let half = f32::from_bits(126 << 23);
    let tiny = ((f32::from_bits(mag) + half).to_bits() - half.to_bits()) as u16;
    // A normal: rebias the exponent, add just under half an f16 ulp plus
    // the ulp's own bit (round half to even), drop the 13 extra bits. A
    // carry out of the mantissa bumps the exponent, up to infinity.
    let odd = (mag >> 13) & 1;
    // (Wrapping: for the cases not selected the rebias goes below zero.)
    let normal = (mag.wrapping_sub((127 - 15) << 23).wrapping_add(0xfff + odd) >> 13) as u16;
    // 2^16 and above (65520 and above already rounds to infinity above).
    let inf_or_nan = if mag > 0x7f80_0000 {
        (0x7e00 | ((mag & 0x007f_ffff) >> 13)) as u16
    } else {
        0x7c00
    };
    sign | if mag >= (127 + 16) << 23 {
        inf_or_nan
    } else if mag < (127 - 14) << 23 {
        tiny
    } else {
        normal
    }
}

/// Writes the element-wise sum of `parts` (each `out.len()` bytes of
/// `dtype` values, little-endian) into `out`.
pub fn sum_into(dtype: Dtype, parts: &[&[u8]], out: &mut [u8]) -> Result<()> {
    let es = dtype.size();
    if !out.len().is_multiple_of(es) {
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
    #[cfg(target_arch = "x86_64")]
    if dtype == Dtype::F16 && avx512::sum_f16(parts, out) {
        return Ok(());
    }
    // Detection is cached by pulp: one relaxed load per call.
    pulp::Arch::new().dispatch(Sum { dtype, parts, out });
    Ok(())
}

/// One call of [`sum_into`], as the operation `pulp` compiles once per
/// instruction set (scalar/SSE2, AVX2, AVX-512) and runs on the best one.
struct Sum<'a, 'b> {
    dtype: Dtype,
    parts: &'a [&'b [u8]],
    out: &'a mut [u8],
}

impl pulp::WithSimd for Sum<'_, '_> {
    type Output = ();

    // Everything below is `inline(always)`: a function that is not inlined
    // here is compiled without the instruction set pulp enabled.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Sum { dtype, parts, out } = self;
        match dtype {
            Dtype::F32 => by_chunks::<4, 1>(
                parts,
                0,
                out,
                |c| [f32_le(c)],
                |[x], d| d.copy_from_slice(&x.to_le_bytes()),
            ),
            Dtype::F16 => by_chunks::<2, 1>(
                parts,
                0,
                out,
                |c| [f16_to_f32(u16_le(c))],
                |[x], d| d.copy_from_slice(&f32_to_f16(x).to_le_bytes()),
            ),
            Dtype::Bf16 => by_chunks::<2, 1>(
                parts,
                0,
                out,
                |c| [bf16_to_f32(u16_le(c))],
                |[x], d| d.copy_from_slice(&f32_to_bf16(x).to_le_bytes()),
            ),
        }
    }
}

/// Sums bytes `at..at + out.len()` of every partial into `out`, walking it
/// in chunks of [`CHUNK`] elements of `ES` bytes: `load` reads `W`
/// elements of one partial and `store` writes `W` sums. `out.len()` is a
/// multiple of `W * ES` and the partials are long enough (the caller
/// checked).
#[inline(always)]
fn by_chunks<const ES: usize, const W: usize>(
    parts: &[&[u8]],
    mut at: usize,
    out: &mut [u8],
    load: impl Fn(&[u8]) -> [f32; W],
    store: impl Fn([f32; W], &mut [u8]),
) {
    // All partials but the last are added into the accumulator; the last
    // is added on the way out, so the accumulator is read back only once.
    let Some((last, init)) = parts.split_last() else {
        // No partials: the sum is +0.0, all zero bits in every dtype.
        out.fill(0);
        return;
    };
    let mut acc = [0f32; CHUNK];
    for dst in out.chunks_mut(CHUNK * ES) {
        let acc = &mut acc[..dst.len() / ES];
        let span = at..at + dst.len();
        // The sum starts from +0.0, not from the first partial: a column of
        // -0.0 sums to +0.0 and a signalling NaN comes out quiet, for one
        // partial as for eight, as it always has.
        match init.split_first() {
            Some((first, rest)) => {
                for (a, c) in acc
                    .chunks_exact_mut(W)
                    .zip(first[span.clone()].chunks_exact(W * ES))
                {
                    for (a, x) in a.iter_mut().zip(load(c)) {
                        *a = 0.0 + x;
                    }
                }
                for p in rest {
                    for (a, c) in acc
                        .chunks_exact_mut(W)
                        .zip(p[span.clone()].chunks_exact(W * ES))
                    {
                        for (a, x) in a.iter_mut().zip(load(c)) {
                            *a += x;
                        }
                    }
                }
            }
            None => acc.fill(0.0),
        }
        let last = last[span].chunks_exact(W * ES);
        for ((a, c), d) in acc
            .chunks_exact(W)
            .zip(last)
            .zip(dst.chunks_exact_mut(W * ES))
        {
            let mut sum = load(c);
            for (s, a) in sum.iter_mut().zip(a) {
                *s += *a;
            }
            store(sum, d);
        }
        at += CHUNK * ES;
    }
}

/// f16 with AVX-512, where the conversions are single instructions: the
/// same F16C conversions `half` uses, so the same bits, sixteen at a time,
/// where the portable ones take some twenty instructions a vector each way.
/// `pulp` provides the feature check and the safe wrappers of the
/// intrinsics. Its AVX2 level does not include F16C, so without AVX-512 f16
/// takes the portable path, several times slower than bf16.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::{__m256i, __m512, _MM_FROUND_TO_NEAREST_INT};

    use pulp::bytemuck::{bytes_of, cast, pod_read_unaligned};
    use pulp::x86::V4;

    use super::{by_chunks, f16_to_f32, f32_to_f16, u16_le};

    /// Sums f16 `parts` into `out` if the CPU has AVX-512; false if not.
    pub(super) fn sum_f16(parts: &[&[u8]], out: &mut [u8]) -> bool {
        match V4::try_new() {
            Some(simd) => {
                pulp::Simd::vectorize(simd, SumF16 { simd, parts, out });
                true
            }
            None => false,
        }
    }

    struct SumF16<'a, 'b> {
        simd: V4,
        parts: &'a [&'b [u8]],
        out: &'a mut [u8],
    }

    impl pulp::WithSimd for SumF16<'_, '_> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) {
            let SumF16 { simd, parts, out } = self;
            let f = simd.avx512f;
            // Whole vectors of 16 elements (32 bytes), then the rest one
            // by one.
            let (body, tail) = out.split_at_mut(out.len() / 32 * 32);
            by_chunks::<2, 16>(
                parts,
                0,
                body,
                |c| cast::<__m512, [f32; 16]>(f._mm512_cvtph_ps(pod_read_unaligned(c))),
                |x, d| {
                    let h: __m256i = f._mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(cast(x));
                    d.copy_from_slice(bytes_of(&h));
                },
            );
            let at = body.len();
            by_chunks::<2, 1>(
                parts,
                at,
                tail,
                |c| [f16_to_f32(u16_le(c))],
                |[x], d| d.copy_from_slice(&f32_to_f16(x).to_le_bytes()),
            );
        }
    }
}

/// Reads a little-endian f32 from a 4-byte chunk of `chunks_exact(4)`.
#[inline(always)]
fn f32_le(c: &[u8]) -> f32 {
    f32::from_le_bytes([c[0], c[1], c[2], c[3]])
}

/// Reads a little-endian u16 from a 2-byte chunk of `chunks_exact(2)`.
/// As an array rather than `[c[0], c[1]]`: LLVM then loads the pair as one
/// u16, where byte by byte it left five no-op shuffles per vector. The
/// fallback is dead (the chunk is exactly two bytes).
#[inline(always)]
fn u16_le(c: &[u8]) -> u16 {
    u16::from_le_bytes(c.try_into().unwrap_or([0; 2]))
}

#[cfg(test)]
mod tests {
    use half::f16;

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

    #[test]
    fn f16_to_f32_matches_half_for_every_f16() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            assert_eq!(f16_to_f32(h).to_bits(), want.to_bits(), "{h:#06x}");
        }
    }

    /// Every f32 that sits on, one ulp either side of, or halfway between
    /// two neighbouring f16 values, in the subnormal, normal and overflow
    /// ranges, plus a sweep of the whole f32 range.
    #[test]
    fn f32_to_f16_matches_half_at_every_rounding_edge() {
        let check = |bits: u32| {
            for b in [bits, bits | 0x8000_0000] {
                let x = f32::from_bits(b);
                assert_eq!(f32_to_f16(x), f16::from_f32(x).to_bits(), "{b:#010x} {x:e}");
            }
        };
        for h in 0..0x7c00u16 {
            let lo = f16::from_bits(h).to_f32().to_bits();
            let hi = f16::from_bits(h + 1).to_f32().to_bits();
            let mid =
                (f16::from_bits(h).to_f32() / 2.0 + f16::from_bits(h + 1).to_f32() / 2.0).to_bits();
            for b in [lo, hi, mid] {
                (b.saturating_sub(1)..=b + 1).for_each(check);
            }
        }
        (0..=u32::MAX).step_by(4099).for_each(check);
        for b in [
            0x7f80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0x7fff_ffff,
            0x7fa0_1234,
        ] {
            check(b);
        }
    }

    /// Every f32, against `half`: too slow for a debug build, so run it with
    /// `cargo test --release -p afmesh --lib reduce -- --ignored`.
    #[test]
    #[ignore]
    fn conversions_match_half_for_every_f32() {
        for b in 0..=u32::MAX {
            let x = f32::from_bits(b);
            assert_eq!(f32_to_f16(x), f16::from_f32(x).to_bits(), "{b:#010x}");
            assert_eq!(
                f32_to_bf16(x),
                half::bf16::from_f32(x).to_bits(),
                "{b:#010x}"
            );
        }
    }

    mod prop {
        use half::{bf16, f16};
        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::select;

        use super::super::{sum_into, Dtype, Sum, CHUNK};

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

        /// One way to run the sum; false if this CPU cannot.
        type Path = fn(Dtype, &[&[u8]], &mut [u8]) -> bool;

        /// Every way the sum can run: `sum_into`'s own pick, and the
        /// portable loops as compiled for the baseline, AVX2 and AVX-512,
        /// which `sum_into` alone would never all reach on one CPU.
        fn paths() -> Vec<(&'static str, Path)> {
            let mut paths: Vec<(&'static str, Path)> = vec![
                ("sum_into", |dtype, parts, out| {
                    sum_into(dtype, parts, out).is_ok()
                }),
                ("portable baseline", |dtype, parts, out| {
                    pulp::Simd::vectorize(pulp::Scalar::new(), Sum { dtype, parts, out });
                    true
                }),
            ];
            #[cfg(target_arch = "x86_64")]
            paths.extend([
                (
                    "portable AVX2",
                    (|dtype, parts, out| {
                        pulp::x86::V3::try_new()
                            .map(|simd| pulp::Simd::vectorize(simd, Sum { dtype, parts, out }))
                            .is_some()
                    }) as Path,
                ),
                ("portable AVX-512", |dtype, parts, out| {
                    pulp::x86::V4::try_new()
                        .map(|simd| pulp::Simd::vectorize(simd, Sum { dtype, parts, out }))
                        .is_some()
                }),
            ]);
            paths
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
                for (path, sum) in paths() {
                    let mut out_buf = vec![0u8; len * es + 3];
                    let out = &mut out_buf[3 - skew % 4..][..len * es];
                    if !sum(dt, &refs, out) {
                        continue;
                    }
                    for (i, (got, &want)) in out.chunks_exact(es).zip(&want).enumerate() {
                        let mut b = [0u8; 4];
                        b[..es].copy_from_slice(got);
                        let got = u32::from_le_bytes(b);
                        if decode(dt, want).is_nan() {
                            prop_assert!(decode(dt, got).is_nan(), "{} {:?} [{}]: {:#x}", path, dt, i, got);
                        } else {
                            prop_assert_eq!(got, want, "{} {:?} [{}]", path, dt, i);
                        }
                    }
                }
            }
        }
    }
}
