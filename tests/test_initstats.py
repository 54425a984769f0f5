"""Init-time comparison of a net and its plain twin, and shape-only summaries."""

from __future__ import annotations

import numpy as np

from resviz import NetConfig, build_net, count_macs, count_params
from resviz.analysis.initstats import batch_size_for, describe_blocks, init_comparison, summarize


def test_summary_matches_a_real_net() -> None:
    cfg = NetConfig(depth=14, width=8, input_size=16)
    net = build_net(cfg)
    s = summarize(cfg)
    assert s.params == count_params(net)
    assert s.macs == count_macs(net, (3, 16, 16))
    assert s.blocks == 6


def test_describe_blocks() -> None:
    cfg = NetConfig(depth=14, width=8, input_size=16, skips=(True, False, True, True, True, True))
    blocks = describe_blocks(cfg)
    assert [b["stage"] for b in blocks] == [1, 1, 2, 2, 3, 3]
    assert blocks[1]["skip"] is False and blocks[2]["projection"] is True and blocks[2]["stride"] == 2
    assert blocks[-1]["cout"] == 32


def test_init_comparison_shapes_and_deep_plain_gradients() -> None:
    out = init_comparison(NetConfig(depth=56, width=4, input_size=8), batch_size=8)
    res, plain = out["residual"], out["plain"]
    assert out["meta"] == {"batch_size": 8, "input_size": 8, "width": 4}
    for stats in (res, plain):
        for key in ("mean_sq", "var", "branch_var", "grad_block", "grad_total"):
            assert stats[key].shape == (27,) and np.isfinite(stats[key]).all()
    # Same weights, same batch: the last block's gradient is identical in scale, but the plain net's
    # gradients grow geometrically towards the input while the residual net's stay within a small range.
    spread = {k: out[k]["grad_block"].max() / out[k]["grad_block"].min() for k in ("residual", "plain")}
    assert spread["plain"] > 10 * spread["residual"]


def test_batch_size_is_capped() -> None:
    assert batch_size_for(1) == 16
    assert batch_size_for(10**12) == 4


def test_big_nets_are_measured_smaller() -> None:
    from resviz import BlockConfig
    from resviz.analysis.initstats import MAC_BUDGET, PARAM_BUDGET, measure_config

    small = NetConfig(depth=20, width=8, input_size=16)
    assert measure_config(small) == (small, 16)
    big = NetConfig(style="imagenet", depth=152, width=64, input_size=224, block=BlockConfig(kind="bottleneck"))
    measured, batch = measure_config(big)
    assert measured.depth == 152 and measured.width < 64
    s = summarize(measured)
    assert s.params <= PARAM_BUDGET and s.macs * batch <= MAC_BUDGET
