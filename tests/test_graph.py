"""The traced pruning graph against hand-derived groups (methods.md sections 2 and 6)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.graph import leaf_paths, module_path, register_rule, trace, trace_linen
from jaxprune.models import SmallNNXCNN, gather_channels

N_BLOCKS = 3  # ResNet-20: 3 blocks per stage
STAGES = ((1, 16), (2, 32), (3, 64))  # (stage, width)


def _blocks():
    return [(s, b, w) for s, w in STAGES for b in range(N_BLOCKS)]


def _bn(prefix, name):
    """The four BN leaves (params scale/bias, batch_stats mean/var) of module ``prefix/name``."""
    p = tuple(prefix) + (name,)
    return [("params",) + p + ("scale",), ("params",) + p + ("bias",),
            ("batch_stats",) + p + ("mean",), ("batch_stats",) + p + ("var",)]


def _members(group):
    """{(path, axis, role): index list} of a group (all members, exact)."""
    out = {}
    for m in group.members:
        key = (m.path, m.axis, m.role)
        assert key not in out, f"duplicate member {key}"
        out[key] = m.index.tolist()
    return out


def _channel_sets(group):
    """One frozenset per channel: {(path, axis, positions)} - order-free identity of a group."""
    return {frozenset((m.path, m.axis, tuple(m.index[c])) for m in group.members)
            for c in range(group.size)}


# ----------------------------------------------------------------------------- ResNet-20


def test_resnet20_scatter_has_19_groups_with_exact_members(resnet20_graphs):
    g = resnet20_graphs["scatter"]
    names = ["stem"] + [f"layer{s}_{b}/conv{k}" for s, b, _ in _blocks() for k in (1, 2)]
    assert list(g.groups) == names  # forward order
    assert len(g.groups) == 19
    ident = lambda c: [[i] for i in range(c)]  # noqa: E731

    # stem: its filters, stem_bn, and the first block's conv1 input (the stream enters the
    # block's add too, but under 'scatter' the add starts a new channel space)
    stem = g.groups["stem"]
    assert stem.size == 16 and stem.producers == ("stem",) and stem.kind == "conv"
    expected = {(("params", "stem", "kernel"), 3, "out"): ident(16),
                (("params", "layer1_0", "conv1", "kernel"), 2, "in"): ident(16)}
    expected.update({(p, 0, "vector"): ident(16) for p in _bn((), "stem_bn")})
    assert _members(stem) == expected

    for s, b, w in _blocks():
        blk = f"layer{s}_{b}"
        c1 = g.groups[f"{blk}/conv1"]
        assert c1.size == w and c1.producers == (f"{blk}/conv1",)
        expected = {(("params", blk, "conv1", "kernel"), 3, "out"): ident(w),
                    (("params", blk, "conv2", "kernel"), 2, "in"): ident(w)}
        expected.update({(p, 0, "vector"): ident(w) for p in _bn((blk,), "bn1")})
        assert _members(c1) == expected, blk
        # conv2: filters and bn2 only; no consumer input slice (the next conv reads the
        # merged full-width stream)
        c2 = g.groups[f"{blk}/conv2"]
        assert c2.size == w and c2.producers == (f"{blk}/conv2",)
        expected = {(("params", blk, "conv2", "kernel"), 3, "out"): ident(w)}
        expected.update({(p, 0, "vector"): ident(w) for p in _bn((blk,), "bn2")})
        assert _members(c2) == expected, blk
    assert g.unprunable == {"fc": "tied to the model output"}
    assert g.residual == "scatter"


def _coupled_stream_components():
    """Channel classes of the residual streams under 'coupled', derived by hand.

    Option-A shortcut: entering stage s+1 the stream is subsampled and zero-padded with
    lo = w_s / 2 channels on each side, so stage-s position p IS stage-(s+1) position p + lo
    (the add links them). Union-find over (stage, position):
      stage-1 p in [0, 16)         ~ stage-2 p + 8   ~ stage-3 p + 24  -> 16 channels (stem's)
      stage-2 p in [0,8) u [24,32) ~ stage-3 p + 16                    -> 16 channels
      stage-3 p in [0,16) u [48,64)                                    -> 32 channels
    Returns the 64 classes, each a sorted list of (stage, position).
    """
    parent = {(s, p): (s, p) for s, w in STAGES for p in range(w)}

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for (s, w), (_, w2) in zip(STAGES, STAGES[1:]):
        lo = (w2 - w) // 2
        for p in range(w):
            parent[find((s, p))] = find((s + 1, p + lo))
    comps: dict = {}
    for node in parent:
        comps.setdefault(find(node), []).append(node)
    return [sorted(c) for c in comps.values()]


def _stream_leaves(stage_pos):
    """Members {(path, axis, pos)} touching the given {stage: position} stream channel."""
    out = set()
    for s, p in stage_pos.items():
        # writers of stage-s stream: conv2 + bn2 of its blocks (and the stem for stage 1)
        for b in range(N_BLOCKS):
            blk = f"layer{s}_{b}"
            out.add((("params", blk, "conv2", "kernel"), 3, (p,)))
            out.update((q, 0, (p,)) for q in _bn((blk,), "bn2"))
        if s == 1:
            out.add((("params", "stem", "kernel"), 3, (p,)))
            out.update((q, 0, (p,)) for q in _bn((), "stem_bn"))
        # readers: conv1 of every block of stage s but the first (which reads stage s-1),
        # the first block of stage s+1, and fc after stage 3
        for b in range(N_BLOCKS):
            if s == 1 or b > 0:
                out.add((("params", f"layer{s}_{b}", "conv1", "kernel"), 2, (p,)))
        if s < 3:
            out.add((("params", f"layer{s + 1}_0", "conv1", "kernel"), 2, (p,)))
        else:
            out.add((("params", "fc", "kernel"), 0, (p,)))
    return frozenset(out)


def test_resnet20_coupled_groups_conv1_alone_and_stream_through_option_a_pad(resnet20_graphs):
    g = resnet20_graphs["coupled"]
    comps = _coupled_stream_components()
    first_stage = [c[0][0] for c in comps]  # the stage where a channel class appears first
    assert [first_stage.count(s) for s in (1, 2, 3)] == [16, 16, 32]  # see the helper
    stream_groups = {"stem": 16, "layer2_0/conv2": 16, "layer3_0/conv2": 32}
    conv1_groups = [f"layer{s}_{b}/conv1" for s, b, _ in _blocks()]
    assert set(g.groups) == set(stream_groups) | set(conv1_groups)
    assert list(g.groups)[:2] == ["stem", "layer1_0/conv1"]

    # block conv1s: the same 6 members as under 'scatter' (their output never meets an add)
    for s, b, w in _blocks():
        blk = f"layer{s}_{b}"
        c1 = g.groups[f"{blk}/conv1"]
        assert c1.size == w and c1.producers == (f"{blk}/conv1",)
        assert {(m.path, m.axis, m.role) for m in c1.members} == (
            {(("params", blk, "conv1", "kernel"), 3, "out"),
             (("params", blk, "conv2", "kernel"), 2, "in")}
            | {(p, 0, "vector") for p in _bn((blk,), "bn1")})

    # the residual streams: every channel of each group is exactly one hand-derived class
    expected = {}
    for comp in comps:
        first_stage = comp[0][0]
        name = {1: "stem", 2: "layer2_0/conv2", 3: "layer3_0/conv2"}[first_stage]
        expected.setdefault(name, set()).add(_stream_leaves(dict(comp)))
    for name, size in stream_groups.items():
        grp = g.groups[name]
        assert grp.size == size
        assert _channel_sets(grp) == expected[name], name
        roles = {(m.path[-2] if m.path[-1] == "kernel" else "bn", m.role) for m in grp.members}
        assert roles <= {("conv2", "out"), ("stem", "out"), ("conv1", "in"), ("fc", "in"),
                         ("bn", "vector")}
    assert g.groups["stem"].producers == ("stem",) + tuple(
        f"layer{s}_{b}/conv2" for s, b, _ in _blocks())
    assert g.groups["layer2_0/conv2"].producers == tuple(
        f"layer{s}_{b}/conv2" for s, b, _ in _blocks() if s > 1)
    assert g.groups["layer3_0/conv2"].producers == tuple(
        f"layer3_{b}/conv2" for b in range(N_BLOCKS))
    # stage-2 padded channels: positions 0..7 and 24..31 (the zero-pad of stage 1's stream)
    filt = next(m for m in g.groups["layer2_0/conv2"].members
                if m.path == ("params", "layer2_0", "conv2", "kernel"))
    assert sorted(filt.index[:, 0].tolist()) == list(range(8)) + list(range(24, 32))
    assert g.unprunable == {"fc": "tied to the model output"}


def test_module_path_and_leaf_paths(resnet20):
    _, variables, _ = resnet20
    paths = leaf_paths(variables)
    assert ("params", "layer1_0", "conv1", "kernel") in paths
    assert ("batch_stats", "stem_bn", "var") in paths
    assert len(paths) == len(jax.tree_util.tree_leaves(variables))
    assert module_path(("params", "layer1_0", "conv1", "kernel")) == "layer1_0/conv1"


# ----------------------------------------------------------------------------- hand-built


class _Tiny(nn.Module):
    """concat + depthwise + flatten-before-Dense + a grouped conv, all in one net."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.relu(nn.BatchNorm(use_running_average=True, name="a_bn")(
            nn.Conv(4, (3, 3), use_bias=False, name="a")(x)))
        b = nn.Conv(3, (1, 1), name="b")(x)  # with a bias
        y = jnp.concatenate([a, b], axis=-1)  # 7 channels: a's 4 then b's 3
        y = nn.relu(nn.Conv(7, (3, 3), feature_group_count=7, use_bias=False, name="dw")(y))
        z = nn.relu(nn.Conv(5, (3, 3), strides=(2, 2), name="c")(y))  # 4x4 -> 2x2, 5 channels
        z = z.reshape((z.shape[0], -1))  # row (h*2 + w)*5 + channel
        z = nn.relu(nn.Dense(6, name="fc1")(z))
        grp = nn.Conv(4, (1, 1), feature_group_count=2, name="grp")(x)
        z = z + grp.mean(axis=(1, 2)).sum(-1, keepdims=True)
        return nn.Dense(2, name="fc2")(z)


