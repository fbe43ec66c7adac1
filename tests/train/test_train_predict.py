"""predict's generation helpers."""

from __future__ import annotations

from exar.train.predict import static_cache_length


def test_static_cache_length_is_the_next_power_of_two_from_64():
    """A GPU run compiles one decode step per padded length: few lengths, none shorter than the prompt."""
    assert [static_cache_length(n) for n in (1, 63, 64, 65, 128, 129, 1000, 1024, 1025)] == \
        [64, 64, 64, 128, 128, 256, 1024, 1024, 2048]
