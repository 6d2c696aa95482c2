//! CUDA C source of the kernels, compiled at run time by NVRTC for the device's architecture
//! (no nvcc on build machines). No headers are included: fp16/bf16 are read as 16-bit integers
//! and converted by hand, fixed-width types are spelled out. Compiled with `--fmad=false` so
//! products and sums round separately, as in the CPU solver and [`super::model`].
//!
//! Every kernel's logic is mirrored by a function of `model.rs` (named in each comment).

/// Kernel names, in the order [`SOURCE`] defines them.
pub const KERNEL_NAMES: [&str; 10] = [
    "fq_find_nonfinite_f32",
    "fq_find_nonfinite_u16",
    "fq_record_nonfinite_f32",
    "fq_record_nonfinite_u16",
    "fq_diag",
    "fq_prep_hessian",
    "fq_reverse_upper",
    "fq_permute_weight",
    "fq_fit_groups",
    "fq_gptq_batch",
];

/// Threads per block of the warp-per-row kernels (8 rows per block).
pub const WARPS_PER_BLOCK: u32 = 8;

pub const SOURCE: &str = r#"
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define FULL 0xffffffffu
#define MAX_BATCH 128
#define WARP 32
#define REGS 4

// First non-finite element (flat index) of a float32 buffer -> atomicMin into *first
// (initialised to ~0 by the host). Grid-stride loop.  [model: first_non_finite]
extern "C" __global__ void fq_find_nonfinite_f32(const float* __restrict__ a, u64 len, u64* first) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) {
        u32 bits = __float_as_uint(a[i]);
        if ((bits & 0x7f800000u) == 0x7f800000u) { atomicMin(first, i); }
    }
}

// Same for 16-bit floats read as raw bits: exp_mask 0x7c00 (fp16) or 0x7f80 (bf16).
extern "C" __global__ void fq_find_nonfinite_u16(const u16* __restrict__ a, u64 len, u32 exp_mask, u64* first) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) {
        if ((a[i] & exp_mask) == exp_mask) { atomicMin(first, i); }
    }
}

// Hessian batches record their first non-finite element in a slot that stays on the device
// (no host read per batch): slot = {batch, flat index, dtype tag}, all ~0 until a batch
// records. A batch skips its scan once an earlier batch has recorded; within the first bad
// batch every thread claims the slot for it (atomicCAS) and the smallest index wins
// (atomicMin).  [model: record_non_finite]
__device__ __forceinline__ bool fq_slot_taken(const u64* slot, u64 batch) {
    u64 b = *(volatile const u64*)slot;
    return b != ~0ull && b != batch;
}

__device__ __forceinline__ void fq_slot_record(u64* slot, u64 batch, u64 i, u64 tag) {
    u64 seen = atomicCAS(slot, ~0ull, batch);
    if (seen == ~0ull || seen == batch) {
        atomicMin(slot + 1, i);
        slot[2] = tag;
    }
}

extern "C" __global__ void fq_record_nonfinite_f32(const float* __restrict__ a, u64 len, u64 batch, u64 tag, u64* slot) {
    if (fq_slot_taken(slot, batch)) { return; }
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) {
        u32 bits = __float_as_uint(a[i]);
        if ((bits & 0x7f800000u) == 0x7f800000u) { fq_slot_record(slot, batch, i, tag); }
    }
}

// Same for 16-bit floats read as raw bits: exp_mask 0x7c00 (fp16) or 0x7f80 (bf16).
extern "C" __global__ void fq_record_nonfinite_u16(const u16* __restrict__ a, u64 len, u32 exp_mask, u64 batch, u64 tag, u64* slot) {
    if (fq_slot_taken(slot, batch)) { return; }
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) {
        if ((a[i] & exp_mask) == exp_mask) { fq_slot_record(slot, batch, i, tag); }
    }
}

// out[i] = h[i][i].
extern "C" __global__ void fq_diag(const float* __restrict__ h, int n, float* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = h[(u64)i * n + i]; }
}

// out = J P H P^T J, dead inputs isolated with diagonal 1, damp added to the diagonal.
// Grid-stride over the n*n entries.  [model: prep_hessian]
extern "C" __global__ void fq_prep_hessian(const float* __restrict__ h, const int* __restrict__ perm,
                                           const u8* __restrict__ dead, int n, float damp,
                                           float* __restrict__ out) {
    u64 nn = (u64)n * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < nn; i += (u64)gridDim.x * blockDim.x) {
        int r = (int)(i / n), c = (int)(i % n);
        int pr = n - 1 - r, pc = n - 1 - c;
        float v;
        if (dead[pr] || dead[pc]) { v = (r == c) ? 1.0f : 0.0f; }
        else { v = h[(u64)perm[pr] * n + perm[pc]]; }
        if (r == c) { v = v + damp; }
        out[i] = v;
    }
}