@pytest.fixture(scope="module")
def tiny_graph():
    m = _Tiny()
    x = jnp.zeros((1, 4, 4, 2))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    return trace_linen(m, v, x)


def test_tiny_concat_depthwise_flatten(tiny_graph):
    g = tiny_graph
    assert list(g.groups) == ["a", "b", "c", "fc1"]
    col = lambda idx: [[i] for i in idx]  # noqa: E731
    # concat: a's channels are dw/c positions 0..3, b's are 4..6; the depthwise conv's
    # filter j reads only input j, so dw's filters join the producers' groups
    assert g.groups["a"].producers == ("a", "dw")
    assert _members(g.groups["a"]) == {
        (("params", "a", "kernel"), 3, "out"): col(range(4)),
        (("params", "a_bn", "scale"), 0, "vector"): col(range(4)),
        (("params", "a_bn", "bias"), 0, "vector"): col(range(4)),
        (("batch_stats", "a_bn", "mean"), 0, "vector"): col(range(4)),
        (("batch_stats", "a_bn", "var"), 0, "vector"): col(range(4)),
        (("params", "dw", "kernel"), 3, "out"): col(range(4)),
        (("params", "c", "kernel"), 2, "in"): col(range(4)),
    }
    assert g.groups["b"].producers == ("b", "dw")
    assert _members(g.groups["b"]) == {
        (("params", "b", "kernel"), 3, "out"): col(range(3)),
        (("params", "b", "bias"), 0, "vector"): col(range(3)),
        (("params", "dw", "kernel"), 3, "out"): col(range(4, 7)),
        (("params", "c", "kernel"), 2, "in"): col(range(4, 7)),
    }
    # flatten of a 2x2x5 map: channel j is spread over fc1 rows j, j+5, j+10, j+15 (m = 4)
    fc_in = [[j + 5 * k for k in range(4)] for j in range(5)]
    assert _members(g.groups["c"]) == {
        (("params", "c", "kernel"), 3, "out"): col(range(5)),
        (("params", "c", "bias"), 0, "vector"): col(range(5)),
        (("params", "fc1", "kernel"), 0, "in"): fc_in,
    }
    assert g.groups["fc1"].kind == "dense" and g.groups["c"].kind == "conv"
    assert _members(g.groups["fc1"]) == {
        (("params", "fc1", "kernel"), 1, "out"): col(range(6)),
        (("params", "fc1", "bias"), 0, "vector"): col(range(6)),
        (("params", "fc2", "kernel"), 0, "in"): col(range(6)),
    }


