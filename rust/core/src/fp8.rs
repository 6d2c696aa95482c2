//! FP8 E4M3FN (`torch.float8_e4m3fn`): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits,
//! no infinities, NaN = 0x7F / 0xFF, largest finite ±448, smallest subnormal 2^-9.
//!
//! Encoding rounds to nearest, ties to even, as torch's cast does. Values beyond ±448 saturate
//! to ±448 (torch's own cast would give NaN for those, but compressed-tensors clamps to ±448
//! before casting, so saturation is what a fake-quantized activation sees).

/// Largest finite E4M3FN magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Code of +448 (exponent 15, mantissa 6; mantissa 7 at exponent 15 is NaN).
const MAX_CODE: u8 = 0x7E;
const NAN_CODE: u8 = 0x7F;

/// The value of every byte pattern (NaN for 0x7F / 0xFF).
static DECODE: [f32; 256] = decode_table();

const fn decode_one(code: u8) -> f32 {
    let mag = code & 0x7F;
    if mag == NAN_CODE {
        return f32::NAN;
    }
    let exp = (mag >> 3) as u32;
    let man = (mag & 7) as u32;
    // Both forms are exact in f32: build the bit pattern directly (no float ops in const fn).
    let bits = if exp == 0 {
        if man == 0 {
            0
        } else {
            // man * 2^-9: normalise the 1..3-bit mantissa.
            let lz = man.leading_zeros() - 29; // 0..2 leading zeros within 3 bits
            let shift = lz + 1; // the leading 1 becomes implicit
            let e = 127 - 6 - shift; // unbiased -6 - shift
            let m = (man << shift) & 7;
            (e << 23) | (m << 20)
        }
    } else {
        ((exp + 127 - 7) << 23) | (man << 20)
    };
    let sign = if code & 0x80 != 0 { 0x8000_0000 } else { 0 };
    f32::from_bits(bits | sign)
}

const fn decode_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_one(i as u8);
        i += 1;
    }
    t
}

/// The value of an E4M3FN byte.
#[inline(always)]
pub fn decode(code: u8) -> f32 {
    DECODE[code as usize]
}

/// f32 -> E4M3FN byte: round to nearest even, saturating at ±448, NaN -> 0x7F (sign kept).
#[inline(always)]
pub fn encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return sign | NAN_CODE;
    }
    // 2^-6 is the smallest normal E4M3 value.
    let mag = if a < 0x3C80_0000 {
        // Subnormal range: quantum 2^-9, so the code is round(|x| * 2^9) (exact scaling;
        // a result of 8 is the code of 2^-6, the first normal).
        (f32::from_bits(a) * 512.0).round_ties_even() as u32
    } else {
        let exp = (a >> 23) - 127 + 7; // >= 1 here
        if exp > 15 {
            return sign | MAX_CODE;
        }
        let man = a & 0x7F_FFFF;
        let mut code = (exp << 3) | (man >> 20);
        let rest = man & 0xF_FFFF;
        if rest > 0x8_0000 || (rest == 0x8_0000 && code & 1 == 1) {
            code += 1; // a mantissa carry moves into the exponent, as it should
        }
        code
    };
    sign | mag.min(MAX_CODE as u32) as u8
}

/// `decode(encode(x))`.
#[inline(always)]
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

/// Independent bit-free reference (f64, exhaustive search); the observer tests use it too.
#[cfg(test)]
pub(crate) mod reference {
    /// Independent reference: every finite E4M3FN value from the format's definition (f64).
    pub(crate) fn value_f64(code: u8) -> Option<f64> {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xF) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return None;
        }
        Some(if e == 0 {
            s * m / 8.0 * 2f64.powi(-6)
        } else {
            s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        })
    }

    /// Nearest finite code by exhaustive search; ties go to the even code (mantissa LSB 0);
    /// |x| > 448 saturates. Signed zero follows the sign of x.
    pub(crate) fn reference_encode(x: f64) -> u8 {
        if x.is_nan() {
            return if x.is_sign_negative() { 0xFF } else { 0x7F };
        }
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = x.abs().min(448.0);
        let mut best = (f64::INFINITY, 0u8);
        for c in 0u8..=0x7E {
            let v = value_f64(c).unwrap_or(f64::NAN);
            let d = (v - a).abs();
            if d < best.0 || (d == best.0 && c & 1 == 0) {
                best = (d, c);
            }
        }
        sign | best.1
    }
}