// In place: a[r][c] <- a[n-1-r][n-1-c] on and above the diagonal, 0 below. Thread k swaps the
// mirrored pair (k, n*n-1-k).  [model: reverse_upper]
extern "C" __global__ void fq_reverse_upper(float* a, int n) {
    u64 nn = (u64)n * n;
    u64 k = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    if (k >= (nn + 1) / 2) return;
    u64 k2 = nn - 1 - k;
    float x = a[k], y = a[k2];
    u64 r = k / n, c = k % n;
    u64 r2 = k2 / n, c2 = k2 % n;
    a[k] = (r > c) ? 0.0f : y;
    if (k2 != k) { a[k2] = (r2 > c2) ? 0.0f : x; }
}

// wp[r][p] = dead[p] ? 0 : w[r][perm[p]]. Grid-stride over rows*n.  [model: permute_weight]
extern "C" __global__ void fq_permute_weight(const float* __restrict__ w, const int* __restrict__ perm,
                                             const u8* __restrict__ dead, int rows, int n,
                                             float* __restrict__ wp) {
    u64 total = (u64)rows * n;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / n;
        int p = (int)(i % n);
        wp[i] = dead[p] ? 0.0f : w[r * n + perm[p]];
    }
}

// A scale rounded to its storage dtype, ties to even; sdt 0 float32 (unchanged), 1 float16,
// 2 bfloat16. Overflow gives +inf (the host then reports it); a positive scale that would round
// to 0 gives the dtype's smallest subnormal. Integer bit operations, as quantizer.rs's
// f32_to_f16_bits / f16_bits_to_f32 / f32_to_bf16_bits and ScaleDtype::round.
__device__ __forceinline__ float round_scale(float s, int sdt) {
    if (sdt == 0) return s;
    const u32 b = __float_as_uint(s);
    float r;
    if (sdt == 1) {
        const u32 sign = (b >> 16) & 0x8000u;
        const int exp = (int)((b >> 23) & 0xffu);
        const u32 man = b & 0x7fffffu;
        const int e = exp - 112;  // binary16 bias 15 instead of 127
        u32 h;
        if (exp == 0xff) {
            h = sign | 0x7c00u | (man ? 0x200u : 0u);
        } else if (e >= 31) {
            h = sign | 0x7c00u;
        } else if (e <= 0) {
            if (e < -10) {
                h = sign;
            } else {
                // Subnormal: the value in units of 2^-24 is m * 2^(e - 14).
                const u32 m = man | 0x800000u;
                const u32 shift = (u32)(14 - e);
                const u32 q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
                h = sign | (q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u));
            }
        } else {
            const u32 q = ((u32)e << 10) | (man >> 13), rem = man & 0x1fffu;
            h = sign | (q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u));
        }
        const u32 hs = (h & 0x8000u) << 16, he = (h >> 10) & 0x1fu, hm = h & 0x3ffu;
        if (he == 0) {
            r = __fmul_rn((float)hm, 5.9604644775390625e-8f);  // hm * 2^-24, exact
            if (hs) { r = -r; }
        } else if (he == 31) {
            r = __uint_as_float(hs | 0x7f800000u | (hm << 13));
        } else {
            r = __uint_as_float(hs | ((he + 112u) << 23) | (hm << 13));
        }
    } else {
        if ((b & 0x7fffffffu) > 0x7f800000u) return s;  // NaN
        r = __uint_as_float(((b + 0x7fffu + ((b >> 16) & 1u)) >> 16) << 16);
    }
    if (r == 0.0f && s > 0.0f) {
        r = (sdt == 1) ? 5.9604644775390625e-8f : __uint_as_float(1u << 16);
    }
    return r;
}