def test_tiny_grouped_conv_and_output_unprunable(tiny_graph):
    assert tiny_graph.unprunable == {"grp": "grouped convolution (feature_group_count=2)",
                                     "fc2": "tied to the model output"}


class _GroupedConsumer(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
        y = nn.Conv(6, (1, 1), feature_group_count=2, name="grp")(y)  # reads a's channels
        return nn.Conv(2, (1, 1), name="b")(y)


def test_grouped_conv_prunes_channel_j_of_every_group():
    # input channel j of each of the 2 groups is one channel (kernel input j), and so is output
    # channel j of each group: pruning keeps the group count and equal counts per group
    m = _GroupedConsumer()
    x = jnp.zeros((1, 4, 4, 3))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    g = trace_linen(m, v, x)
    assert list(g.groups) == ["a", "grp"]
    assert _members(g.groups["a"]) == {
        (("params", "a", "kernel"), 3, "out"): [[0, 2], [1, 3]],
        (("params", "a", "bias"), 0, "vector"): [[0, 2], [1, 3]],
        (("params", "grp", "kernel"), 2, "in"): [[0], [1]],
    }
    assert _members(g.groups["grp"]) == {
        (("params", "grp", "kernel"), 3, "out"): [[0, 3], [1, 4], [2, 5]],
        (("params", "grp", "bias"), 0, "vector"): [[0, 3], [1, 4], [2, 5]],
        (("params", "b", "kernel"), 2, "in"): [[0, 3], [1, 4], [2, 5]],
    }
    assert g.unprunable == {"b": "tied to the model output"}


_PERM = np.array([2, 0, 3, 1])


@jax.jit
def _jitted_perm(y):
    return y[..., _PERM]  # the index is a constant of the inner jaxpr


class _Gather(nn.Module):
    """A static channel permutation (``x[..., idx]``) and a data-dependent channel gather."""

    mode: str = "static"

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (1, 1), use_bias=False, name="a")(x)
        if self.mode == "dynamic":
            idx = (x[0, 0, 0, :4] > 0).astype(jnp.int32)  # depends on the input
            y = y[..., idx]
        elif self.mode == "jitted":
            y = _jitted_perm(y)
        elif self.mode.startswith("one-hot"):  # the compact models' channel moves
            dtype = jnp.bfloat16 if self.mode.endswith("bf16") else jnp.float32
            y = gather_channels(y.astype(dtype), _PERM).astype(jnp.float32)
        else:
            y = y[..., _PERM]
        return nn.Conv(2, (1, 1), use_bias=False, name="b")(y).sum(axis=(1, 2))


