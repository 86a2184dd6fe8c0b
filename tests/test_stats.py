"""The query layer's intervals against published tables: Student-t quantiles and Wilson's score interval."""

from __future__ import annotations

import math

import pytest

from store.stats import t_cdf, t_half_width, t_quantile, wilson_interval

# t_{0.975, df} from any statistics table (e.g. NIST/SEMATECH e-Handbook, table 1.4.2.3.2), to 3 decimals.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize(("df", "expected"), sorted(T_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-10)


def test_t_tends_to_the_normal_and_is_symmetric():
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)
    assert t_cdf(0.0, 7) == pytest.approx(0.5) and t_cdf(-1.3, 7) == pytest.approx(1 - t_cdf(1.3, 7))
    assert t_quantile(0.995, 4) == pytest.approx(4.604, abs=5e-4)


def test_half_width_needs_two_samples():
    assert t_half_width(2.0, 5) == pytest.approx(2.776445 * 2.0 / math.sqrt(5), rel=1e-6)
    assert math.isnan(t_half_width(2.0, 1)) and math.isnan(t_half_width(float("nan"), 5))
    with pytest.raises(ValueError, match="at least two samples"):
        t_quantile(0.975, 0)


def test_wilson_interval_matches_hand_computed_cases():
    # 9 of 10: centre (0.9 + 1.96^2/20) / (1 + 1.96^2/10); Wilson 1927, as tabulated by Newcombe (1998), case 9/10.
    low, high = wilson_interval(9, 10)
    assert (low, high) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