// The CPU quantizer's min-max grid (quantizer.rs: reference_range + minmax_params + grid_zero).
__device__ __forceinline__ void minmax_params(float xmin, float xmax, int maxq, int sym, int sdt,
                                              float* scale, float* zero) {
    xmin = fminf(xmin, 0.0f);
    xmax = fmaxf(xmax, 0.0f);
    if (sym) {
        xmax = fmaxf(xmax, fabsf(xmin));
        if (xmin < 0.0f) { xmin = -xmax; }
    }
    if (xmin == 0.0f && xmax == 0.0f) { xmin = -1.0f; xmax = 1.0f; }
    float s = round_scale(__fdiv_rn(xmax - xmin, (float)maxq), sdt);
    *scale = s;
    if (sym) {
        *zero = (float)((maxq + 1) / 2);
    } else {
        float z = rintf(__fdiv_rn(-xmin, s));
        // A rounded scale can sit below the exact one: keep the zero inside the grid.
        if (sdt != 0) { z = fminf(fmaxf(z, 0.0f), (float)maxq); }
        *zero = z;
    }
}

__device__ __forceinline__ void warp_minmax(float* lo, float* hi) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        *lo = fminf(*lo, __shfl_xor_sync(FULL, *lo, o));
        *hi = fmaxf(*hi, __shfl_xor_sync(FULL, *hi, o));
    }
}

