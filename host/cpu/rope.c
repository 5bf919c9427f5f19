/* Rotary position embeddings: the frequency tables of transformers' ROPE_INIT_FUNCTIONS and the
 * "rotate half" rotation of apply_rotary_pos_emb.
 *
 * Everything is computed in double, so this is the formula's value to a few double ulps.
 * transformers evaluates the same formula in fp32 (inv_freq, then position * inv_freq), and
 * an fp32 angle at position p is off by up to half an ulp of p: its cos and sin drift from
 * these by ~6e-6 at p = 128, ~1e-4 at p = 2048, ~5e-4 at p = 8192. Comparisons with
 * transformers at long positions must allow for that. */
#include "cpu/ops.h"

#include <math.h>

/* theta^(-2i/d) for i < d/2, as `1.0 / (base ** (arange(0, d, 2) / d))`. */
static double default_inv_freq(double theta, int32_t head_dim, int32_t i) {
    return 1.0 / pow(theta, (double)(2 * i) / (double)head_dim);
}

/* Llama 3.1: wavelengths shorter than original_max / high_freq_factor keep their frequency,
 * longer than original_max / low_freq_factor are divided by factor, and the band between is a
 * linear blend in original_max / wavelength. The comparisons reproduce transformers' torch.where
 * masks exactly: "divide" is wavelen > low_freq_wavelen, "keep" is wavelen < high_freq_wavelen,
 * and everything else (both boundaries included) is blended; the blend equals the neighbouring
 * band's value at either boundary, so the choice there only matters to the last bit. */
static double llama3_inv_freq(const sf_llm_config *cfg, double inv) {
    const double two_pi = 6.283185307179586476925286766559;
    double factor = cfg->rope.factor;
    double low = cfg->rope.low_freq_factor;
    double high = cfg->rope.high_freq_factor;
    double old_len = (double)cfg->rope.original_max_position_embeddings;
    double low_freq_wavelen = old_len / low;
    double high_freq_wavelen = old_len / high;
    double wavelen = two_pi / inv;

    if (wavelen > low_freq_wavelen) return inv / factor;
    if (wavelen < high_freq_wavelen) return inv;
    double smooth = (old_len / wavelen - low) / (high - low);
    return (1.0 - smooth) * inv / factor + smooth * inv;
}

void sf_cpu_rope_freqs(const sf_llm_config *cfg, int64_t seq_len, double *inv_freq,
                       double *attention_scale) {
    int32_t half = cfg->head_dim / 2;
    *attention_scale = 1.0;
    /* longrope switches the whole table to the long factors once a request passes the
     * pretraining context, as transformers' longrope_frequency_update does with
     * seq_len = max(position_ids) + 1. */
    const float *ext = NULL;
    if (cfg->rope.type == SF_ROPE_LONGROPE) {
        ext = seq_len > (int64_t)cfg->rope.original_max_position_embeddings
                  ? cfg->rope.long_factor
                  : cfg->rope.short_factor;
        *attention_scale = cfg->rope.attention_factor;
    }
    for (int32_t i = 0; i < half; i++) {
        double inv = default_inv_freq(cfg->rope_theta, cfg->head_dim, i);
        switch (cfg->rope.type) {
        case SF_ROPE_DEFAULT: break;
        case SF_ROPE_LINEAR: inv /= cfg->rope.factor; break;
        case SF_ROPE_LLAMA3: inv = llama3_inv_freq(cfg, inv); break;
        case SF_ROPE_LONGROPE:
            /* 1 / (ext * theta^(2i/d)), the factor applied to the wavelength. */
            inv = 1.0 / ((double)ext[i] * pow(cfg->rope_theta, (double)(2 * i) / cfg->head_dim));
            break;
        }
        inv_freq[i] = inv;
    }
}

/* Rotates each (x[i], x[i + half]) pair of every head by angle sign * positions[t] * inv_freq[i],
 * scaled by attention_scale: the forward (sign +1) and its transpose (sign -1) share this. */
static void rotate(float *x, const int32_t *positions, int64_t n, int32_t n_heads,
                   int32_t head_dim, const double *inv_freq, double attention_scale, double sign) {
    int32_t half = head_dim / 2;
    int64_t row = (int64_t)n_heads * head_dim;
    SF_OMP(omp parallel for schedule(static))
    for (int64_t t = 0; t < n; t++) {
        float *xt = x + t * row;
        double pos = (double)positions[t];
        /* Frequency outermost: one cos/sin per (token, frequency) serves every head, and no
         * per-thread table of head_dim / 2 angles is needed. */
        for (int32_t i = 0; i < half; i++) {
            double angle = pos * inv_freq[i];
            double c = cos(angle) * attention_scale;
            double s = sign * sin(angle) * attention_scale;
            for (int32_t h = 0; h < n_heads; h++) {
                float *xh = xt + (int64_t)h * head_dim;
                double x0 = xh[i];
                double x1 = xh[i + half];
                xh[i] = (float)(x0 * c - x1 * s);
                xh[i + half] = (float)(x1 * c + x0 * s);
            }
        }
    }
}

void sf_cpu_rope_apply(float *x, const int32_t *positions, int64_t n, int32_t n_heads,
                       int32_t head_dim, const double *inv_freq, double attention_scale) {
    rotate(x, positions, n, n_heads, head_dim, inv_freq, attention_scale, 1.0);
}

/* The rotation is orthogonal up to the factor attention_scale, so its transpose is the rotation
 * by the negative angle with the same factor: (x0, x1) <- (x0 c + x1 s, x1 c - x0 s). */
void sf_cpu_rope_backward(float *d, const int32_t *positions, int64_t n, int32_t n_heads,
                          int32_t head_dim, const double *inv_freq, double attention_scale) {
    rotate(d, positions, n, n_heads, head_dim, inv_freq, attention_scale, -1.0);
}
