/* Rates with intervals (docs/EVAL.md, "Intervals").
 *
 * A refusal rate is k refusals out of n prompts. Its 95% interval is the Wilson score interval
 * rather than the textbook p ± z·sqrt(p(1-p)/n): that one collapses to a zero-width interval at
 * k = 0 or k = n, exactly where safeguards live (0% refusals on safe prompts, 100% on harmful
 * ones), and leaves [0, 1] at small n. Wilson's interval inverts the score test instead:
 *
 *   centre = (p + z²/2n) / (1 + z²/n),   half = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
 *
 * ΔRR is a difference of two independent proportions; its interval is Newcombe's hybrid score
 * interval (Newcombe 1998, method 10), which combines the two Wilson intervals and keeps their
 * good behaviour at the edges. */
#include <math.h>

#include "eval/eval.h"
#include "eval/report.h"

void sf_wilson_interval(int64_t k, int64_t n, double z, double *lo, double *hi) {
    if (n <= 0 || k < 0 || k > n) {
        *lo = 0.0;
        *hi = 1.0;
        return;
    }
    const double nn = (double)n, p = (double)k / nn, z2 = z * z;
    const double denom = 1.0 + z2 / nn;
    const double centre = (p + z2 / (2.0 * nn)) / denom;
    const double half = z * sqrt(p * (1.0 - p) / nn + z2 / (4.0 * nn * nn)) / denom;
    /* At k = 0 (k = n) the bound is exactly 0 (1) in exact arithmetic; say so rather than
     * print a rounding residue such as -1e-17. */
    *lo = k == 0 ? 0.0 : fmax(0.0, centre - half);
    *hi = k == n ? 1.0 : fmin(1.0, centre + half);
}

void sf_newcombe_interval(int64_t k1, int64_t n1, int64_t k2, int64_t n2, double z, double *lo,
                          double *hi) {
    if (n1 <= 0 || n2 <= 0) {
        *lo = -1.0;
        *hi = 1.0;
        return;
    }
    double l1, u1, l2, u2;
    sf_wilson_interval(k1, n1, z, &l1, &u1);
    sf_wilson_interval(k2, n2, z, &l2, &u2);
    const double p1 = (double)k1 / (double)n1, p2 = (double)k2 / (double)n2, d = p1 - p2;
    *lo = d - sqrt((p1 - l1) * (p1 - l1) + (u2 - p2) * (u2 - p2));
    *hi = d + sqrt((u1 - p1) * (u1 - p1) + (p2 - l2) * (p2 - l2));
}
