"""The block equation is read off a real block, so it must match He et al. (2016b, Table 2)."""

from __future__ import annotations

import pytest

from resviz import BlockConfig
from resviz.nn.equations import block_equation

RELU, BN = r"\mathrm{ReLU}", r"\mathrm{BN}"


def _strip(tex: str) -> str:
    return tex.replace(r"\!\left(", "(").replace(r"\right)", ")").replace(r"\, ", " ").replace("W_{", "W").replace("}", "")


@pytest.mark.parametrize(("order", "block", "branch"), [
    ("post", "y = ReLU(F(x) + S(x))", "F(x) = BN(W2 ReLU(BN(W1 x)))"),
    ("bn_after_add", "y = ReLU(BN(F(x) + S(x)))", "F(x) = W2 ReLU(BN(W1 x))"),
    ("relu_before_add", "y = F(x) + S(x)", "F(x) = ReLU(BN(W2 ReLU(BN(W1 x))))"),
    ("relu_only_pre", "y = F(x) + S(x)", "F(x) = BN(W2 ReLU(BN(W1 ReLU(x))))"),
    ("pre", "y = F(x) + S(x)", "F(x) = W2 ReLU(BN(W1 ReLU(BN(x))))"),
])
def test_orders_match_the_paper(order: str, block: str, branch: str) -> None:
    eq = block_equation(BlockConfig(order=order))
    assert _strip(eq.block).replace(r"\mathrm{", "") == block
    assert _strip(eq.branch).replace(r"\mathrm{", "") == branch


def test_scaling_bottleneck_and_group_norm() -> None:
    eq = block_equation(BlockConfig(kind="bottleneck", order="pre", norm="group", scaling="fixed", alpha=0.2))
    assert eq.branch.startswith(r"F(x) = \alpha\, W_{3}")
    assert r"\mathrm{GN}" in eq.branch and r"\mathrm{BN}" not in eq.branch
    assert "alpha = 0.2" in eq.legend and "1x1" in eq.legend


def test_plain_and_shortcut_variants() -> None:
    assert block_equation(BlockConfig()).plain == rf"y = {RELU}\!\left(F(x)\right)"
    assert "pad" in block_equation(BlockConfig(shortcut="A")).shortcut
    assert block_equation(BlockConfig(shortcut="C")).shortcut == rf"S(x) = {BN}\!\left(W_s\, x\right)"
    assert block_equation(BlockConfig(norm="none", act="identity")).branch == r"F(x) = W_{2}\, W_{1}\, x"
