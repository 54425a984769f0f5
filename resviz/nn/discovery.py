"""Find the residual connections of any PyTorch model from its traced graph.

A *merge* is a tensor addition ``y = a + b`` whose two operands descend from a common *fork* ``x``
inside the computation (not only from the model's input through unrelated paths): ``a = F(x)`` is the
residual branch and ``b = S(x)`` the shortcut. The fork is the operands' nearest common ancestor in
the graph. Additions with a constant or parameter operand (a bias, a positional embedding), with
broadcasting, of two scalars (0-d reductions, such as the terms of a loss), or of two tensors that share
no computed ancestor are not merges.

Of the two paths from the fork, the shortcut is the one that computes less: no nodes at all, or only
modules that compute nothing (``nn.Identity``, dropout, drop-path or stochastic depth in eval mode,
checked by running them), makes an ``"identity"`` shortcut; anything else on it is a
``"projection"``.

Tracing uses ``torch.fx`` with every module that has no children as a leaf (so stochastic depth keeps
its train/eval switch and custom layers stay whole); when symbolic tracing fails, the error names the
module and the construct, and :class:`TraceError` carries it.

Shapes come from running the traced graph on fake tensors (``FakeTensorMode``: shapes and dtypes, no
arithmetic), which costs a small fraction of a real forward for large models; a graph that cannot run
on fake tensors (data-dependent shapes, in-place writes to real buffers) is run for real instead. Each
merge's layout (where its channels are: ``nchw``, ``nhwc``, ``tokens``, ``vector``) is decided from its
shape and the input's, as :mod:`resviz.nn.layout` documents.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from resviz.nn import merge as merge_seam
from resviz.nn.blocks import Add  # the merge module of ResViz's own blocks, reused here
from resviz.nn.layout import decide

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
# Modules that never compute anything at inference, by type (others are checked by running them).
NO_OP_NAMES = ("Identity", "Dropout", "DropPath", "StochasticDepth", "DropBlock", "AlphaDropout")


class TraceError(ValueError):
    """The model could not be traced; the message names the module and the construct that failed."""


@dataclass(frozen=True)
class MergeInfo:
    """One residual merge ``y = F(x) + S(x)`` found in a model, in execution order.

    Attributes:
        index: position among the model's merges (execution order).
        name: qualified name of the merge (the module that performs the addition, plus the node).
        owner: qualified name of the module whose forward performs the addition ("" for the root).
        fork: name of the graph node both operands descend from (x).
        branch: qualified names of the modules on the residual branch F, in order.
        shortcut_modules: qualified names of the modules on the shortcut S, in order.
        shortcut: ``"identity"`` (nothing computed on S) or ``"projection"``.
        shape: the shape of ``y`` (and of both operands) for the example input.
        branch_operand: 0 or 1: which argument of the addition is F(x).
        layout: where the channels are in ``shape``: ``"nchw"``, ``"nhwc"``, ``"tokens"`` (B, N, C),
            ``"vector"`` (B, C) or ``"other"`` (see :mod:`resviz.nn.layout`).
        grid: the (h, w) of the merge's tensor as maps (the patch grid of a token model); None for "other".
    """

    index: int
    name: str
    owner: str
    fork: str
    branch: tuple[str, ...]
    shortcut_modules: tuple[str, ...]
    shortcut: str
    shape: tuple[int, ...]
    branch_operand: int = 0
    layout: str = "nchw"
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class ResidualMap:
    """Every residual merge of a model, in execution order."""

    merges: tuple[MergeInfo, ...]
    opaque: tuple[str, ...] = ()  # submodules kept whole because they could not be traced

    def __len__(self) -> int:
        return len(self.merges)

    def __iter__(self):
        return iter(self.merges)

    def __getitem__(self, i: int) -> MergeInfo:
        return self.merges[i]

    def counts(self) -> dict[str, int]:
        """``{"identity": n, "projection": m}``."""
        out = {"identity": 0, "projection": 0}
        for m in self.merges:
            out[m.shortcut] += 1
        return out


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer with a choice of which modules to trace through.

    ``through=None``: fx's default (torch.nn's own modules are leaves, everything else is traced
    through) minus the modules in ``opaque``. Otherwise only the modules named in ``through`` (and
    the root) are traced through; every other module is a leaf, called as itself, so its own
    train/eval logic stays intact.
    """

    def __init__(self, through: set[str] | None = None, opaque: set[str] = frozenset()) -> None:
        super().__init__()
        self.through, self.opaque = through, opaque

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.through is not None:
            return module_qualified_name not in self.through
        return module_qualified_name in self.opaque or super().is_leaf_module(m, module_qualified_name)