@pytest.mark.parametrize("mode", ["static", "jitted", "one-hot", "one-hot bf16"])
def test_static_gather_permutation_is_followed(mode):
    m = _Gather(mode=mode)
    x = jnp.zeros((1, 2, 2, 4))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    g = trace_linen(m, v, x)
    # b's input channel j is a's filter idx[j]: a filter f -> b input position where idx == f
    assert _members(g.groups["a"]) == {
        (("params", "a", "kernel"), 3, "out"): [[0], [1], [2], [3]],
        (("params", "b", "kernel"), 2, "in"): [[1], [3], [0], [2]],
    }
    assert [op.kind for op in g.ops] == ["conv", "conv"]  # a one-hot selection costs no MACs


def test_data_dependent_gather_makes_channels_unprunable():
    m = _Gather(mode="dynamic")
    x = jnp.zeros((1, 2, 2, 4))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    g = trace_linen(m, v, x)
    assert "a" not in g.groups
    assert "data-dependent" in g.unprunable["a"]


# ----------------------------------------------------------------------------- errors


class _Sorted(nn.Module):
    where: str = "channels"

    @nn.compact
    def __call__(self, x):
        if self.where == "input":
            x = jnp.sort(x, axis=1)  # before any conv: touches no prunable channel
        y = nn.Conv(4, (3, 3), name="a")(x)
        if self.where == "channels":
            y = jnp.sort(y, axis=1)  # along H, but 'sort' is not a known primitive
        elif self.where == "callback":
            y = jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct(y.shape, y.dtype), y)
        return nn.Conv(2, (1, 1), name="b")(y)


