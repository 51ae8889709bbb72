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

/* One work-item per block: section 3.3 for its elements, its E8M0 code, and its shift
 * s = X - L of section 4.2 (-1 for a NaN block), what the block matrix unit reads. */
__kernel void quantize_blocks(__global const float *x, int length, int block, int blocks,
                              int rows_per_group, int mantissa_bits, int window,
                              __global const int *raw, __global const int *anchor,
                              __global char *mantissas, __global uchar *codes,
                              __global int *shifts) {
    int id = get_global_id(0);                 /* row * blocks + b */
    int row = id / blocks;
    int start = (id - row * blocks) * block;
    int stop = min(start + block, length);
    __global const float *in = x + (long)row * length;
    __global char *m = mantissas + (long)row * length;
    int e = raw[id];
    if (e == 128) {
        for (int i = start; i < stop; ++i) m[i] = 0;
        codes[id] = NAN_CODE;
        shifts[id] = -1;
        return;
    }
    int floor = anchor[row / rows_per_group] - window;
    int shared_exponent = max(e, floor);
    int k = (mantissa_bits - 1) - shared_exponent, max_mantissa = (1 << mantissa_bits) - 1;
    for (int i = start; i < stop; ++i) {
        uint bits = as_uint(in[i]);
        int magnitude = round_magnitude(bits & ABS_MASK, k, max_mantissa);
        m[i] = (char)((bits >> 31) ? -magnitude : magnitude);
    }
    codes[id] = (uchar)(shared_exponent + EXP_BIAS);
    shifts[id] = shared_exponent - floor;
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

/* --- Section 5.2: the vector unit's elementary operations -------------------------- */

inline float relu_value(float x) {
    if (isnan(x)) return x;
    return x > 0.0f ? x : 0.0f;
}

/* Activation codes: 0 linear, 1 relu, 2 relu6 (NaN > 6 is false: NaN stays). */
inline float activate(float x, int activation) {
    if (activation == 0) return x;
    float y = relu_value(x);
    return (activation == 2 && y > 6.0f) ? 6.0f : y;
}

#define EPILOGUE_BIAS 1
#define EPILOGUE_SCALE_SHIFT 2
#define EPILOGUE_ACTIVATION_SHIFT 2

/* A matrix op's epilogue on one output of channel c, in the order the separate ops run:
 * bias, folded batch norm (two roundings: FP_CONTRACT is off), activation. Fusing it into the
 * matrix kernel changes no bits and saves a trip through memory per op. */
inline float epilogue(float x, int c, int flags, __global const float *bias,
                      __global const float *scale, __global const float *shift) {
    if (flags & EPILOGUE_BIAS) x = canon(x + bias[c]);
    if (flags & EPILOGUE_SCALE_SHIFT) x = canon(canon(x * scale[c]) + shift[c]);
    return activate(x, flags >> EPILOGUE_ACTIVATION_SHIFT);
}

#define EPILOGUE_ARGS int flags, __global const float *bias, __global const float *scale, \
                      __global const float *shift
#define EPILOGUE_PASS flags, bias, scale, shift
#define EPILOGUE(x, c) epilogue((x), (c), EPILOGUE_PASS)

/* The part of section 4.2's output scale La + Lw - 2(M - 1) shared by a sample's outputs,
 * La = Ga - W from its anchor (on the device: no trip to the host between quantizing and
 * convolving). */
inline int sample_scale(__global const int *anchor, int n, int window, int mantissa_bits) {
    return anchor[n] - window - 2 * (mantissa_bits - 1);
}

#define CONV_TILE 8

/* Rounds and stores one pixel's sums for filters o .. o + 7; those at or past `filters` pad
 * the last tile and are not stored. */
inline void store_tile(__global float *out, int o, int filters, int is_nan,
                       const long *sums, int scale_base, __global const int *weight_floor,
                       EPILOGUE_ARGS) {
    for (int k = 0; k < CONV_TILE && o + k < filters; ++k) {
        float y = is_nan ? as_float(CANONICAL_NAN)
                         : scaled_to_float(sums[k], scale_base + weight_floor[o + k]);
        out[k] = EPILOGUE(y, o + k);
    }
}

/* The matrix unit (section 4) as a direct convolution, one work-item per output (n, i, j, o).
 * Terms are the integers m * 2^(X - L) of section 4.2; nan flags mark NaN-block elements.
 * Used where the blocks of conv2d_blocks do not line up (few channels, depthwise, groups). */
__kernel void conv2d(__global const int *act_terms, __global const uchar *act_nan,
                     __global const int *anchor, int window,
                     int height, int width, int channels,
                     __global const int *weight_terms, __global const int *weight_floor,
                     int filters, int kh, int kw, int sh, int sw, int dh, int dw,
                     int top, int left, int groups, int out_h, int out_w, int mantissa_bits,
                     EPILOGUE_ARGS, __global float *out) {
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
    int scale_base = sample_scale(anchor, n, window, mantissa_bits);
    float result = is_nan ? as_float(CANONICAL_NAN)
                          : scaled_to_float(acc, scale_base + weight_floor[o]);
    out[id] = EPILOGUE(result, o);
}

/* The same sums, CONV_TILE (8) filters per work-item (4 and 16 measured slower on PoCL): each
 * activation term is loaded once for eight products (the filters of one group;
 * filters_per_group % 8 == 0). Same integers, same single rounding per output: bit-identical
 * to conv2d. The accumulators are spelled out: PoCL keeps scalars in registers but not a
 * private array. */
#define TILE_MAC(at, wat) do {                                                               \
        long a = (long)act_terms[at];                                                     \
        is_nan |= act_nan[at];                                                            \
        acc0 += a * (long)w0[wat]; acc1 += a * (long)w1[wat];                             \
        acc2 += a * (long)w2[wat]; acc3 += a * (long)w3[wat];                             \
        acc4 += a * (long)w4[wat]; acc5 += a * (long)w5[wat];                             \
        acc6 += a * (long)w6[wat]; acc7 += a * (long)w7[wat];                             \
    } while (0)

