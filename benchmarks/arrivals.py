"""Request arrival times: a gamma renewal process, Poisson at burstiness 1.

Gaps between requests are drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)),
whose mean is 1/rate whatever the burstiness, so the offered load stays ``rate``
while the shape sets how clumped arrivals are: below 1 burstier than Poisson,
above 1 more even. This is the arrival model of vLLM's and SGLang's serving
benchmarks. An infinite rate sends every request at time zero.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets_s(
    num_requests: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> list[float]:
    """Send time of each request in seconds from the start; the first is at 0.

    Offsets are cumulative, so the schedule does not drift with the time it takes
    to dispatch each request.
    """
    if request_rate <= 0:
        raise ValueError("request rate must be positive (use inf to send all at once)")
    if burstiness <= 0:
        raise ValueError("burstiness must be positive")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps_s = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    gaps_s[0] = 0.0
    return np.cumsum(gaps_s).tolist()