@pytest.mark.parametrize("where,primitive", [("channels", "sort"),
                                             ("callback", "pure_callback")])
def test_unknown_primitive_loses_only_the_channels_it_touches(where, primitive):
    """Conv 'a' feeds a primitive the tracer does not know: its channels are unprunable, with
    the primitive and the user's source line as the reason; the graph is still built."""
    m = _Sorted(where=where)
    x = jnp.zeros((1, 4, 4, 3))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    g = trace_linen(m, v, x)
    assert "a" not in g.groups
    assert f"primitive '{primitive}'" in g.unprunable["a"]
    assert "test_graph.py" in g.unprunable["a"] and "register_rule" in g.unprunable["a"]


class _SortThenConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3), name="a")(x)
        y = nn.Conv(4, (3, 3), name="b")(jnp.sort(y, axis=1))  # sort along H only
        return nn.Conv(2, (1, 1), name="c")(nn.relu(y))


def test_register_rule_teaches_a_primitive():
    """With a rule saying sort(axis=1) carries every other axis through, 'a' becomes prunable
    again and its group reaches b's input; a wrong-sized link is refused; removal restores."""
    m = _SortThenConv()
    x = jnp.zeros((1, 4, 4, 3))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    assert "a" in trace_linen(m, v, x).unprunable

    def sort_rule(eqn):
        dim = eqn.params["dimension"]
        return [(0, ax, 0, ax) for ax in range(len(eqn.invars[0].aval.shape)) if ax != dim]

    try:
        register_rule("sort", sort_rule)
        g = trace_linen(m, v, x)
        assert "a" in g.groups and "a" not in g.unprunable
        assert {(mem.module, mem.role) for mem in g.groups["a"].members} >= {("a", "out"), ("b", "in")}
        register_rule("sort", "elementwise")  # wrong here (sorting mixes H), but accepted form
        assert "a" in trace_linen(m, v, x).groups
        register_rule("sort", lambda eqn: [(0, 3, 0, 1)])  # channels (4) onto H (4): same size
        register_rule("sort", lambda eqn: [(0, 0, 0, 3)])  # batch (1) onto channels (4)
        with pytest.raises(ValueError, match="differ in size"):
            trace_linen(m, v, x)
    finally:
        register_rule("sort", None)
    assert "a" in trace_linen(m, v, x).unprunable
    with pytest.raises(ValueError, match="rule must be"):
        register_rule("sort", 3)


def test_unknown_primitive_off_prunable_channels_is_fine():
    m = _Sorted(where="input")
    x = jnp.zeros((1, 4, 4, 3))
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    g = trace_linen(m, v, x)
    assert list(g.groups) == ["a"]


def test_bad_residual_policy_names_the_value(resnet20):
    model, variables, x = resnet20
    with pytest.raises(ValueError, match="'bogus'") as info:
        trace_linen(model, variables, x, residual="bogus")
    assert "coupled" in str(info.value) and "scatter" in str(info.value)