#[cfg(test)]
mod tests {
    use super::reference::{reference_encode, value_f64};
    use super::*;

    #[test]
    fn decode_matches_the_format_definition() {
        for c in 0..=255u8 {
            match value_f64(c) {
                Some(v) => assert_eq!(decode(c) as f64, v, "code {c:#04x}"),
                None => assert!(decode(c).is_nan(), "code {c:#04x}"),
            }
        }
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn every_code_roundtrips_and_its_neighbourhood_rounds_like_the_reference() {
        let mut checked = 0usize;
        for c in 0..=255u8 {
            let Some(v) = value_f64(c) else { continue };
            assert_eq!(encode(v as f32), c, "exact value {v}");
            // The f32 neighbours, the midpoints to the next code up (exact ties) and the f32
            // values either side of those midpoints.
            let vf = v as f32;
            let mut probes = vec![
                vf.next_up(),
                vf.next_down(),
                vf.next_up().next_up(),
                vf.next_down().next_down(),
            ];
            if let Some(n) = value_f64(c.wrapping_add(1)).filter(|_| c & 0x7F < 0x7E) {
                let mid = ((v + n) / 2.0) as f32;
                assert_eq!(mid as f64, (v + n) / 2.0, "midpoint must be exact in f32");
                probes.extend([mid, mid.next_up(), mid.next_down()]);
            }
            for p in probes {
                assert_eq!(
                    encode(p),
                    reference_encode(p as f64),
                    "x = {p:e} ({:#010x}) near code {c:#04x}",
                    p.to_bits()
                );
                checked += 1;
            }
        }
        assert!(checked > 1500, "{checked}");
    }

    #[test]
    fn ties_go_to_even_and_specials() {
        // 1.0625 lies halfway between 1.0 (0x38, even) and 1.125 (0x39): -> 1.0.
        assert_eq!(round(1.0625), 1.0);
        // 1.1875 between 1.125 (0x39, odd) and 1.25 (0x3A, even): -> 1.25.
        assert_eq!(round(1.1875), 1.25);
        // Subnormal ties: 0.5 * 2^-9 -> 0 (even), 1.5 * 2^-9 -> 2 * 2^-9.
        assert_eq!(encode(2f32.powi(-10)), 0x00);
        assert_eq!(encode(-(2f32.powi(-10))), 0x80);
        assert_eq!(encode(1.5 * 2f32.powi(-9)), 0x02);
        // 7.5 * 2^-9 is halfway between the largest subnormal and 2^-6 (code 8, even).
        assert_eq!(encode(7.5 * 2f32.powi(-9)), 0x08);
        // Saturation: 448 stays, anything larger (the 464 tie, 480, inf) -> ±448.
        for x in [448.0f32, 449.0, 464.0, 480.0, 1e30, f32::INFINITY] {
            assert_eq!(encode(x), 0x7E, "{x}");
            assert_eq!(encode(-x), 0xFE, "{x}");
        }
        assert_eq!(encode(f32::NAN) & 0x7F, 0x7F);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(encode(-0.0), 0x80);
        assert_eq!(encode(f32::MIN_POSITIVE / 4.0), 0x00); // f32 subnormal input
    }

    #[test]
    fn random_values_match_the_reference() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Random sign, exponent in [-14, 9], random mantissa: covers subnormals to > 448.
            let e = ((s >> 33) % 24) as i32 - 14;
            let m = ((s >> 8) & 0x7F_FFFF) as u32;
            let x = f32::from_bits((((e + 127) as u32) << 23) | m)
                * if s & 1 == 0 { 1.0 } else { -1.0 };
            assert_eq!(encode(x), reference_encode(x as f64), "x = {x:e}");
        }
    }
}
