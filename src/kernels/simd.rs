//! `F32x8`, eight f32 lanes, the one vector type every SIMD loop of the crate is written in:
//!
//! - on x86-64 one AVX2 register (`__m256`), with FMA;
//! - on aarch64 (Apple Silicon, Graviton, Raspberry Pi 4 and up) two NEON registers;
//! - on any other CPU a plain array, never used for speed: `available()` is false there and the
//!   scalar loops run.
//!
//! A kernel's vector loop is written once against `F32x8` and compiled with the instruction set
//! enabled: `#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]` on the
//! loop's function (NEON needs no attribute: every aarch64 CPU has it). Every method here is
//! `#[inline(always)]`, so the intrinsics end up inside that function and compile to single
//! instructions. Only `unsafe` constructors make an `F32x8`; whoever calls them promises that
//! `available()` returned true, which is what makes the arithmetic operators safe to call.

use std::ops::{Add, Div, Mul, Sub};

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// True when this CPU runs the vector loops: AVX2 and FMA on x86-64 (detected at run time),
/// NEON on aarch64.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("neon")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
type Lanes = __m256;
#[cfg(target_arch = "aarch64")]
type Lanes = [float32x4_t; 2];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
type Lanes = [f32; 8];

/// Eight f32 lanes; see the module's documentation for when one may be made.
#[derive(Clone, Copy)]
pub struct F32x8(Lanes);

/// `F32x8` from a NEON intrinsic applied to both halves of each argument.
#[cfg(target_arch = "aarch64")]
macro_rules! halves {
    ($f:ident, $($v:expr),+) => {
        F32x8([$f($($v.0[0]),+), $f($($v.0[1]),+)])
    };
}