# ----------------------------------------------------------------------------- NNX


def test_nnx_model_groups_via_split_merge():
    model = nnx.eval_shape(lambda: SmallNNXCNN(rngs=nnx.Rngs(0), features=(6, 8)))
    graphdef, state = nnx.split(model)  # abstract state: tracing needs shapes only
    # NNX leaves are named like Linen's: collection first, no Variable 'value' key
    assert ("params", "conv1", "kernel") in leaf_paths(state)
    assert ("batch_stats", "bn1", "mean") in leaf_paths(state)
    # below the root (e.g. inside an optimizer state) only the 'value' key is dropped
    assert ("s", "conv1", "kernel") in leaf_paths({"s": state})

    def apply_fn(st, x):
        return nnx.merge(graphdef, st)(x)

    g = trace(apply_fn, state, jnp.zeros((1, 8, 8, 3)))
    assert list(g.groups) == ["conv1", "conv2"]
    col = lambda n: [[i] for i in range(n)]  # noqa: E731
    for name, bn, consumer, axis, w in (("conv1", "bn1", "conv2", 2, 6),
                                        ("conv2", "bn2", "fc", 0, 8)):
        expected = {(("params", name, "kernel"), 3, "out"): col(w),
                    (("params", consumer, "kernel"), axis, "in"): col(w)}
        expected.update({(p, 0, "vector"): col(w) for p in _bn((), bn)})
        assert _members(g.groups[name]) == expected
    assert g.unprunable == {"fc": "tied to the model output"}
    # params leaves are recognised as parameters (used by the param counter)
    assert {leaf.path for leaf in g.leaves if leaf.is_param} == {
        p for p in leaf_paths(state) if p[0] == "params"}


class _NormAfterConv(nn.Module):
    norm: str = "ln"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="conv_a")(x)
        if self.norm == "ln":
            x = nn.LayerNorm()(x)
        elif self.norm == "gn":
            x = nn.GroupNorm(num_groups=2)(x)
        elif self.norm == "rms":
            x = nn.RMSNorm()(x)
        elif self.norm == "channel_mean":
            x = x * jax.nn.sigmoid(jnp.mean(x, axis=-1, keepdims=True))
        elif self.norm == "softmax":
            x = jax.nn.softmax(x, axis=-1)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), name="conv_b")(x)
        return jnp.mean(x, axis=(1, 2))


@pytest.mark.parametrize("norm, reason", [
    ("ln", "summed over"), ("rms", "summed over"), ("channel_mean", "summed over"),
    ("softmax", "reduced over"), ("gn", "splits the channel axis")])
