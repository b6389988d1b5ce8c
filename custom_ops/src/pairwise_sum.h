// numpy's pairwise summation of a contiguous float64 row (what np.sum(x, axis=-1) computes), for the
// native twins of numpy code that must agree with it to the last bit (codebook.cpp,
// scaled_codebook.cpp).  Those files are compiled without FMA contraction.
#pragma once

#include <cstdint>

namespace bayesq {

inline double pairwise_sum(const double* a, int64_t n) {
    if (n < 8) {
        double r = -0.0;
        for (int64_t i = 0; i < n; ++i) r += a[i];
        return r;
    }
    if (n <= 128) {
        double r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

}  // namespace bayesq
