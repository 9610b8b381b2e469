"""Attribute encoding and the checks users meet at the command line."""
from __future__ import annotations

import numpy as np
import pytest

from atlasmorph_cli.model.attributes import AttributeEncoder
from atlasmorph_cli.errors import AtlasMorphError

ROWS = [{"age": "20", "sex": "F"}, {"age": "60", "sex": "M"}, {"age": "40", "sex": "female"}]


def test_fit_encode_and_roundtrip():
    enc = AttributeEncoder.fit(["age", "sex"], ROWS)
    assert [s.kind for s in enc.specs] == ["numeric", "categorical"]
    assert enc.specs[1].categories == ["F", "M"] and enc.width == 3
    v, warn = enc.parse({"age": 40, "sex": "m"})
    np.testing.assert_allclose(enc.encode(v), [0.0, 0.0, 1.0], atol=1e-6)
    assert warn == []
    again = AttributeEncoder.from_dict(enc.to_dict())
    np.testing.assert_array_equal(again.encode(v), enc.encode(v))
    np.testing.assert_allclose(enc.encode_average(), [0.0, 0.5, 0.5])


def test_bad_values():
    enc = AttributeEncoder.fit(["age", "sex"], ROWS)
    for bad, msg in [({"age": -3, "sex": "F"}, "between 0"), ({"age": "old", "sex": "F"}, "number"),
                     ({"age": 30, "sex": "X"}, "unknown sex"), ({"sex": "F"}, "missing attribute")]:
        with pytest.raises(AtlasMorphError, match=msg):
            enc.parse(bad)
    _, warn = enc.parse({"age": 90, "sex": "F"})
    assert warn and "outside the training range" in warn[0]