def test_channel_statistics_make_a_conv_unprunable_with_the_reason_and_line(norm, reason):
    """Removing channels changes a mean / normalisation over channels: never pruned silently."""
    model = _NormAfterConv(norm)
    x = jnp.ones((1, 6, 6, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    graph = trace_linen(model, variables, x)
    assert "conv_a" not in graph.producer_to_group()
    assert reason in graph.unprunable["conv_a"]
    if norm != "softmax":
        assert "test_graph.py" in graph.unprunable["conv_a"]  # the user's source line
    plain = _NormAfterConv("none")
    v = plain.init(jax.random.PRNGKey(0), x)
    assert "conv_a" in trace_linen(plain, v, x).producer_to_group()


# ----------------------------------------------------------------------------- control flow


class _Body(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.relu(nn.Conv(8, (3, 3), name="c")(x)), None


class _Scanned(nn.Module):
    """A stem, then 3 residual conv blocks as one `nn.scan` (params stacked on axis 0)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        blocks = nn.scan(_Body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = blocks(name="blocks")(x, None)
        return nn.Dense(4, name="fc")(x.mean((1, 2)))


class _Unrolled(nn.Module):
    """The same network written out: blocks b0, b1, b2."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        for i in range(3):
            x, _ = _Body(name=f"b{i}")(x, None)
        return nn.Dense(4, name="fc")(x.mean((1, 2)))


def _unstacked(v):
    p = dict(v["params"])
    stack = p.pop("blocks")["c"]
    for i in range(3):
        p[f"b{i}"] = {"c": jax.tree_util.tree_map(lambda a, i=i: a[i], stack)}
    return {"params": p}


@pytest.mark.parametrize("policy", ["scatter", "coupled"])
def test_scan_body_channels_are_shared_across_iterations(policy):
    """An `nn.scan` is followed: its body's conv is one group for all iterations (its stacked
    kernel's channel axis is axis 4), the MACs count every iteration, and masking it is
    masking the same channels of every block of the written-out network."""
    from jaxprune import flops
    from jaxprune.masks import apply_masks

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    scanned, unrolled = _Scanned(), _Unrolled()
    v = scanned.init(jax.random.PRNGKey(0), x)
    vu = _unstacked(v)
    gs, gu = trace_linen(scanned, v, x, residual=policy), trace_linen(unrolled, vu, x, residual=policy)
    assert flops.count(gs).macs == flops.count(gu).macs
    rng = np.random.default_rng(1)
    keep = (rng.random(8) < 0.5).astype(np.float32)
    keep[0] = 1.0
    if policy == "scatter":
        assert set(gs.groups) == {"stem", "blocks/c"} and set(gu.groups) == {"stem", "b0/c", "b1/c", "b2/c"}
        m = gs.groups["blocks/c"]
        assert any(mem.path == ("params", "blocks", "c", "kernel") and mem.axis == 4 for mem in m.members)
        ms, mu = {"stem": jnp.ones(8), "blocks/c": jnp.asarray(keep)}, {"stem": jnp.ones(8)}
        mu.update({f"b{i}/c": jnp.asarray(keep) for i in range(3)})
    else:  # the residual adds couple the stem and every block into one stream group
        assert len(gs.groups) == len(gu.groups) == 1
        ms = {n: jnp.asarray(keep) for n in gs.groups}
        mu = {n: jnp.asarray(keep) for n in gu.groups}
    assert flops.count(gs, ms).macs == flops.count(gu, mu).macs < flops.count(gs).macs
    got = scanned.apply(apply_masks(v, ms, gs), x)
    want = unrolled.apply(apply_masks(vu, mu, gu), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Branchy(nn.Module):
    @nn.compact
    def __call__(self, x, flag):
        y = nn.Conv(4, (3, 3), name="a")(x)
        y = jax.lax.cond(flag, lambda t: nn.relu(t), lambda t: 2.0 * t, y)
        return nn.Conv(2, (1, 1), name="b")(y)


def test_cond_branches_are_followed():
    x = jnp.zeros((1, 4, 4, 3))
    m = _Branchy()
    v = m.init(jax.random.PRNGKey(0), x, True)
    g = trace(lambda v, a: m.apply(v, a, True), v, x)
    assert "a" in g.groups and "a" not in g.unprunable
    assert {(mem.module, mem.role) for mem in g.groups["a"].members} >= {("a", "out"), ("b", "in")}


class _Looped(nn.Module):
    reduce_in_cond: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(4, (3, 3), name="a")(x)
        if self.reduce_in_cond:  # the loop condition sums over channels: refused
            cond = lambda c: (c[0] < 3) & (jnp.sum(c[1]) < 1e9)  # noqa: E731
        else:
            cond = lambda c: c[0] < 3  # noqa: E731
        _, y = jax.lax.while_loop(cond, lambda c: (c[0] + 1, 0.5 * c[1]), (0, y))
        return nn.Conv(2, (1, 1), name="b")(y)


def test_while_loops_are_followed():
    x = jnp.zeros((1, 4, 4, 3))
    m = _Looped()
    v = m.init(jax.random.PRNGKey(0), x)
    g = trace_linen(m, v, x)
    assert {(mem.module, mem.role) for mem in g.groups["a"].members} >= {("a", "out"), ("b", "in")}
    m = _Looped(reduce_in_cond=True)
    g = trace_linen(m, m.init(jax.random.PRNGKey(0), x), x)
    assert "a" not in g.groups and "summed over" in g.unprunable["a"]