impl F32x8 {
    /// Every lane `value`.
    ///
    /// # Safety
    /// `available()` returned true.
    #[inline(always)]
    pub unsafe fn splat(value: f32) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(_mm256_set1_ps(value));
        #[cfg(target_arch = "aarch64")]
        return F32x8([vdupq_n_f32(value); 2]);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8([value; 8]);
    }

    /// Every lane 0.
    ///
    /// # Safety
    /// `available()` returned true.
    #[inline(always)]
    pub unsafe fn zero() -> Self {
        Self::splat(0.0)
    }

    /// The eight f32 at `from` (any alignment).
    ///
    /// # Safety
    /// `available()` returned true, and `from..from + 8` is readable.
    #[inline(always)]
    pub unsafe fn load(from: *const f32) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(_mm256_loadu_ps(from));
        #[cfg(target_arch = "aarch64")]
        return F32x8([vld1q_f32(from), vld1q_f32(from.add(4))]);
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(std::ptr::read_unaligned(from as *const [f32; 8]));
    }

    /// Writes the lanes to `to..to + 8` (any alignment).
    ///
    /// # Safety
    /// `to..to + 8` is writable.
    #[inline(always)]
    pub unsafe fn store(self, to: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        _mm256_storeu_ps(to, self.0);
        #[cfg(target_arch = "aarch64")]
        {
            vst1q_f32(to, self.0[0]);
            vst1q_f32(to.add(4), self.0[1]);
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        std::ptr::write_unaligned(to as *mut [f32; 8], self.0);
    }

    /// Asks the cache for the line holding `address`; a hint that never faults, at any address.
    #[inline(always)]
    pub fn prefetch(address: *const f32) {
        // SAFETY: a prefetch reads nothing architecturally visible and cannot fault.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(address as *const i8)
        };
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) address, options(nostack, readonly, preserves_flags))
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let _ = address;
    }

    /// Every lane `value`, safely: `self` shows that the instruction set is available.
    #[inline(always)]
    pub fn splat_like(self, value: f32) -> Self {
        // SAFETY: an F32x8 exists, so the instruction set is available.
        unsafe { Self::splat(value) }
    }

    /// `self · a + b`, rounded once (a fused multiply-add).
    #[inline(always)]
    pub fn mul_add(self, a: Self, b: Self) -> Self {
        // SAFETY (all intrinsics below): an F32x8 exists, so the instruction set is available.
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe { _mm256_fmadd_ps(self.0, a.0, b.0) });
        #[cfg(target_arch = "aarch64")]
        return unsafe { halves!(vfmaq_f32, b, self, a) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(std::array::from_fn(|i| self.0[i].mul_add(a.0[i], b.0[i])));
    }

    /// `b − self · a`, rounded once.
    #[inline(always)]
    pub fn neg_mul_add(self, a: Self, b: Self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe { _mm256_fnmadd_ps(self.0, a.0, b.0) });
        #[cfg(target_arch = "aarch64")]
        return unsafe { halves!(vfmsq_f32, b, self, a) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(std::array::from_fn(|i| (-self.0[i]).mul_add(a.0[i], b.0[i])));
    }

    /// The larger of each pair of lanes. Where either is NaN: NaN on aarch64, `other` on x86-64
    /// (put the operand that may be NaN second to keep it).
    #[inline(always)]
    pub fn max(self, other: Self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe { _mm256_max_ps(self.0, other.0) });
        #[cfg(target_arch = "aarch64")]
        return unsafe { halves!(vmaxq_f32, self, other) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(std::array::from_fn(|i| self.0[i].max(other.0[i])));
    }

    /// The smaller of each pair of lanes; NaN as in [`F32x8::max`].
    #[inline(always)]
    pub fn min(self, other: Self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe { _mm256_min_ps(self.0, other.0) });
        #[cfg(target_arch = "aarch64")]
        return unsafe { halves!(vminq_f32, self, other) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(std::array::from_fn(|i| self.0[i].min(other.0[i])));
    }

    /// √ of each lane (correctly rounded).
    #[inline(always)]
    pub fn sqrt(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe { _mm256_sqrt_ps(self.0) });
        #[cfg(target_arch = "aarch64")]
        return unsafe { halves!(vsqrtq_f32, self) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(self.0.map(f32::sqrt));
    }

    /// The sum of the eight lanes.
    #[inline(always)]
    pub fn sum(self) -> f32 {
        #[cfg(target_arch = "x86_64")]
        return unsafe {
            let halves = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps(self.0, 1));
            let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
            _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
        };
        #[cfg(target_arch = "aarch64")]
        return unsafe { vaddvq_f32(vaddq_f32(self.0[0], self.0[1])) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return self.0.iter().sum();
    }

    /// The largest of the eight lanes.
    #[inline(always)]
    pub fn max_lane(self) -> f32 {
        #[cfg(target_arch = "x86_64")]
        return unsafe {
            let halves = _mm_max_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps(self.0, 1));
            let pairs = _mm_max_ps(halves, _mm_movehl_ps(halves, halves));
            _mm_cvtss_f32(_mm_max_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
        };
        #[cfg(target_arch = "aarch64")]
        return unsafe { vmaxvq_f32(vmaxq_f32(self.0[0], self.0[1])) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return self.0.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    }

    /// `2^n` for lanes holding whole numbers n in −126..=127, built in the exponent bits.
    #[inline(always)]
    fn exp2_of_integer(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(self.0), _mm256_set1_epi32(127)), 23))
        });
        #[cfg(target_arch = "aarch64")]
        return unsafe {
            let bits = |n: float32x4_t| vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127))));
            F32x8([bits(self.0[0]), bits(self.0[1])])
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(self.0.map(f32::exp2));
    }

    /// Each lane rounded to the nearest whole number (ties to even).
    #[inline(always)]
    fn round(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        return F32x8(unsafe { _mm256_round_ps(self.0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) });
        #[cfg(target_arch = "aarch64")]
        return unsafe { halves!(vrndnq_f32, self) };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        return F32x8(self.0.map(f32::round_ties_even));
    }

    /// `exp(x)` per lane, relative error about 2e-7: the Cephes `expf` reduction and polynomial.
    #[inline(always)]
    pub fn exp(self) -> Self {
        // clamped with self as the second operand, so that a NaN lane stays NaN on x86-64 too
        let x = self.splat_like(88.3).min(self.splat_like(-87.3).max(self));
        // x = n·ln2 + r with |r| ≤ ln2/2; ln2 in two parts so that n·ln2 stays exact
        let n = (x * x.splat_like(std::f32::consts::LOG2_E)).round();
        let r = n.neg_mul_add(x.splat_like(0.693_359_4), x);
        let r = n.neg_mul_add(x.splat_like(-2.121_944_4e-4), r);
        let mut p = x.splat_like(1.987_569_1e-4);
        for coefficient in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = p.mul_add(r, x.splat_like(coefficient));
        }
        let e_r = p.mul_add(r * r, r) + x.splat_like(1.0);
        e_r * n.exp2_of_integer()
    }

    /// `tanh(x)` per lane as `1 − 2 / (exp(2x) + 1)`; absolute error about 3e-7.
    #[inline(always)]
    pub fn tanh(self) -> Self {
        let (one, two) = (self.splat_like(1.0), self.splat_like(2.0));
        one - two / ((self + self).exp() + one)
    }
}