__kernel void conv2d_tiled(__global const int *act_terms, __global const uchar *act_nan,
                           __global const int *anchor, int window,
                           int height, int width, int channels,
                           __global const int *weight_terms, __global const int *weight_floor,
                           int filters, int kh, int kw, int sh, int sw, int dh, int dw,
                           int top, int left, int groups, int out_h, int out_w,
                           int mantissa_bits, EPILOGUE_ARGS, __global float *out) {
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
    /* With one group and no dilation across columns, a kernel row whose columns all lie inside
     * the image is one contiguous run of kw * channels terms in NHWC, and in the weights: one
     * long loop instead of kw short ones (the first layer of an RGB model has 3 channels). */
    int whole_rows = groups == 1 && dw == 1;
    int x_first = j * sw - left;
    int row_inside = x_first >= 0 && x_first + kw - 1 < width;
    for (int p = 0; p < kh; ++p) {
        int y = i * sh + p * dh - top;
        if (y < 0 || y >= height) continue;
        if (whole_rows && row_inside) {
            long base = (((long)n * height + y) * width + x_first) * channels;
            long wbase = (long)p * kw * channels;
            for (int c = 0; c < kw * channels; ++c) {
                TILE_MAC(base + c, wbase + c);
            }
            continue;
        }
        for (int q = 0; q < kw; ++q) {
            int x = j * sw + q * dw - left;
            if (x < 0 || x >= width) continue;
            long base = (((long)n * height + y) * width + x) * channels + group * per_group_in;
            long wbase = (long)(p * kw + q) * per_group_in;
            for (int c = 0; c < per_group_in; ++c) {
                TILE_MAC(base + c, wbase + c);
            }
        }
    }
    long sums[CONV_TILE] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
    store_tile(out + pixel * filters + o, o, filters, is_nan, sums,
               sample_scale(anchor, n, window, mantissa_bits), weight_floor, EPILOGUE_PASS);
}

#define BLOCK_DOT(k) d##k += av * (int)w[k * span + c]
#define SHIFT_ADD(k) acc##k += (long)d##k << (sa + s[k * wblocks])

/* Section 4.2 as hardware builds it: for each pair of aligned activation and weight blocks an
 * int8 x int8 dot product in 32 bits (below 2^19 for blocks of up to 32), shifted by sa + sw
 * into a 64-bit accumulator; CONV_TILE filters per work-item, weights padded to whole tiles
 * with zero mantissas. Needs one group and channels % block == 0, so that weight blocks along
 * (kh, kw, c) coincide with activation blocks along c. The same exact integer sums as conv2d:
 * the same bits, with a quarter of the memory traffic and 32-bit multiplies. Scalar code on
 * purpose: PoCL vectorises the channel loop itself, and explicit vectors measured 3x slower. */
