/* The fpgaserve datapath (docs/datapath.md, datapath 1) in OpenCL 1.2 C.
 *
 * Bit-exact with the NumPy emulator: no FP contraction, no relaxed math, integer arithmetic for
 * quantization and for the matrix unit's accumulator, explicit rounding code where OpenCL and
 * IEEE/NumPy could differ. Written for FPGA offline compilers too: no recursion, no dynamic
 * allocation, only fixed-size private state. Section numbers refer to docs/datapath.md.
 */
#pragma OPENCL FP_CONTRACT OFF

#define CANONICAL_NAN 0x7FC00000u
#define ABS_MASK 0x7FFFFFFFu
#define INF_BITS 0x7F800000u
#define EXP_BIAS 127
#define NAN_CODE 255

/* Section 5.1: NaN -> 0x7FC00000, |x| < FLT_MIN (subnormals, -0.0) -> +0.0. */
inline float canon(float x) {
    uint bits = as_uint(x);
    uint magnitude = bits & ABS_MASK;
    if (magnitude > INF_BITS) return as_float(CANONICAL_NAN);
    if (magnitude < 0x00800000u) return 0.0f;
    return x;
}

/* Section 3.1: unbiased exponent of |x| from its bits, clamped at -127 (zero, subnormals). */
inline int raw_exponent(uint magnitude_bits) {
    return (int)(magnitude_bits >> 23) - EXP_BIAS;
}

/* Section 3.3: min(RNE(|x| * 2^k), max_mantissa) with integers only. */
inline int round_magnitude(uint magnitude_bits, int k, int max_mantissa) {
    uint field = magnitude_bits >> 23;
    uint significand = magnitude_bits & 0x007FFFFFu;
    int exponent = -149;                       /* value = significand * 2^exponent */
    if (field != 0) {
        significand |= 0x00800000u;
        exponent = (int)field - 150;
    }
    int shift = exponent + k;                  /* value * 2^k = significand * 2^shift */
    if (significand == 0) return 0;
    if (shift >= 0) {
        /* significand >= 1 and shift >= 8 already exceed any mantissa: saturate. */
        if (shift >= 8) return max_mantissa;
        uint value = significand << shift;
        return value > (uint)max_mantissa ? max_mantissa : (int)value;
    }
    int right = -shift;
    if (right > 25) return 0;                  /* below a quarter: rounds to 0 */
    uint quotient = significand >> right;
    uint remainder = significand & ((1u << right) - 1u);
    uint halfway = 1u << (right - 1);
    if (remainder > halfway || (remainder == halfway && (quotient & 1u))) quotient += 1u;
    return quotient > (uint)max_mantissa ? max_mantissa : (int)quotient;
}

/* One work-item per block: raw exponent, or 128 for a NaN block (any NaN or Inf). */
__kernel void block_exponents(__global const float *x, int length, int block, int blocks,
                              __global int *raw) {
    int id = get_global_id(0);                 /* row * blocks + b */
    int row = id / blocks, b = id % blocks;
    int start = b * block;
    int stop = min(start + block, length);
    uint largest = 0;
    for (int i = start; i < stop; ++i) {
        uint magnitude = as_uint(x[(long)row * length + i]) & ABS_MASK;
        largest = max(largest, magnitude);
    }
    raw[id] = largest >= INF_BITS ? 128 : raw_exponent(largest);
}

/* One work-item per group (axis 0): the anchor G over its non-NaN blocks (section 3.2). */
__kernel void group_anchor(__global const int *raw, int blocks_per_group, __global int *anchor) {
    int group = get_global_id(0);
    int best = -EXP_BIAS;
    for (int i = 0; i < blocks_per_group; ++i) {
        int e = raw[(long)group * blocks_per_group + i];
        if (e != 128) best = max(best, e);
    }
    anchor[group] = best;
}

