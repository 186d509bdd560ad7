"""critical_weights.core.streams: every random choice has its own stream of the one seed, so
the in-sample texts validate and superweights measure are one draw, independent of prepare's."""

from __future__ import annotations

import numpy as np

from critical_weights.core import streams
from critical_weights.texts.sources import choose, in_sample


def test_the_streams_are_distinct_and_none_is_prepares_plain_seed():
    values = {name: v for name, v in vars(streams).items() if name.startswith("STREAM_")}
    assert len(values) == 8 and len(set(values.values())) == len(values)
    assert all(isinstance(v, int) and v > 0 for v in values.values())


def test_in_sample_is_the_seeded_draw_of_its_own_stream():
    ids = [[i, i + 1] for i in range(20)]
    got = in_sample(ids, 6, seed=42, key="validate.n_texts")
    want = sorted(int(i) for i in np.random.default_rng([42, streams.STREAM_TEXTS]).choice(20, size=6, replace=False))
    assert got == [ids[i] for i in want]
    assert want != choose(20, 6, seed=42)  # prepare draws from the plain seed: another choice
    assert in_sample(ids, 0, 42, "superweights.n_texts") == ids  # 0: every prepared text