__kernel void conv2d_blocks(__global const char *act, __global const int *act_shift,
                            __global const int *anchor, int window,
                            int height, int width, int channels, int block,
                            __global const char *weights, __global const int *weight_shift,
                            __global const int *weight_floor,
                            int filters, int kh, int kw, int sh, int sw, int dh, int dw,
                            int top, int left, int out_h, int out_w, int mantissa_bits,
                            EPILOGUE_ARGS, __global float *out) {
    int id = get_global_id(0);
    int tiles = (filters + CONV_TILE - 1) / CONV_TILE;
    int o = (id % tiles) * CONV_TILE;
    int pixel = id / tiles;
    int j = pixel % out_w;
    int rest = pixel / out_w;
    int i = rest % out_h;
    int n = rest / out_h;
    int blocks = channels / block;             /* activation blocks per pixel */
    int wblocks = kh * kw * blocks;            /* weight blocks per filter */
    long span = (long)wblocks * block;         /* weight elements per filter */
    __global const char *w0 = weights + (long)o * span;
    __global const int *s0 = weight_shift + (long)o * wblocks;
    long acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0, acc4 = 0, acc5 = 0, acc6 = 0, acc7 = 0;
    int is_nan = 0;
    for (int p = 0; p < kh; ++p) {
        int y = i * sh + p * dh - top;
        if (y < 0 || y >= height) continue;
        for (int q = 0; q < kw; ++q) {
            int x = j * sw + q * dw - left;
            if (x < 0 || x >= width) continue;
            int first = ((n * height + y) * width + x) * blocks;
            int wfirst = (p * kw + q) * blocks;
            for (int b = 0; b < blocks; ++b) {
                int sa = act_shift[first + b];
                if (sa < 0) {                  /* a NaN block (section 4.1) */
                    is_nan = 1;
                    continue;
                }
                __global const char *a = act + (long)(first + b) * block;
                __global const char *w = w0 + (long)(wfirst + b) * block;
                __global const int *s = s0 + wfirst + b;
                int d0 = 0, d1 = 0, d2 = 0, d3 = 0, d4 = 0, d5 = 0, d6 = 0, d7 = 0;
                for (int c = 0; c < block; ++c) {
                    int av = a[c];
                    BLOCK_DOT(0); BLOCK_DOT(1); BLOCK_DOT(2); BLOCK_DOT(3);
                    BLOCK_DOT(4); BLOCK_DOT(5); BLOCK_DOT(6); BLOCK_DOT(7);
                }
                SHIFT_ADD(0); SHIFT_ADD(1); SHIFT_ADD(2); SHIFT_ADD(3);
                SHIFT_ADD(4); SHIFT_ADD(5); SHIFT_ADD(6); SHIFT_ADD(7);
            }
        }
    }
    long sums[CONV_TILE] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
    store_tile(out + (long)pixel * filters + o, o, filters, is_nan, sums,
               sample_scale(anchor, n, window, mantissa_bits), weight_floor, EPILOGUE_PASS);
}

/* Integer terms m * 2^s of section 4.2 (s = X - L from quantize_blocks) and NaN flags, for
 * the convolutions whose blocks do not line up. */
__kernel void activation_terms(__global const char *mantissas, __global const int *shifts,
                               int length, int block, int blocks,
                               __global int *terms, __global uchar *nan_flags) {
    long id = get_global_id(0);
    long row = id / length;
    int b = (int)(id % length) / block;
    int shift = shifts[row * blocks + b];
    terms[id] = shift < 0 ? 0 : (int)mantissas[id] * (1 << shift);
    nan_flags[id] = shift < 0;
}

/* --- Section 5: the vector unit, one work-item per element ---------------------------- */

/* bias, scale_shift, relu and relu6 as ops of their own: the matrix epilogue, alone. */
__kernel void channel_ops(__global const float *x, int channels, EPILOGUE_ARGS,
                          __global float *out) {
    long id = get_global_id(0);
    out[id] = EPILOGUE(x[id], (int)(id % channels));
}

__kernel void add(__global const float *a, __global const float *b, int activation,
                  __global float *out) {
    long id = get_global_id(0);
    out[id] = activate(canon(a[id] + b[id]), activation);
}

/* Layout ops copy bits (section 5.2), so they move uints, never floats. */
__kernel void copy_channels(__global const uint *x, int channels, int out_channels, int offset,
                            __global uint *out) {
    long id = get_global_id(0);
    long pixel = id / channels;
    out[pixel * out_channels + offset + (int)(id % channels)] = x[id];
}

__kernel void zero_pad(__global const uint *x, int height, int width, int channels,
                       int top, int left, int out_h, int out_w, __global uint *out) {
    long id = get_global_id(0);
    int c = (int)(id % channels);
    long rest = id / channels;
    int col = (int)(rest % out_w) - left;
    rest /= out_w;
    int row = (int)(rest % out_h) - top;
    long n = rest / out_h;
    int inside = row >= 0 && row < height && col >= 0 && col < width;
    out[id] = inside ? x[((n * height + row) * width + col) * channels + c] : 0u;
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
