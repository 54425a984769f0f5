"""URL query parameters round-trip configs and reject bad values with a readable message."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resviz import BlockConfig, NetConfig, TrainConfig
from resviz.config import ACTIVATIONS, NORMS, ORDERS, SCALINGS, SHORTCUTS
from resviz.urlconfig import decode_net, decode_train, encode_net, encode_train, format_indices, parse_indices

BASE = NetConfig(depth=32, width=8, num_classes=8)


def test_defaults_encode_to_nothing() -> None:
    assert encode_net(BASE, BASE) == {}
    assert encode_train(TrainConfig()) == {}
    assert decode_net({}, BASE) == BASE


def test_round_trip_with_skips() -> None:
    cfg = NetConfig(depth=56, width=16, input_size=16, block=BlockConfig(order="pre", scaling="fixed", alpha=0.25),
                    skips=tuple(i not in (0, 1, 2, 7) for i in range(27)))
    params = encode_net(cfg, BASE)
    assert params["off"] == "0-2,7" and params["d"] == "56" and params["o"] == "pre"
    assert decode_net(params, BASE) == cfg


@settings(max_examples=40, deadline=None)
@given(order=st.sampled_from(ORDERS), norm=st.sampled_from(NORMS[:2]), act=st.sampled_from(ACTIVATIONS),
       shortcut=st.sampled_from(SHORTCUTS), scaling=st.sampled_from(SCALINGS), n=st.integers(1, 18),
       zero=st.booleans(), sd=st.sampled_from([0.0, 0.1, 0.5]))
def test_round_trip_any_block(order: str, norm: str, act: str, shortcut: str, scaling: str, n: int, zero: bool, sd: float) -> None:
    block = BlockConfig(order=order, norm=norm, act=act, shortcut=shortcut, scaling=scaling, zero_init_last=zero,
                        stochastic_depth=sd, alpha=0.3)
    cfg = NetConfig(depth=6 * n + 2, width=8, block=block)
    assert decode_net(encode_net(cfg, BASE), BASE) == cfg


@pytest.mark.parametrize(("params", "match"), [
    ({"d": "abc"}, "depth"),
    ({"d": "33"}, "6n\\+2"),
    ({"o": "sideways"}, "order"),
    ({"z": "maybe"}, "zero_init_last"),
    ({"al": "nan"}, "alpha"),
    ({"off": "5-2"}, "off"),
    ({"off": "99"}, "block 99"),
    ({"w": "100000"}, "limit"),
    ({"d": "1202"}, "limit"),
])
def test_bad_values_raise_value_error(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_net(params, BASE)


def test_unknown_keys_are_ignored() -> None:
    assert decode_net({"utm_source": "x"}, BASE) == BASE


def test_train_round_trip_and_errors() -> None:
    cfg = TrainConfig(optimizer="adamw", lr=0.003, epochs=1.5, batch_size=32, seed=7)
    assert decode_train(encode_train(cfg)) == cfg
    with pytest.raises(ValueError, match="lr"):
        decode_train({"lr": "-1"})
    with pytest.raises(ValueError, match="batch_size"):
        decode_train({"bs": "1.5"})


def test_index_ranges() -> None:
    assert format_indices([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    assert parse_indices("0-2,5,9-10") == [0, 1, 2, 5, 9, 10]
    assert parse_indices("") == []