/* One work-item per element: mantissa and (for the first element of a block) the E8M0 code. */
__kernel void quantize_elements(__global const float *x, int length, int block, int blocks,
                                int rows_per_group, int mantissa_bits, int window,
                                __global const int *raw, __global const int *anchor,
                                __global char *mantissas, __global uchar *codes) {
    long id = get_global_id(0);
    long row = id / length;
    int i = (int)(id % length);
    int b = i / block;
    int e = raw[row * blocks + b];
    int group = (int)(row / rows_per_group);
    if (e == 128) {
        mantissas[id] = 0;
        if (i % block == 0) codes[row * blocks + b] = NAN_CODE;
        return;
    }
    int shared_exponent = max(e, anchor[group] - window);
    uint bits = as_uint(x[id]);
    int magnitude = round_magnitude(bits & ABS_MASK, (mantissa_bits - 1) - shared_exponent,
                                    (1 << mantissa_bits) - 1);
    mantissas[id] = (char)((bits >> 31) ? -magnitude : magnitude);
    if (i % block == 0) codes[row * blocks + b] = (uchar)(shared_exponent + EXP_BIAS);
}

/* Section 4.1: fl32(acc * 2^scale) with IEEE gradual underflow, then FTZ; acc is exact. */
inline float scaled_to_float(long acc, int scale) {
    if (acc == 0) return 0.0f;
    uint sign = acc < 0 ? 0x80000000u : 0u;
    ulong magnitude = acc < 0 ? (ulong)(-acc) : (ulong)acc;
    int top = 63 - (int)clz(magnitude);        /* magnitude in [2^top, 2^(top+1)) */
    int lsb = max(top + scale - 23, -149);     /* exponent of the result's last bit */
    int drop = lsb - scale;                    /* low bits of magnitude to round away */
    ulong kept;
    if (drop <= 0) {
        kept = magnitude << (-drop);
    } else if (drop > 63) {
        kept = 0;                              /* far below half a unit: rounds to 0 */
    } else {
        kept = magnitude >> drop;
        ulong remainder = magnitude & ((1ul << drop) - 1ul);
        ulong halfway = 1ul << (drop - 1);
        if (remainder > halfway || (remainder == halfway && (kept & 1ul))) kept += 1ul;
    }
    if (kept >= (1ul << 24)) {                 /* rounding carried into a new binade */
        kept >>= 1;
        lsb += 1;
    }
    /* value = kept * 2^lsb with kept < 2^24; FLT_MIN = 2^-126 = 2^23 * 2^-149. */
    if (kept < (1ul << 23)) return 0.0f;       /* a subnormal result: FTZ (section 4.1) */
    int biased = lsb + 23 + EXP_BIAS;
    if (biased >= 255) return as_float(sign | INF_BITS);
    return as_float(sign | ((uint)biased << 23) | ((uint)kept & 0x007FFFFFu));
}

/* The matrix unit (section 4) as a direct convolution, one work-item per output (n, i, j, o).
 * Terms are the integers m * 2^(X - L) of section 4.2; nan flags mark NaN-block elements. */
__kernel void conv2d(__global const int *act_terms, __global const uchar *act_nan,
                     __global const int *act_floor,
                     int height, int width, int channels,
                     __global const int *weight_terms, __global const int *weight_floor,
                     int filters, int kh, int kw, int sh, int sw, int dh, int dw,
                     int top, int left, int groups, int out_h, int out_w, int mantissa_bits,
                     __global float *out) {
    long id = get_global_id(0);
    int o = (int)(id % filters);
    long rest = id / filters;
    int j = (int)(rest % out_w);
    rest /= out_w;
    int i = (int)(rest % out_h);
    int n = (int)(rest / out_h);
    int per_group_in = channels / groups;
    int group = o / (filters / groups);
    long acc = 0;
    int is_nan = 0;
    for (int p = 0; p < kh; ++p) {
        int y = i * sh + p * dh - top;
        if (y < 0 || y >= height) continue;
        for (int q = 0; q < kw; ++q) {
            int x = j * sw + q * dw - left;
            if (x < 0 || x >= width) continue;
            long base = (((long)n * height + y) * width + x) * channels + group * per_group_in;
            long wbase = (long)o * kh * kw * per_group_in + (long)(p * kw + q) * per_group_in;
            for (int c = 0; c < per_group_in; ++c) {
                is_nan |= act_nan[base + c];
                acc += (long)act_terms[base + c] * (long)weight_terms[wbase + c];
            }
        }
    }
    float result = is_nan ? as_float(CANONICAL_NAN)
                          : scaled_to_float(acc, act_floor[n] + weight_floor[o]
                                                     - 2 * (mantissa_bits - 1));
    out[id] = result;
}