MAX_OPAQUE = 32  # untraceable submodules kept whole before giving up


def trace(model: nn.Module, *, through: set[str] | None = None) -> tuple[fx.GraphModule, tuple[str, ...]]:
    """``model`` as an ``fx.GraphModule`` sharing its submodules, and the modules kept whole.

    A submodule whose forward cannot be traced symbolically (data-dependent control flow, unsupported
    Python) is kept whole as a leaf and tracing is retried; residual merges inside it are then not
    found, and its name is in the returned tuple.

    Raises:
        TraceError: the model's own forward cannot be traced; the message says where and why.
    """
    names = {m: n for n, m in model.named_modules()}
    opaque: set[str] = set()
    for _ in range(MAX_OPAQUE + 1):
        tracer = _Tracer(through, opaque)
        try:
            graph = tracer.trace(model)
        except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
            culprit = _culprit(e)
            name = names.get(culprit) if culprit is not None else None
            if through is not None or not name or name in opaque:
                raise TraceError(_trace_message(model, e)) from e
            opaque.add(name)
            continue
        return fx.GraphModule(tracer.root, graph, type(model).__name__), tuple(sorted(opaque))
    raise TraceError(f"could not trace {type(model).__name__}: more than {MAX_OPAQUE} submodules fail to trace")


def _culprit(e: BaseException) -> nn.Module | None:
    """The innermost module whose forward was running when ``e`` was raised."""
    found, tb = None, e.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "forward" and isinstance(owner, nn.Module):
            found = owner
        tb = tb.tb_next
    return found


def _trace_message(model: nn.Module, e: Exception) -> str:
    where = ""
    tb = e.__traceback__
    while tb is not None:  # the innermost frame inside a module's forward names the culprit
        code = tb.tb_frame.f_code
        owner = tb.tb_frame.f_locals.get("self")
        if code.co_name == "forward" and isinstance(owner, nn.Module):
            where = f"{type(owner).__name__}.forward ({code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"
        tb = tb.tb_next
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return (f"could not trace {type(model).__name__}: {type(e).__name__} in {where or 'its forward'}: {text[:300]}. "
            "Symbolic tracing needs a forward without data-dependent control flow.")


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return len(node.args) == 2 and "alpha" not in node.kwargs
    return node.op == "call_method" and node.target in ADD_METHODS and len(node.args) == 2 and "alpha" not in node.kwargs


def _shape(node: object) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Ancestry:
    """Ancestor sets of every node as bitsets over the graph's topological order."""

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.anc: dict[fx.Node, int] = {}
        self.live: dict[fx.Node, bool] = {}  # depends on a model input
        for n in self.nodes:
            bits, live = 1 << self.index[n], n.op == "placeholder"
            for inp in n.all_input_nodes:
                bits |= self.anc[inp]
                live = live or self.live[inp]
            self.anc[n], self.live[n] = bits, live

    def fork(self, a: fx.Node, b: fx.Node) -> fx.Node | None:
        """The nearest common ancestor of ``a`` and ``b`` that depends on an input, else None."""
        common = self.anc[a] & self.anc[b]
        while common:
            i = common.bit_length() - 1
            n = self.nodes[i]
            if self.live[n]:
                return n
            common &= ~(1 << i)
        return None

    def path(self, fork: fx.Node, end: fx.Node) -> list[fx.Node]:
        """Nodes strictly after ``fork`` that lie between it and ``end`` (``end`` included), in order."""
        f = self.index[fork]
        bits = self.anc[end]
        return [n for n in self.nodes if (bits >> self.index[n]) & 1 and (self.anc[n] >> f) & 1 and n is not fork]


_NO_OP_METHODS = ("contiguous", "clone", "float", "type_as", "to")