/// `impl $Trait for F32x8` through `$x86` (AVX), `$arm` (NEON) or the lane-wise `$op`.
macro_rules! lane_operator {
    ($Trait:ident, $method:ident, $x86:ident, $arm:ident, $op:tt) => {
        impl $Trait for F32x8 {
            type Output = F32x8;
            #[inline(always)]
            fn $method(self, other: F32x8) -> F32x8 {
                // SAFETY: an F32x8 exists, so the instruction set is available.
                #[cfg(target_arch = "x86_64")]
                return F32x8(unsafe { $x86(self.0, other.0) });
                #[cfg(target_arch = "aarch64")]
                return unsafe { halves!($arm, self, other) };
                #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
                return F32x8(std::array::from_fn(|i| self.0[i] $op other.0[i]));
            }
        }
    };
}

lane_operator!(Add, add, _mm256_add_ps, vaddq_f32, +);
lane_operator!(Sub, sub, _mm256_sub_ps, vsubq_f32, -);
lane_operator!(Mul, mul, _mm256_mul_ps, vmulq_f32, *);
lane_operator!(Div, div, _mm256_div_ps, vdivq_f32, /);

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 function an operation is checked against, of the two operands' lanes.
    type Reference = fn(f64, f64) -> f64;

    /// Each operation against f64 on awkward inputs (lanes that differ, negatives, the clamped
    /// ends of `exp`).
    #[test]
    fn each_lane_operation_agrees_with_f64() {
        if !available() {
            eprintln!("skipped: no vector unit on this CPU");
            return;
        }
        let a: [f32; 8] = [-90.0, -3.5, -1.0, -0.1, 0.0, 0.7, 2.5, 80.0];
        let b: [f32; 8] = [1.5, -2.0, 0.25, 3.0, -0.5, 8.0, -1.25, 0.125];
        let mut out = [0.0f32; 8];
        let lanes = |v: F32x8, out: &mut [f32; 8]| unsafe { v.store(out.as_mut_ptr()) };
        // SAFETY: available() returned true; the arrays hold 8 lanes.
        let (va, vb) = unsafe { (F32x8::load(a.as_ptr()), F32x8::load(b.as_ptr())) };
        let cases: [(&str, F32x8, Reference, f64); 9] = [
            ("add", va + vb, |x, y| x + y, 1e-7),
            ("sub", va - vb, |x, y| x - y, 1e-7),
            ("mul", va * vb, |x, y| x * y, 1e-7),
            ("div", va / vb, |x, y| x / y, 1e-7),
            ("mul_add", va.mul_add(vb, vb), |x, y| x * y + y, 1e-7),
            ("neg_mul_add", va.neg_mul_add(vb, vb), |x, y| y - x * y, 1e-7),
            ("max", va.max(vb), f64::max, 0.0),
            ("exp", va.exp(), |x, _| x.clamp(-87.3, 88.3).exp(), 4e-7),
            ("tanh", va.tanh(), |x, _| x.tanh(), 4e-7),
        ];
        for (name, result, reference, tolerance) in cases {
            lanes(result, &mut out);
            for i in 0..8 {
                let expected = reference(a[i] as f64, b[i] as f64);
                let error = (out[i] as f64 - expected).abs() / expected.abs().max(1.0);
                assert!(error <= tolerance, "{name} lane {i}: {} against {expected}", out[i]);
            }
        }
        assert!((va.sum() - a.iter().sum::<f32>()).abs() < 1e-5);
        // SAFETY: available() returned true.
        let nan = unsafe { F32x8::splat(f32::NAN) };
        lanes(nan.exp(), &mut out);
        assert!(out.iter().all(|v| v.is_nan()), "exp(NaN) must stay NaN: {out:?}");
        assert_eq!(va.max_lane(), 80.0);
        lanes(vb.max(va).sqrt(), &mut out);
        assert_eq!(out[5], 8.0f32.sqrt());
    }
}