/* The same sums, CONV_TILE (8) filters per work-item (4 and 16 measured slower on PoCL): each activation term is loaded once for
 * eight products (the filters of one group; filters_per_group % 8 == 0). Same integers, same
 * single rounding per output: bit-identical to conv2d. The accumulators are spelled out: PoCL
 * keeps scalars in registers but not a private array. */
#define CONV_TILE 8
__kernel void conv2d_tiled(__global const int *act_terms, __global const uchar *act_nan,
                           __global const int *act_floor,
                           int height, int width, int channels,
                           __global const int *weight_terms, __global const int *weight_floor,
                           int filters, int kh, int kw, int sh, int sw, int dh, int dw,
                           int top, int left, int groups, int out_h, int out_w,
                           int mantissa_bits, __global float *out) {
    long id = get_global_id(0);
    int tiles = filters / CONV_TILE;
    int o = (int)(id % tiles) * CONV_TILE;
    long pixel = id / tiles;
    int j = (int)(pixel % out_w);
    long rest = pixel / out_w;
    int i = (int)(rest % out_h);
    int n = (int)(rest / out_h);
    int per_group_in = channels / groups;
    int group = o / (filters / groups);
    long span = (long)kh * kw * per_group_in;
    __global const int *w0 = weight_terms + (long)o * span;
    __global const int *w1 = w0 + span;
    __global const int *w2 = w1 + span;
    __global const int *w3 = w2 + span;
    __global const int *w4 = w3 + span;
    __global const int *w5 = w4 + span;
    __global const int *w6 = w5 + span;
    __global const int *w7 = w6 + span;
    long acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0, acc4 = 0, acc5 = 0, acc6 = 0, acc7 = 0;
    int is_nan = 0;
    for (int p = 0; p < kh; ++p) {
        int y = i * sh + p * dh - top;
        if (y < 0 || y >= height) continue;
        for (int q = 0; q < kw; ++q) {
            int x = j * sw + q * dw - left;
            if (x < 0 || x >= width) continue;
            long base = (((long)n * height + y) * width + x) * channels + group * per_group_in;
            long wbase = (long)(p * kw + q) * per_group_in;
            for (int c = 0; c < per_group_in; ++c) {
                long a = (long)act_terms[base + c];
                is_nan |= act_nan[base + c];
                acc0 += a * (long)w0[wbase + c];
                acc1 += a * (long)w1[wbase + c];
                acc2 += a * (long)w2[wbase + c];
                acc3 += a * (long)w3[wbase + c];
                acc4 += a * (long)w4[wbase + c];
                acc5 += a * (long)w5[wbase + c];
                acc6 += a * (long)w6[wbase + c];
                acc7 += a * (long)w7[wbase + c];
            }
        }
    }
    int scale = act_floor[n] - 2 * (mantissa_bits - 1);
    long at = pixel * filters + o;
    if (is_nan) {
        out[at + 0] = out[at + 1] = out[at + 2] = out[at + 3] = out[at + 4] = out[at + 5] = out[at + 6] = out[at + 7] = as_float(CANONICAL_NAN);
        return;
    }
    out[at + 0] = scaled_to_float(acc0, scale + weight_floor[o + 0]);
    out[at + 1] = scaled_to_float(acc1, scale + weight_floor[o + 1]);
    out[at + 2] = scaled_to_float(acc2, scale + weight_floor[o + 2]);
    out[at + 3] = scaled_to_float(acc3, scale + weight_floor[o + 3]);
    out[at + 4] = scaled_to_float(acc4, scale + weight_floor[o + 4]);
    out[at + 5] = scaled_to_float(acc5, scale + weight_floor[o + 5]);
    out[at + 6] = scaled_to_float(acc6, scale + weight_floor[o + 6]);
    out[at + 7] = scaled_to_float(acc7, scale + weight_floor[o + 7]);
}