// Up-front grids of contiguous groups of g ORIGINAL columns (dead inputs read as 0); one warp
// per (row, group): grid (ceil(rows*ng / warps_per_block)).  [model: fit_groups]
extern "C" __global__ void fq_fit_groups(const float* __restrict__ w, const u8* __restrict__ dead_orig,
                                         int rows, int n, int g, int ng, int maxq, int sym,
                                         int sdt, float* __restrict__ scales,
                                         int* __restrict__ zeros) {
    u64 item = blockIdx.x * (u64)(blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (item >= (u64)rows * ng) return;
    int r = (int)(item / ng), k = (int)(item % ng);
    int c0 = k * g;
    int c1 = min(c0 + g, n);
    float lo = 0.0f, hi = 0.0f;
    for (int c = c0 + lane; c < c1; c += WARP) {
        float v = dead_orig[c] ? 0.0f : w[(u64)r * n + c];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    warp_minmax(&lo, &hi);
    if (lane == 0) {
        float s, z;
        minmax_params(lo, hi, maxq, sym, sdt, &s, &z);
        scales[(u64)r * ng + k] = s;
        zeros[(u64)r * ng + k] = (int)z;
    }
}

// One batch of columns [i1, i2) (i2 - i1 <= 128) of the GPTQ recurrence. One warp per row; lane l
// holds batch columns l + 32 m in x[m]. For each column: broadcast its working value, quantize
// (every lane, redundantly: no divergence), E = (w - q) / Hinv_pp, spread E over the rest of the
// batch. The caller then applies W'[:, i2:] -= E Hinv[i1:i2, i2:] with one GEMM.
// mode: 0 per-channel, 1 dynamic groups (fitted at p % g == 0), 2 static groups (k = perm[p]/g).
// sdt: the scales' storage dtype (round_scale).
// sums[2 r] += sum E^2, sums[2 r + 1] += sum (W - Q)^2 for the proxy loss.  [model: batch_kernel]
extern "C" __global__ void __launch_bounds__(256)
fq_gptq_batch(float* __restrict__ wp, const float* __restrict__ w, const float* __restrict__ u,
              const int* __restrict__ perm, const u8* __restrict__ dead, float* __restrict__ e,
              u8* __restrict__ codes, float* __restrict__ dq, float* __restrict__ scales,
              int* __restrict__ zeros, double* __restrict__ sums, int rows, int n, int ng,
              int i1, int i2, int mode, int g, int maxq, int sym, int sdt) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;  // whole warps leave together
    const int count = i2 - i1;
    const u64 rb = (u64)row * n;
    float x[REGS], o[REGS];
    #pragma unroll
    for (int m = 0; m < REGS; ++m) {
        int k = m * WARP + lane;
        x[m] = 0.0f;
        o[m] = 0.0f;
        if (k < count) {
            int p = i1 + k;
            x[m] = wp[rb + p];
            o[m] = dead[p] ? 0.0f : w[rb + perm[p]];
        }
    }
    float scale = 1.0f, zero = 0.0f;
    int cur_k = -1;
    double se = 0.0, sd = 0.0;
    const float fmaxq = (float)maxq;
    #pragma unroll
    for (int m = 0; m < REGS; ++m) {
        for (int jj = 0; jj < WARP; ++jj) {
            const int j = m * WARP + jj;
            if (j >= count) break;
            const int p = i1 + j;
            if (mode == 1 && p % g == 0) {
                const int end = min(p + g, n);
                float lo = 0.0f, hi = 0.0f;
                #pragma unroll
                for (int mm = 0; mm < REGS; ++mm) {
                    int k = mm * WARP + lane;
                    if (k >= j && k < count && i1 + k < end) {
                        lo = fminf(lo, x[mm]);
                        hi = fmaxf(hi, x[mm]);
                    }
                }
                for (int c = i2 + lane; c < end; c += WARP) {
                    float v = wp[rb + c];
                    lo = fminf(lo, v);
                    hi = fmaxf(hi, v);
                }
                warp_minmax(&lo, &hi);
                minmax_params(lo, hi, maxq, sym, sdt, &scale, &zero);
                cur_k = p / g;
                if (lane == 0) {
                    scales[(u64)row * ng + cur_k] = scale;
                    zeros[(u64)row * ng + cur_k] = (int)zero;
                }
            } else {
                int k = (mode == 0) ? 0 : (mode == 1 ? p / g : perm[p] / g);
                if (k != cur_k) {
                    scale = scales[(u64)row * ng + k];
                    zero = (float)zeros[(u64)row * ng + k];
                    cur_k = k;
                }
            }
            const float xv = __shfl_sync(FULL, x[m], jj);
            const float ov = __shfl_sync(FULL, o[m], jj);
            const float wv = dead[p] ? 0.0f : xv;
            const float code = fminf(fmaxf(rintf(__fdiv_rn(wv, scale)) + zero, 0.0f), fmaxq);
            const float q = __fmul_rn(scale, code - zero);
            const float err = __fdiv_rn(wv - q, u[(u64)p * n + p]);
            const float d = ov - q;
            se += (double)err * (double)err;
            sd += (double)d * (double)d;
            if (lane == jj) {
                const int c = perm[p];
                codes[rb + c] = (u8)code;
                dq[rb + c] = q;
                e[(u64)row * MAX_BATCH + j] = err;
            }
            const float* urow = u + (u64)p * n + i1;
            #pragma unroll
            for (int mm = 0; mm < REGS; ++mm) {
                int k = mm * WARP + lane;
                if (mm >= m && k > j && k < count) {
                    x[mm] = x[mm] - __fmul_rn(err, urow[k]);
                }
            }
        }
    }
    if (lane == 0) {
        sums[2 * (u64)row] += se;
        sums[2 * (u64)row + 1] += sd;
    }
}
"#;

/// Source checks that need no compiler: every kernel named in [`KERNEL_NAMES`] is defined
/// `extern "C"` (so NVRTC keeps its name unmangled) and nothing is included.
pub fn check_source() -> Result<(), String> {
    for name in KERNEL_NAMES {
        let def = [" ", "\n"]
            .iter()
            .find_map(|sep| SOURCE.find(&format!("{sep}{name}(")))
            .ok_or_else(|| format!("kernel {name} is not defined"))?;
        let head = &SOURCE[SOURCE[..def].rfind("extern \"C\"").unwrap_or(0)..def];
        if !head.contains("__global__") || head.contains(';') {
            return Err(format!(
                "kernel {name} is not an extern \"C\" __global__ function"
            ));
        }
    }
    if SOURCE.contains("#include") {
        return Err("the kernels must not include headers (NVRTC runs without a toolkit)".into());
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub use nvrtc_compile::*;

#[cfg(feature = "cuda")]
mod nvrtc_compile {
    use cudarc::nvrtc::sys;
    use std::ffi::{c_char, CString};

    /// Whether libnvrtc can be loaded (checked before any call, which would panic without it).
    pub fn nvrtc_present() -> bool {
        // SAFETY: only tries to dlopen the library by its candidate names.
        unsafe { sys::is_culib_present() }
    }

    /// The NVRTC version (major, minor).
    pub fn nvrtc_version() -> Result<(i32, i32), String> {
        if !nvrtc_present() {
            return Err("libnvrtc (CUDA 13) not found".into());
        }
        let (mut a, mut b) = (0, 0);
        // SAFETY: two out-pointers to live ints.
        let r = unsafe { sys::nvrtcVersion(&mut a, &mut b) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcVersion failed: {r:?}"));
        }
        Ok((a, b))
    }

    /// Compile options: the target, no FMA contraction, IEEE division.
    pub fn options(arch: &str) -> Vec<String> {
        vec![
            format!("--gpu-architecture={arch}"),
            "--fmad=false".into(),
            "--prec-div=true".into(),
            "--std=c++17".into(),
        ]
    }

    /// Compiles [`super::SOURCE`] for `arch` (e.g. `sm_90`: CUBIN, loadable by any driver of the
    /// same CUDA major; `compute_90`: PTX). Returns the image and the compiler log.
    pub fn compile(arch: &str) -> Result<(Vec<u8>, String), String> {
        if !nvrtc_present() {
            return Err(
                "libnvrtc (CUDA 13) not found: install nvidia-cuda-nvrtc or put the CUDA \
                        libraries on LD_LIBRARY_PATH"
                    .into(),
            );
        }
        let src = CString::new(super::SOURCE).map_err(|e| e.to_string())?;
        let name = CString::new("ferroquant_kernels.cu").map_err(|e| e.to_string())?;
        let opts: Vec<CString> = options(arch)
            .into_iter()
            .map(CString::new)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        let ok = sys::nvrtcResult::NVRTC_SUCCESS;
        // SAFETY: every pointer is to a live NUL-terminated string or buffer of the size NVRTC
        // reported; the program is destroyed on every path after creation.
        unsafe {
            let r = sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if r != ok {
                return Err(format!("nvrtcCreateProgram failed: {r:?}"));
            }
            let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
            let mut log_len = 0usize;
            let mut log = String::new();
            if sys::nvrtcGetProgramLogSize(prog, &mut log_len) == ok && log_len > 1 {
                let mut buf = vec![0u8; log_len];
                if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) == ok {
                    log = String::from_utf8_lossy(&buf[..log_len - 1]).into_owned();
                }
            }
            let result = if compiled != ok {
                Err(format!("NVRTC failed to compile the ferroquant kernels for {arch} ({compiled:?}):\n{log}"))
            } else if arch.starts_with("sm_") {
                let mut len = 0usize;
                let r = sys::nvrtcGetCUBINSize(prog, &mut len);
                let mut image = vec![0u8; len];
                if r != ok || sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut c_char) != ok {
                    Err(format!("nvrtcGetCUBIN failed for {arch}"))
                } else {
                    Ok((image, log))
                }
            } else {
                let mut len = 0usize;
                let r = sys::nvrtcGetPTXSize(prog, &mut len);
                let mut image = vec![0u8; len];
                if r != ok || sys::nvrtcGetPTX(prog, image.as_mut_ptr() as *mut c_char) != ok {
                    Err(format!("nvrtcGetPTX failed for {arch}"))
                } else {
                    Ok((image, log))
                }
            };
            sys::nvrtcDestroyProgram(&mut prog);
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_defines_every_kernel_without_headers() {
        check_source().unwrap();
    }

    /// A real compile of the kernels on any machine where libnvrtc.so.13 loads (e.g. from the
    /// pip package nvidia-cuda-nvrtc via LD_LIBRARY_PATH); skipped, saying so, where it does not.
    #[cfg(feature = "cuda")]
    #[test]
    fn nvrtc_compiles_the_kernels() {
        if !nvrtc_present() {
            eprintln!("SKIPPED nvrtc_compiles_the_kernels: libnvrtc.so.13 not loadable here");
            return;
        }
        let v = nvrtc_version().unwrap();
        for arch in ["sm_80", "sm_90", "compute_90"] {
            let (image, log) = compile(arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(!image.is_empty());
            assert!(!log.contains("warning"), "{arch}: {log}");
            if arch.starts_with("compute") {
                let ptx = String::from_utf8_lossy(&image);
                for name in KERNEL_NAMES {
                    assert!(
                        ptx.contains(&format!(".entry {name}(")),
                        "{name} missing from PTX"
                    );
                }
                // No fused multiply-adds in f32 (--fmad=false), IEEE division.
                assert!(
                    !ptx.contains("fma.rn.f32"),
                    "f32 FMA contraction in the PTX"
                );
                assert!(
                    !ptx.contains("div.approx.f32"),
                    "approximate division in the PTX"
                );
                // The batch's columns stay in registers (x[m] indexed only by unrolled loops):
                // no local-memory arrays.
                assert!(!ptx.contains(".local"), "local memory in the PTX");
            } else {
                // ELF magic.
                assert_eq!(&image[..4], b"\x7fELF", "{arch}: not a CUBIN");
            }
            eprintln!("nvrtc {v:?} {arch}: {} bytes", image.len());
        }
    }
}
