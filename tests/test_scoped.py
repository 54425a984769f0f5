"""Temporary changes to a net: each context manager restores the exact previous state, also on exceptions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resviz import NetConfig, build_net
from resviz.nn import merge
from resviz.nn.scoped import Lesion, eval_mode, lesioned, net_lock, perturbed, preserved, removed, reordered

torch.set_num_threads(1)


@pytest.fixture
def net() -> nn.Module:
    """A ResNet-14 (6 blocks) in a state that is not the default: mixed modes, flags already changed."""
    torch.manual_seed(0)
    n = build_net(NetConfig(depth=14, width=8, input_size=16, num_classes=3))
    n.train()
    n.blocks[2].eval()
    n.set_skips([True, False, True, True, False, True])
    n.set_removed([4])
    n(torch.randn(4, 3, 16, 16))  # running statistics away from their initial values
    return n


def state(net: nn.Module) -> tuple:
    """Everything a temporary change could leave behind."""
    return (
        tuple(m.training for m in net.modules()),
        merge.skips(net),
        merge.removed_blocks(net),
        tuple(id(b) for b in net.blocks),
        tuple(p.detach().clone() for p in net.parameters()),
        tuple(b.detach().clone() for b in net.buffers()),
    )


def same(a: tuple, b: tuple) -> bool:
    flat = a[:4] == b[:4]
    return flat and all(torch.equal(x, y) for x, y in zip(a[4] + a[5], b[4] + b[5], strict=True))


def _lesion(net: nn.Module) -> object:
    return lesioned(net, Lesion(skips=(False,) * 6, removed=(0, 1)))


def _perturb(net: nn.Module) -> object:
    cm = perturbed(net)

    class Scribble:
        def __enter__(self) -> None:
            cm.__enter__()
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1.0)

        def __exit__(self, *exc: object) -> bool | None:
            return cm.__exit__(*exc)

    return Scribble()


def _preserve(net: nn.Module) -> object:
    cm = preserved(net)

    class Forward:
        def __enter__(self) -> None:
            cm.__enter__()
            net(torch.randn(4, 3, 16, 16))  # train mode: moves the running statistics; draws random numbers
            torch.rand(3)

        def __exit__(self, *exc: object) -> bool | None:
            return cm.__exit__(*exc)

    return Forward()


CHANGES = {
    "eval_mode": eval_mode,
    "lesioned": _lesion,
    "removed": lambda n: removed(n, [0, 3]),
    "reordered": lambda n: reordered(n, [1, 0, 2, 3, 4, 5]),  # blocks 0 and 1 have the same shape
    "perturbed": _perturb,
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_each_change_restores_the_previous_state_after_an_exception(net: nn.Module, name: str) -> None:
    before = state(net)
    with pytest.raises(RuntimeError, match="boom"), CHANGES[name](net):
        assert not same(state(net), before), f"{name} changed nothing"
        raise RuntimeError("boom")
    assert same(state(net), before)


@pytest.mark.parametrize("name", list(CHANGES))
def test_each_change_restores_the_previous_state_on_a_normal_exit(net: nn.Module, name: str) -> None:
    before = state(net)
    with CHANGES[name](net), eval_mode(net), torch.no_grad():
        net(torch.randn(2, 3, 16, 16))  # the changed net runs
    assert same(state(net), before)


def test_preserved_restores_buffers_and_rng_after_an_exception(net: nn.Module) -> None:
    before = state(net)
    torch.manual_seed(7)
    expected = torch.rand(5)
    torch.manual_seed(7)
    with pytest.raises(RuntimeError, match="boom"), _preserve(net):
        assert not same(state(net), before)
        raise RuntimeError("boom")
    assert torch.equal(torch.rand(5), expected)  # the RNG stream goes on as if nothing had drawn from it
    assert same(state(net), before)


def test_removed_sets_exactly_the_given_blocks_and_brings_back_earlier_removals(net: nn.Module) -> None:
    with removed(net, [1]):
        assert merge.removed_blocks(net) == (1,)
    assert merge.removed_blocks(net) == (4,)
    with pytest.raises(ValueError, match="out of range"), removed(net, [9]):
        pass
    assert merge.removed_blocks(net) == (4,)


def test_reordered_runs_the_blocks_in_the_given_order(net: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    net.eval()
    with reordered(net, [1, 0, 2, 3, 4, 5]):
        got = net(x)
    blocks = list(net.blocks)
    h = net.stem(x)
    for i in (1, 0, 2, 3, 4, 5):
        h = blocks[i](h)
    torch.testing.assert_close(got, net.fc(torch.flatten(net.pool(net.head(h)), 1)))
    with pytest.raises(ValueError, match="permutation"), reordered(net, [0, 0, 1, 2, 3, 4]):
        pass


def test_lesioned_holds_the_net_lock(net: nn.Module) -> None:
    lock = net_lock(net)
    with lesioned(net):
        assert lock._is_owned()
    assert not lock._is_owned()
