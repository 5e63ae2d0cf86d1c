"""experiments/decode_bench: the device busy time and span of a trace's kernel events, against a
brute-force union over integer time points."""

from hypothesis import given
from hypothesis import strategies as st

from experiments.decode_bench import busy_and_span

events = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 40), st.just("k")), min_size=1, max_size=12
)


@given(events)
def test_busy_is_the_union_of_kernel_intervals_and_span_their_extent(evs):
    covered = {t for start, dur, _ in evs for t in range(start, start + dur)}
    busy, span = busy_and_span(evs)
    assert round(busy * 1e6) == len(covered)
    extent = max(s + d for s, d, _ in evs) - min(s for s, _, _ in evs)
    assert round(span * 1e6) == extent
    assert busy <= span + 1e-12


@given(events)
def test_idle_gaps_add_up_to_span_minus_busy(evs):
    from experiments.decode_bench import idle_gaps

    ms = [(s * 10**6, d * 10**6, f"k_{i % 3}") for i, (s, d, _) in enumerate(evs)]
    busy, span = busy_and_span(ms)
    gaps = idle_gaps(ms, top=10**6)
    assert abs(sum(gaps.values()) - (span - busy)) < 1e-6
    assert all(" → " in k and not k[-1].isdigit() for k in gaps)


def test_report_flags_step_estimates_that_disagree():
    from experiments.decode_bench import _disagree

    assert _disagree({"ms_per_step": 0.908, "ms_per_step_total": 1.184}) == " (disagree)"
    assert _disagree({"ms_per_step": 1.108, "ms_per_step_total": 1.112}) == ""
    assert _disagree({"ms_per_step": 1.0}) == ""  # rows written before the long-run estimate
