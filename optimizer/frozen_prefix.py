"""Split a partly frozen student into its frozen front and the part that trains, so the front runs once.

With ``train_only``, every training step still runs the frozen front of the network forward, although its
output for a sample never changes: its weights are frozen, its BatchNorm layers normalize with their running
statistics, and the loop feeds every sample unchanged (no augmentation). ``cache_frozen_prefix`` runs that
front once over the training and selection samples, keeps what it hands to the trained part, and trains the
rest on those tensors. For MobileNetV2 with its last blocks training, the front is most of the forward pass.

How the front is found: the student is traced with ``torch.fx`` (``symbolic_trace``). A graph node is
*frozen* when all its inputs are frozen (the model's inputs are) and it computes the same thing in training
as in evaluation: a call of a leaf module with no trained parameter that is not a dropout or a normalization
that updates statistics (a BatchNorm whose parameters do not train is frozen: the loop keeps it in eval
mode), a read of an attribute that is not a trained parameter, or a function or method that draws no random
numbers. The *boundary* is the frozen nodes that a non-frozen node (or the output) uses; the prefix module
computes them, and the suffix module takes them as its inputs in place of the model's.

What refuses the split, each with a one-line error naming the reason: a model ``torch.fx`` cannot trace
(data-dependent control flow), a forward that branches on ``self.training`` outside leaf modules (the trace
would bake one branch in: it is detected by tracing in both modes and comparing), and a boundary value that is
not a tensor with the batch first (for instance ``x.size(0)`` used by a later reshape). The prefix and the
suffix share the student's modules and parameters, so training the suffix trains the student in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from optimizer.errors import RecipeError

if TYPE_CHECKING:
    import torch
    from torch import fx

#: Functions and tensor methods whose output is random: a node calling one is never cached.
RANDOM_CALLS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
                "bernoulli_", "normal", "normal_", "uniform_", "multinomial", "poisson", "exponential_",
                "random_", "rrelu", "gumbel_softmax"}


@dataclass
class FrozenSplit:
    """The frozen front and the trained rest of a student; they share its modules and parameters."""

    prefix: "fx.GraphModule"
    suffix: "fx.GraphModule"
    #: Names of the boundary values, in the order the prefix returns them and the suffix takes them.
    boundary: list[str]
    #: Bytes the boundary values take per sample (what caching the front keeps in memory per sample).
    bytes_per_sample: int


def _trace(student: "torch.nn.Module", where: str) -> "fx.GraphModule":
    from torch import fx

    try:
        return fx.symbolic_trace(student)
    except Exception as exc:
        # Tracing runs the model's own forward on proxies, so whatever that code raises on a proxy (TraceError,
        # TypeError from int(proxy), a library's own error...) arrives here; each means the same for the user:
        # this model cannot be split, and the one-line error below says which option to drop.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{where}: cache_frozen_prefix needs a model torch.fx can trace, and tracing "
                          f"{type(student).__name__} failed ({first[:200]}); remove cache_frozen_prefix") from None


def _trace_both_modes(student: "torch.nn.Module", where: str) -> "fx.GraphModule":
    """The student traced in its current mode, after refusing a forward whose graph depends on self.training
    outside leaf modules (traced in both modes, the two graphs' code must be the same)."""
    was_training = student.training
    traces = {}
    try:
        for mode in (True, False):
            student.train(mode)
            traces[mode] = _trace(student, where)
    finally:
        student.train(was_training)
    if traces[True].code != traces[False].code:
        raise RecipeError(f"{where}: cache_frozen_prefix cannot split {type(student).__name__}: its forward takes "
                          "another path in training than in evaluation (it reads self.training), so one trace "
                          "cannot stand for both; remove cache_frozen_prefix")
    return traces[was_training]


def _module_is_frozen(module: "torch.nn.Module", frozen_batchnorms: set[int]) -> bool:
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    if any(p.requires_grad for p in module.parameters()):
        return False
    if isinstance(module, (_DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RReLU)):
        return False
    if isinstance(module, _BatchNorm):
        return id(module) in frozen_batchnorms
    if isinstance(module, _InstanceNorm):
        return not module.track_running_stats
    # A leaf module holding other modules (a custom leaf): frozen only if everything inside it is.
    return all(_module_is_frozen(child, frozen_batchnorms) for child in module.children())


def _attribute(root: "torch.nn.Module", target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _pruned_module(root: "fx.GraphModule", graph: "fx.Graph") -> "fx.GraphModule":
    """A module running ``graph`` over ``root``'s submodules, without the nodes no output needs."""
    from torch import fx

    module = fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()  # needs the owning module (for its purity check)
    module.recompile()
    # Keep only the submodules this graph still calls (GraphModule copied those of every node).
    module.delete_all_unused_submodules()
    return module


def split_frozen_prefix(student: "torch.nn.Module", frozen_batchnorms: list["torch.nn.Module"],
                        probe: list["torch.Tensor"], *, where: str) -> FrozenSplit:
    """Split ``student`` (trained parameters already marked by ``requires_grad``) at its frozen front.

    ``probe`` is a batch of real inputs (two samples or more): the prefix runs on it once to check that every
    boundary value is a tensor with the batch first.
    """
    import torch
    from torch import fx

    traced = _trace_both_modes(student, where)
    graph = traced.graph
    bn_ids = {id(m) for m in frozen_batchnorms}
    frozen: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            frozen[node] = True
            continue
        if node.op == "output":
            frozen[node] = False
            continue
        inputs_frozen = all(frozen[n] for n in node.all_input_nodes)
        if node.op == "call_module":
            own = _module_is_frozen(traced.get_submodule(node.target), bn_ids)
        elif node.op == "get_attr":
            value = _attribute(traced, node.target)
            own = not (isinstance(value, torch.nn.Parameter) and value.requires_grad)
        else:  # call_function / call_method
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            own = name not in RANDOM_CALLS
        frozen[node] = inputs_frozen and own

    boundary = [n for n in graph.nodes if frozen[n] and any(not frozen[user] for user in n.users)]
    if not boundary or all(n.op == "placeholder" for n in boundary):
        raise RecipeError(f"{where}: cache_frozen_prefix found no frozen front in {type(student).__name__}: the "
                          "first layer already trains; remove cache_frozen_prefix or train fewer layers")

    # The prefix: every frozen node, returning the boundary values.
    prefix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if frozen[node]:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in boundary))
    prefix = _pruned_module(traced, prefix_graph)

    # The suffix: one input per boundary value, then every node that is not frozen.
    suffix_graph = fx.Graph()
    env = {}
    names = []
    for i, node in enumerate(boundary):
        names.append(f"frozen_{i}_{node.name}")
        env[node] = suffix_graph.placeholder(names[-1])
    for node in graph.nodes:
        if not frozen[node]:
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
    suffix = _pruned_module(traced, suffix_graph)

    was_training = prefix.training
    prefix.eval()
    try:
        with torch.no_grad():
            values = prefix(*probe)
    finally:
        prefix.train(was_training)
    batch = len(probe[0])
    for node, value in zip(boundary, values):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            kind = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a tensor of shape " \
                                                                                   f"{list(value.shape)}"
            raise RecipeError(f"{where}: cache_frozen_prefix cannot split {type(student).__name__}: the frozen front "
                              f"hands '{node.name}' ({kind}, not one row per sample) to the trained part; remove "
                              "cache_frozen_prefix")
    row_bytes = sum(value[0].numel() * value.element_size() for value in values)
    return FrozenSplit(prefix=prefix, suffix=suffix, boundary=names, bytes_per_sample=row_bytes)


__all__ = ["FrozenSplit", "split_frozen_prefix"]