/* Integer terms of quantized activations (section 4.2): m * 2^(X - (G - W)), NaN flags. */
__kernel void activation_terms(__global const char *mantissas, __global const uchar *codes,
                               int length, int block, int blocks, int rows_per_group,
                               int window, __global const int *anchor,
                               __global int *terms, __global uchar *nan_flags) {
    long id = get_global_id(0);
    long row = id / length;
    int b = (int)(id % length) / block;
    uchar code = codes[row * blocks + b];
    int group = (int)(row / rows_per_group);
    if (code == NAN_CODE) {
        terms[id] = 0;
        nan_flags[id] = 1;
        return;
    }
    int shift = ((int)code - EXP_BIAS) - (anchor[group] - window);
    terms[id] = (int)mantissas[id] * (1 << shift);
    nan_flags[id] = 0;
}

/* --- Section 5: the vector unit, one work-item per element ---------------------------- */

__kernel void bias(__global const float *x, __global const float *b, int channels,
                   __global float *out) {
    long id = get_global_id(0);
    out[id] = canon(x[id] + b[id % channels]);
}

__kernel void scale_shift(__global const float *x, __global const float *s,
                          __global const float *t, int channels, __global float *out) {
    long id = get_global_id(0);
    int c = (int)(id % channels);
    float product = canon(x[id] * s[c]);       /* two roundings: FP_CONTRACT is off */
    out[id] = canon(product + t[c]);
}

inline float relu_value(float x) {
    if (isnan(x)) return x;
    return x > 0.0f ? x : 0.0f;
}

__kernel void relu(__global const float *x, __global float *out) {
    long id = get_global_id(0);
    out[id] = relu_value(x[id]);
}

__kernel void relu6(__global const float *x, __global float *out) {
    long id = get_global_id(0);
    float y = relu_value(x[id]);
    out[id] = (y > 6.0f) ? 6.0f : y;           /* NaN > 6 is false: NaN stays */
}

__kernel void add(__global const float *a, __global const float *b, __global float *out) {
    long id = get_global_id(0);
    out[id] = canon(a[id] + b[id]);
}

/* max_pool / avg_pool over in-range positions, row-major (kh outer, kw inner); r(n) comes
 * from the host's table ``reciprocals`` (OpenCL's 1.0f / n is not correctly rounded). */
__kernel void pool(__global const float *x, int height, int width, int channels,
                   int ph, int pw, int sh, int sw, int top, int left, int out_h, int out_w,
                   int average, __global const float *reciprocals, __global float *out) {
    long id = get_global_id(0);
    int c = (int)(id % channels);
    long rest = id / channels;
    int j = (int)(rest % out_w);
    rest /= out_w;
    int i = (int)(rest % out_h);
    int n = (int)(rest / out_h);
    float acc = 0.0f;
    int count = 0, is_nan = 0;
    for (int p = 0; p < ph; ++p) {
        int y = i * sh + p - top;
        if (y < 0 || y >= height) continue;
        for (int q = 0; q < pw; ++q) {
            int col = j * sw + q - left;
            if (col < 0 || col >= width) continue;
            float v = x[(((long)n * height + y) * width + col) * channels + c];
            if (average) {
                acc = count == 0 ? v : canon(acc + v);
            } else if (isnan(v)) {
                is_nan = 1;
            } else if (count == 0 || v > acc) {
                acc = v;
            }
            ++count;
        }
    }
    if (average) {
        out[id] = canon(acc * reciprocals[count]);
    } else {
        out[id] = is_nan ? as_float(CANONICAL_NAN) : acc;
    }
}
