"""Config validation and JSON round-trips."""

import json

import pytest

from resviz import BlockConfig, NetConfig, TrainConfig
from resviz.config import ACTIVATIONS, KINDS, NORMS, ORDERS, SHORTCUTS


def test_defaults_are_resnet20():
    cfg = NetConfig()
    assert cfg.depth == 20 and cfg.stage_blocks == (3, 3, 3) and cfg.num_blocks == 9
    assert cfg.skip_flags == (True,) * 9 and not cfg.is_plain


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(act="swish2"), "act='swish2' is not supported"),
        (dict(kind="wide"), "kind='wide'"),
        (dict(norm="layer"), "norm='layer'"),
        (dict(shortcut="D"), "shortcut='D'"),
        (dict(order="sideways"), "order='sideways'"),
        (dict(scaling="random"), "scaling='random'"),
        (dict(stochastic_depth=1.0), "stochastic_depth"),
        (dict(groups=0), "groups"),
        (dict(order="bn_after_add", norm="none"), "needs a norm"),
    ],
)
def test_block_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BlockConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(width=0), "width must be >= 1"),
        (dict(depth=21), "6n\\+2"),
        (dict(depth=22, block=BlockConfig(kind="bottleneck")), "9n\\+2"),
        (dict(style="imagenet", depth=20, width=64, input_size=224), "imagenet-style depth"),
        (dict(style="imagenet", depth=50, width=64, input_size=224), "uses bottleneck blocks"),
        (dict(input_size=30), "input_size=30 cannot take this net's total stride 4"),
        (dict(input_size=2), "cannot take"),
        (dict(style="imagenet", depth=18, input_size=100), "total stride 32"),
        (dict(skips=(True, False)), "skips has 2 flags but the net has 9 blocks"),
        (dict(style="resnext"), "style='resnext'"),
    ],
)
def test_net_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetConfig(**kwargs)


def test_configs_are_frozen_and_keyword_only():
    cfg = NetConfig()
    with pytest.raises(AttributeError):
        cfg.depth = 32  # type: ignore[misc]
    with pytest.raises(TypeError):
        NetConfig(20)  # type: ignore[misc]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ORDERS)
def test_net_config_round_trips_through_json(kind, order):
    cfg = NetConfig(
        depth=11 if kind == "bottleneck" else 8,
        width=8,
        input_size=16,
        block=BlockConfig(kind=kind, order=order, act="gelu", scaling="fixed", alpha=0.5, stochastic_depth=0.1),
        skips=(True, False, True),
    )
    text = cfg.to_json()
    assert json.loads(text)["block"]["order"] == order
    back = NetConfig.from_json(text)
    assert back == cfg and hash(back) == hash(cfg)


def test_from_json_gives_clear_errors():
    with pytest.raises(ValueError, match="not valid JSON"):
        NetConfig.from_json("{depth: 20")
    with pytest.raises(ValueError, match="unknown NetConfig field"):
        NetConfig.from_dict({"depht": 20})
    with pytest.raises(ValueError, match="unknown BlockConfig field"):
        NetConfig.from_dict({"block": {"knd": "basic"}})


def test_plain_twin_turns_every_skip_off():
    cfg = NetConfig(depth=8)
    twin = cfg.plain_twin()
    assert twin.is_plain and twin.skip_flags == (False,) * 3
    assert twin.residual_twin() == cfg


def test_train_config_validates_and_round_trips():
    tc = TrainConfig(optimizer="adamw", lr=1e-3, schedule="cosine")
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")


def test_option_lists_are_complete():
    assert {"relu", "gelu", "silu"} <= set(ACTIVATIONS)
    assert set(NORMS) == {"batch", "group", "none"}
    assert set(SHORTCUTS) == {"A", "B", "C"}