def _computes_nothing(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` passes its input through unchanged at inference (checked by running it)."""
    if node.op == "call_method":
        return node.target in _NO_OP_METHODS
    if node.op != "call_module":
        return False
    m = modules[node.target]
    if any(part in type(m).__name__ for part in NO_OP_NAMES):
        return True
    shape = _shape(node.args[0]) if node.args else None
    if shape is None or any(True for _ in m.parameters()) or _shape(node) != shape:
        return False
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    was = m.training
    try:
        m.eval()
        with torch.no_grad():
            y = m(x)
    except Exception:  # a module that cannot run alone on such a tensor computes something
        return False
    finally:
        m.train(was)
    return isinstance(y, torch.Tensor) and y.shape == x.shape and torch.equal(y, x)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.keys())) if stack else ""


def _merge_name(owner: str, owners: list[str], i: int, modules: dict[str, nn.Module]) -> str:
    """``<owner>.merge`` (``merge0``, ``merge1``... when the owner adds more than once); a module that is
    itself a merge (ResViz's own ``Add``) keeps its name."""
    if owner and isinstance(modules.get(owner), Add | GraphBlock) and owners.count(owner) == 1:
        return owner
    suffix = "merge" if owners.count(owner) == 1 else f"merge{owners[:i].count(owner)}"
    return f"{owner}.{suffix}" if owner else suffix


def _modules_on(path: list[fx.Node]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.target for n in path if n.op == "call_module"))


def _example_shapes(gm: fx.GraphModule, example_input: torch.Tensor | tuple) -> None:
    """Annotate every node with its tensor shape for ``example_input`` (eval mode, no grad; modes restored).

    Fake tensors first (no arithmetic); a graph they cannot run is run on the real input.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            try:
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                with mode:
                    _Shapes(gm, fake=True).run(*fake)
            except Exception:  # fake tensors fail on data-dependent shapes and similar: run for real
                _Shapes(gm).run(*args)
    finally:
        for m, t in modes.items():
            m.training = t


# Leaf modules whose output has their input's shape, dtype and layout: on fake tensors they are skipped
# (FakeTensorMode decomposes batch norm in Python, which made it cost more than a real forward).
SHAPE_KEEPING = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.Identity,
                 nn.modules.dropout._DropoutNd)
SHAPE_KEEPING_EXACT = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                       nn.LeakyReLU, nn.ELU, nn.Mish)


class _Shapes(fx.Interpreter):
    """Runs a graph and records each node's tensor metadata (``node.meta["tensor_meta"]``).

    With ``fake`` set, the leaf modules in ``SHAPE_KEEPING`` are not run: their output is an empty
    tensor like their input (fake tensors have no values to compute).
    """

    def __init__(self, gm: fx.GraphModule, fake: bool = False) -> None:
        super().__init__(gm)
        self.fake = fake

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        m = self.fetch_attr(target)
        x = args[0] if len(args) == 1 and not kwargs else None
        if self.fake and isinstance(x, torch.Tensor) and (isinstance(m, SHAPE_KEEPING) or type(m) in SHAPE_KEEPING_EXACT):
            return torch.empty_like(x)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        else:
            n.meta.pop("tensor_meta", None)
        return result


@dataclass(frozen=True, eq=False)
class Found:
    """A merge found in a graph: its addition node, its info, its fork and the nodes of each path."""

    node: fx.Node
    info: MergeInfo
    fork: fx.Node
    branch_nodes: tuple[fx.Node, ...]
    shortcut_nodes: tuple[fx.Node, ...]


def find_merges(gm: fx.GraphModule, root: nn.Module | None = None) -> list[Found]:
    """The merge nodes of a traced, shape-annotated graph with their :class:`MergeInfo`, in order.

    ``root`` is the traced model (its module names are the owners'; default ``gm``).
    """
    anc = _Ancestry(gm.graph)
    input_shape = next((_shape(n) for n in anc.nodes if n.op == "placeholder"), None)
    modules = dict(gm.named_modules())
    owners_of = dict((root or gm).named_modules())
    found: list[tuple[fx.Node, str, fx.Node, list[fx.Node], list[fx.Node], int]] = []
    for node in anc.nodes:
        if not _is_add(node):
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not (anc.live[a] and anc.live[b]):
            continue
        out = _shape(node)
        if not out or _shape(a) != out or _shape(b) != out:
            continue  # broadcasting (a bias, a scale or an embedding, not a second path) or a sum of scalars
        fork = anc.fork(a, b)
        if fork is None:
            continue
        pa, pb = anc.path(fork, a), anc.path(fork, b)
        work_a = [n for n in pa if not _computes_nothing(n, modules)]
        work_b = [n for n in pb if not _computes_nothing(n, modules)]
        if not work_a and not work_b:
            continue  # x + x: no branch
        branch = 0 if (len(work_a), len(pa)) > (len(work_b), len(pb)) else 1
        if branch == 1 and (len(work_a), len(pa)) == (len(work_b), len(pb)):
            branch = 0  # a tie: the first operand is F(x), as in torchvision's ``out += identity``
        found.append((node, _owner(node), fork, [pa, pb][branch], [pa, pb][1 - branch], branch,
                      [work_a, work_b][1 - branch]))
    owners = [f[1] for f in found]
    merges = []
    for i, (node, owner, fork, fpath, spath, branch, swork) in enumerate(found):
        layout, grid = decide(_shape(node) or (), input_shape)
        info = MergeInfo(
            index=i, name=_merge_name(owner, owners, i, owners_of), owner=owner, fork=fork.name,
            branch=_modules_on(fpath), shortcut_modules=_modules_on(spath),
            shortcut="projection" if swork else "identity", shape=_shape(node) or (), branch_operand=branch,
            layout=layout, grid=grid)
        merges.append(Found(node, info, fork, tuple(fpath), tuple(spath)))
    return merges


def _skeleton(model: nn.Module, example_input: torch.Tensor | tuple) -> tuple[fx.GraphModule, list[Found], tuple[str, ...]]:
    """Trace ``model`` keeping whole every module that contains no merge, and find the merges.

    A first trace (through everything traceable) finds which modules perform residual additions;
    the second traces through those modules and their parents only, so every other module is called
    as itself (its train/eval behaviour and buffers untouched) and appears as one node.
    """
    full, opaque = trace(model)
    _example_shapes(full, example_input)
    through: set[str] = set()
    for info in (f.info for f in find_merges(full)):
        parts = info.owner.split(".") if info.owner else []
        through.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    gm, _ = trace(model, through=through)
    _example_shapes(gm, example_input)
    return gm, find_merges(gm, model), opaque


def discover(model: nn.Module, example_input: torch.Tensor | tuple) -> ResidualMap:
    """Every residual merge of ``model`` for inputs like ``example_input`` (the model is not changed).

    Raises:
        TraceError: when the model cannot be traced.
    """
    _, found, opaque = _skeleton(model, example_input)
    return ResidualMap(tuple(f.info for f in found), opaque)


class GraphBlock(nn.Module):
    """A residual connection inside a traced model: its merge, and taps on its input and paths.

    The graph calls it with F(x) and S(x) and it hands them to ``merge`` (an ``Add``: the module
    instruments and lesions address), passing ``s = None`` while the skip is off (y = F(x), the plain
    twin) and ``f = None`` when the block is removed (y = S(x), Veit et al.'s deletion). ``scale``
    multiplies F(x) (residual scaling; 1.0 computes nothing, so the untouched model is bit-identical to
    the original). ``entry`` sees x; ``branch_in`` and ``shortcut_in`` pass x on to F and to S.
    """

    def __init__(self, info: MergeInfo, owns: tuple[nn.Module, ...] = ()) -> None:
        super().__init__()
        self.info, self.scale = info, 1.0
        self.merge, self.entry, self.branch_in, self.shortcut_in = Add(), Tap(), Tap(), Tap()
        self._owns = owns  # a plain tuple: the path modules stay registered where they are

    def forward(self, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.merge.removed:
            return self.merge(None, s)
        if self.scale != 1.0:
            f = f * self.scale
        return self.merge(f, s if self.merge.skip else None)

    def junction_parts(self) -> dict[str, Any]:
        """Where instruments hook this block (see :class:`resviz.nn.merge.Junction`)."""
        return {"entry": self.entry, "branch": self.branch_in, "shortcut": self.shortcut_in, "owns": self._owns}

    def extra_repr(self) -> str:
        return f"{self.info.name}: shortcut={self.info.shortcut}, scale={self.scale}"


class Tap(nn.Module):
    """An identity on a block's input or at the start of one of its paths, for hooks to see x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Residualized(fx.GraphModule):
    """A traced model whose every residual addition is a :class:`GraphBlock` (see :func:`residualize`).

    It has the interface of ResViz's own nets: ``set_skips``, ``set_removed``, ``skips``, residual
    scaling, and its merges in execution order (``resviz.nn.merge.junctions`` finds them; ``merge_blocks``
    lists their blocks, and so does ``blocks`` unless the model has its own submodule of that name).
    """

    residual_map: ResidualMap

    @property
    def merge_blocks(self) -> list[GraphBlock]:
        """The residual blocks (:class:`GraphBlock`) in execution order."""
        return [self.get_submodule(m.name) for m in self.residual_map]

    def __deepcopy__(self, memo: dict[int, Any]) -> Residualized:
        out = super().__deepcopy__(memo)  # fx rebuilds the module from its __dict__'s modules and graph only
        out.residual_map = self.residual_map
        return out

    def __getattr__(self, name: str) -> Any:
        # ``blocks`` is ``merge_blocks``, as on ResViz's own nets, unless the model has a submodule of that
        # name (a ViT's or a ResViz net's ``blocks``): the graph's code reaches its modules through it.
        if name == "blocks" and "blocks" not in self.__dict__.get("_modules", {}):
            return self.merge_blocks
        return super().__getattr__(name)

    @property
    def skips(self) -> tuple[bool, ...]:
        return merge_seam.skips(self)

    def set_skips(self, flags: bool | Iterable[bool]) -> None:
        """Turn skips on/off: one bool for all merges or one per merge (off: the merge returns F(x))."""
        merge_seam.set_skips(self, flags)

    def set_removed(self, indices: Iterable[int]) -> None:
        """Remove exactly the blocks at ``indices`` (each returns S(x)); all others are restored."""
        merge_seam.set_removed(self, indices)

    def set_scale(self, scale: float | Iterable[float]) -> None:
        """Residual scaling: F(x) is multiplied by ``scale`` (one value or one per merge)."""
        blocks = self.merge_blocks
        values = [float(scale)] * len(blocks) if isinstance(scale, int | float) else [float(v) for v in scale]
        if len(values) != len(blocks):
            raise ValueError(f"expected {len(blocks)} scales, got {len(values)}")
        for b, v in zip(blocks, values, strict=True):
            b.scale = v


def _insert_taps(gm: fx.GraphModule, fd: Found, new_of: dict[fx.Node, fx.Node], merge_node: fx.Node) -> None:
    """Route the fork x through ``merge.entry``, then ``merge.branch_in`` into F and ``merge.shortcut_in`` into S."""
    fork = new_of.get(fd.fork, fd.fork)
    on_f = {new_of.get(n, n) for n in fd.branch_nodes}
    on_s = {new_of.get(n, n) for n in fd.shortcut_nodes}
    users = list(fork.users)
    with gm.graph.inserting_after(fork):
        entry = gm.graph.call_module(f"{fd.info.name}.entry", (fork,))
    with gm.graph.inserting_after(entry):
        s_in = gm.graph.call_module(f"{fd.info.name}.shortcut_in", (entry,))
    with gm.graph.inserting_after(entry):
        f_in = gm.graph.call_module(f"{fd.info.name}.branch_in", (entry,))
    for user in users:
        if user in on_f:
            user.replace_input_with(fork, f_in)
        elif user in on_s:
            user.replace_input_with(fork, s_in)
        elif user is merge_node:  # an identity shortcut: S(x) is x itself
            merge_node.args = (merge_node.args[0], s_in)


def residualize(model: nn.Module, example_input: torch.Tensor | tuple, *, copy: bool = True) -> Residualized:
    """``model`` with every residual addition replaced by a :class:`GraphBlock` (its merge and taps).

    With every merge untouched (skip on, nothing removed, scale 1) its outputs and gradients are
    bit-identical to ``model``'s, and ``state_dict`` keys match. With ``copy`` (the default) its
    modules and parameters are copies and ``model`` is never changed; with ``copy=False`` it calls
    ``model``'s own modules (same parameter objects: an optimizer of ``model`` trains it), and the
    merge and tap modules live in the residualized graph only.

    Raises:
        TraceError: when the model cannot be traced.
    """
    import copy as copying

    gm, found, opaque = _skeleton(copying.deepcopy(model) if copy else model, example_input)
    new_of: dict[fx.Node, fx.Node] = {}  # replaced addition -> its merge node (a later fork or path node)
    modules = dict(gm.named_modules())
    for fd in found:
        owned = tuple(modules[n] for n in (*fd.info.branch, *fd.info.shortcut_modules) if n in modules)
        gm.add_submodule(fd.info.name, GraphBlock(fd.info, owned))
        a, b = (new_of.get(n, n) for n in fd.node.args)
        f, s = (a, b) if fd.info.branch_operand == 0 else (b, a)
        with gm.graph.inserting_after(fd.node):
            new = gm.graph.call_module(fd.info.name, (f, s))
        fd.node.replace_all_uses_with(new)
        new.meta = dict(fd.node.meta)
        gm.graph.erase_node(fd.node)
        new_of[fd.node] = new
        _insert_taps(gm, fd, new_of, new)
    gm.graph.lint()
    out = Residualized(gm, gm.graph, type(model).__name__)
    out.residual_map = ResidualMap(tuple(f.info for f in found), opaque)
    out.train(model.training)
    return out
