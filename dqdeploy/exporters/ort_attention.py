"""ONNX Runtime layout: each scaled-dot-product attention as one ``com.microsoft.MultiHeadAttention`` node.

The exporter writes attention as heads split by Reshape/Transpose, ``MatMul(q * a, k^T * b)``, Softmax,
``MatMul(p, v)`` and heads merged again; ONNX Runtime runs that in float with the full score matrix
(``batch * heads * N * N`` floats) written to memory and read back twice. Its CPU MultiHeadAttention
kernel computes the same product tile by tile (no score matrix, no head transposes). The rewrite is
float-exact up to summation order: the Q/DQ nodes around it are not touched. Only the exact
pattern is rewritten (every Reshape/Transpose checked against the head count and head size; a token count that is
dynamic, as with ``--dynamic-text-length``, read from the keys' own shape); anything
else (masks other than diffusers' bias of a 0/1 key padding mask -- PixArt's text mask, fed to the kernel as
its key padding mask --, rotary embeddings, normalised q/k) is left as it is. SD3's joint attention (image and text
heads concatenated along the tokens before one attention) becomes a Concat of the 3D parts per input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .graph_index import GraphIndex, delete_where

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
MASK_FILTER = -10000.0  # diffusers adds it to the scores where a text mask is 0 (MultiHeadAttention: mask_filter_value)
HEADS_PERM = [0, 2, 1, 3]  # [B, N, H, d] <-> [B, H, N, d]


@dataclass(frozen=True)
class Attention:
    """One matched attention: its 3D inputs [B, N, H*d] (each the concatenation of its parts along the
    tokens: one part, or two for SD3's joint attention over image and text tokens), head count, score
    scale and merged output."""

    q: tuple[str, ...]
    k: tuple[str, ...]
    v: tuple[str, ...]
    heads: int
    scale: float
    merged: Any  # the Reshape node writing [B, N, H*d]; becomes the MultiHeadAttention node
    mask: str | None = None  # a 0/1 key padding mask [B, N_k] (PixArt's text mask), whose 0s add MASK_FILTER


def _attr(node, name: str, default):
    """Any attribute of ``node`` as a Python value (ints lists included), or ``default``."""
    from onnx import helper

    found = next((a for a in node.attribute if a.name == name), None)
    value = default if found is None else helper.get_attribute_value(found)
    return list(value) if isinstance(value, (list, tuple)) or type(value).__name__.startswith("Repeated") else value


def _op(ix: GraphIndex, name: str, op: str):
    node = ix.producer.get(name)
    return node if node is not None and node.op_type == op else None


def _shape_const(ix: GraphIndex, node) -> list[int] | None:
    """The constant target shape of a Reshape node, or None."""
    if node is None or len(node.input) < 2:
        return None
    shape = ix.const_array(node.input[1])
    return None if shape is None or shape.ndim != 1 else [int(s) for s in shape]


# a Reshape target entry: a constant, axis ``i`` of tensor ``x``'s shape at run time, or None (computed otherwise)
Dim = int | tuple[str, int] | None


def _shape_entries(ix: GraphIndex, node) -> list[Dim] | None:
    """The target shape of a Reshape node: constant, or (a dynamic text length) a ``Concat`` of constants, slices
    of ``Shape(x)`` (each entry ``(x, axis)``, or the axis's size where shape inference knows it) and other values of
    a known length (entries None: only places the pattern does not check may hold them); None for anything else."""
    const = _shape_const(ix, node)
    if const is not None or node is None or len(node.input) < 2:
        return None if const is None else list(const)
    cat = _op(ix, node.input[1], "Concat")
    if cat is None or _attr(cat, "axis", None) != 0:
        return None
    entries: list[Dim] = []
    for piece in cat.input:
        values = ix.const_array(piece)
        part: list[Dim] | None = [int(v) for v in values.reshape(-1)] if values is not None else _shape_slice(ix, piece)
        length = ix.shape(piece)
        if part is None and length is not None and len(length) == 1 and isinstance(length[0], int):
            part = [None] * length[0]
        if part is None:
            return None
        entries += part
    return entries


def _shape_slice(ix: GraphIndex, name: str) -> list[Dim] | None:
    """``Shape(x)[a:b]`` (a ``Slice`` of a ``Shape``, or a ``Shape`` with start/end) as ``[(x, a), ...]``, each entry
    the axis's static size where it is known."""
    sliced = _op(ix, name, "Slice")
    shape = _op(ix, sliced.input[0] if sliced is not None else name, "Shape")
    dims = None if shape is None else ix.shape(shape.input[0])
    if dims is None:
        return None
    axes = list(range(len(dims)))[_attr(shape, "start", 0):_attr(shape, "end", None)]
    if sliced is not None:
        bounds = [ix.const_array(i) for i in sliced.input[1:]]
        values = [int(b.reshape(())) for b in bounds if b is not None and b.size == 1]
        if len(values) != len(bounds) or len(values) not in (2, 3) or values[2:] not in ([], [0]):
            return None  # starts, ends[, axes = 0]; steps other than 1 are not a shape slice
        axes = axes[values[0]:values[1]]
    return [dims[a] if isinstance(dims[a], int) and dims[a] > 0 else (shape.input[0], a) for a in axes]


def _scaled(ix: GraphIndex, name: str) -> tuple[str, float]:
    """``name`` = Mul(x, scalar constant) -> (x, scalar); otherwise (name, 1.0)."""
    node = _op(ix, name, "Mul")
    if node is not None:
        for k in (0, 1):
            c = ix.const_array(node.input[1 - k])
            if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.floating):
                return node.input[k], float(c.reshape(()))
    return name, 1.0


def _split_heads(ix: GraphIndex, name: str, perm: list[int] = HEADS_PERM) -> tuple[tuple[str, ...], int, int] | None:
    """``name`` = Transpose(Reshape(x, [., ., H, d]), perm) with x rank 3 -> ((x,), H, d); or the
    concatenation of such along the tokens (joint attention) -> ((x1, x2, ...), H, d)."""
    cat = _op(ix, name, "Concat")
    if cat is not None:
        parts = [p for p in (_one_split(ix, i, perm) for i in cat.input) if p is not None]
        if _attr(cat, "axis", None) not in (perm.index(1), perm.index(1) - 4) or len(parts) != len(cat.input) \
                or len({p[1:] for p in parts}) != 1:
            return None
        return tuple(p[0] for p in parts), parts[0][1], parts[0][2]
    one = _one_split(ix, name, perm)
    return None if one is None else ((one[0],), one[1], one[2])


def _one_split(ix: GraphIndex, name: str, perm: list[int]) -> tuple[str, int, int] | None:
    """``name`` = Transpose(Reshape(x, [., ., H, d]), perm) with x rank 3 -> (x, H, d)."""
    t = _op(ix, name, "Transpose")
    if t is None or _attr(t, "perm", []) != perm:
        return None
    r = _op(ix, t.input[0], "Reshape")
    shape = _shape_entries(ix, r)
    if r is None or shape is None or len(shape) != 4:
        return None
    heads, dim = shape[2], shape[3]
    if not (isinstance(heads, int) and isinstance(dim, int) and heads > 0 and dim > 0):
        return None
    src_shape = ix.shape(r.input[0])
    if src_shape is None or len(src_shape) != 3 or src_shape[2] not in (None, heads * dim):
        return None
    return r.input[0], heads, dim


def _tokens(ix: GraphIndex, parts: tuple[str, ...]) -> int | None:
    """The token count of the concatenation of ``parts`` (None when a part's is not known)."""
    counts = [(ix.shape(p) or (None, None))[1] for p in parts]
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def _keys_transposed(ix: GraphIndex, name: str) -> tuple[tuple[str, ...], int, int] | None:
    """``name`` = k as [B, H, d, N]: Transpose(Reshape(k), [0, 2, 3, 1]), or the exporter's
    Reshape(Transpose(Reshape(split_heads(k), [-1, N, d]), [0, 2, 1]), [-1, H, d, N])."""
    direct = _split_heads(ix, name, [0, 2, 3, 1])
    if direct is not None:
        return direct
    outer = _op(ix, name, "Reshape")
    outer_shape = _shape_entries(ix, outer)
    if outer is None or outer_shape is None or len(outer_shape) != 4:
        return None
    t = _op(ix, outer.input[0], "Transpose")
    if t is None or _attr(t, "perm", []) != [0, 2, 1]:
        return None
    inner = _op(ix, t.input[0], "Reshape")
    inner_shape = _shape_entries(ix, inner)
    if inner is None or inner_shape is None or len(inner_shape) != 3:
        return None
    split = _split_heads(ix, inner.input[0])
    if split is None:
        return None
    src, heads, dim = split
    tokens = _tokens(ix, src)
    # the token count: constant, or (a dynamic text length) read from the split keys' own shape [B, H, N, d]
    n = inner_shape[1]
    if inner_shape[2] != dim or outer_shape[1:3] != [heads, dim] or n != outer_shape[3] \
            or not (isinstance(n, int) and n > 0 or n == (inner.input[0], 2)) or tokens not in (None, n):
        return None
    return split


def _single_user(ix: GraphIndex, name: str, op: str):
    users = ix.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op or name in ix.outputs:
        return None
    return users[0]


def _padding_mask(ix: GraphIndex, name: str) -> str | None:
    """``name`` = diffusers' score bias of a key mask ``M`` [B, N_k]: ``Unsqueeze((1 - M) * -10000, [1, 2])``,
    perhaps expanded over the heads and viewed as [B, H, 1, N_k] again -> ``M``; None for any other tensor."""
    view = _op(ix, name, "Reshape")
    if view is not None:  # a dynamic text length leaves diffusers' view(batch, heads, -1, N_k) of [B, H, 1, N_k]
        target, src = _shape_entries(ix, view), ix.shape(view.input[0])
        if target is None or src is None or len(target) != 4 or len(src) != 4 or src[2] != 1 \
                or target[2] not in (1, -1) or target[1] != src[1]:
            return None
        name = view.input[0]
    expand = _op(ix, name, "Expand")
    unsq = _op(ix, expand.input[0] if expand is not None else name, "Unsqueeze")
    axes = None if unsq is None or len(unsq.input) < 2 else ix.const_array(unsq.input[1])
    mul = None if axes is None or sorted(int(a) for a in axes.reshape(-1)) != [1, 2] else _op(ix, unsq.input[0], "Mul")
    if mul is None:
        return None
    for i in (0, 1):
        factor, sub = ix.const_array(mul.input[1 - i]), _op(ix, mul.input[i], "Sub")
        one = None if sub is None else ix.const_array(sub.input[0])
        if factor is not None and factor.size == 1 and float(factor.reshape(())) == MASK_FILTER \
                and one is not None and one.size == 1 and float(one.reshape(())) == 1.0:
            src = ix.shape(sub.input[1])
            return sub.input[1] if src is not None and len(src) == 2 else None
    return None


def _masked_logits(ix: GraphIndex, name: str) -> tuple[str, str | None] | None:
    """Softmax's input -> (the scaled scores, the key padding mask added to them or None); None for another bias."""
    add = _op(ix, name, "Add")
    if add is None:
        return name, None
    for i in (0, 1):
        mask = _padding_mask(ix, add.input[1 - i])
        if mask is not None:
            return add.input[i], mask
    return None


def match_attention(ix: GraphIndex, softmax) -> Attention | None:
    """The attention around ``softmax`` if it is exactly the exporter's pattern, else None."""
    logits = _masked_logits(ix, softmax.input[0])
    if _attr(softmax, "axis", -1) not in (-1, 3) or logits is None:
        return None
    scores, post = _scaled(ix, logits[0])
    qk = _op(ix, scores, "MatMul")
    pv = _single_user(ix, softmax.output[0], "MatMul")
    if qk is None or pv is None or pv.input[0] != softmax.output[0]:
        return None
    q_name, a = _scaled(ix, qk.input[0])
    k_name, b = _scaled(ix, qk.input[1])
    q, k, v = _split_heads(ix, q_name), _keys_transposed(ix, k_name), _split_heads(ix, pv.input[1])
    if q is None or k is None or v is None or len({q[1:], k[1:], v[1:]}) != 1:
        return None
    heads, dim = q[1], q[2]
    merge = _single_user(ix, pv.output[0], "Transpose")
    if merge is None or _attr(merge, "perm", []) != HEADS_PERM:
        return None
    merged = _single_user(ix, merge.output[0], "Reshape")
    shape = _shape_entries(ix, merged)
    if merged is None or shape is None or len(shape) != 3 or shape[2] != heads * dim:
        return None
    return Attention(q[0], k[0], v[0], heads, a * b * post, merged, logits[1])


def _prune(model) -> int:
    """Remove nodes whose outputs nobody reads, and initializers nobody reads; the count of nodes removed."""
    g = model.graph
    removed = 0
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dropped = delete_where(g.node, lambda n: not any(o in used for o in n.output if o))
        if not dropped:
            break
        removed += dropped
    used = {i for n in g.node for i in n.input} | {i.name for i in g.input} | {o.name for o in g.output}
    produced = {o for n in g.node for o in n.output}
    for field in (g.initializer, g.value_info):
        delete_where(field, lambda t: t.name not in used and t.name not in produced)
    return removed


def _int32_mask(m: Attention, casts: dict[str, str], before: dict[str, list]) -> str:
    """The int32 copy of ``m``'s key padding mask the kernel takes, made once: a Cast in front of the first
    attention that reads it (``casts``: the copies made so far; ``before``: the nodes to insert)."""
    from onnx import TensorProto, helper

    assert m.mask is not None
    if m.mask not in casts:
        casts[m.mask] = f"{m.mask}/int32"
        before.setdefault(m.merged.output[0], []).insert(
            0, helper.make_node("Cast", [m.mask], [casts[m.mask]], name=casts[m.mask], to=TensorProto.INT32))
    return casts[m.mask]


def fuse_attention(model) -> int:
    """Rewrite every matched attention of ``model`` (an onnx.ModelProto, changed in place) into one
    ``com.microsoft.MultiHeadAttention`` node (after a Concat of the parts of q, k and v where the
    attention is joint); returns how many were rewritten."""
    from onnx import helper

    ix = GraphIndex(model)
    softmaxes = list(ix.nodes("Softmax"))
    found = [m for m in (match_attention(ix, s) for s in softmaxes) if m is not None]
    before: dict[str, list] = {}  # the output of an attention -> the Concat (Cast) nodes that go in front of it
    casts: dict[str, str] = {}  # a key padding mask -> its int32 copy
    for m in found:
        inputs = []
        for role, parts in (("q", m.q), ("k", m.k), ("v", m.v)):
            if len(parts) == 1:
                inputs.append(parts[0])
                continue
            joined = f"{m.merged.name}/{role}_joint"
            before.setdefault(m.merged.output[0], []).append(
                helper.make_node("Concat", list(parts), [joined], name=joined, axis=1))
            inputs.append(joined)
        masked: dict[str, Any] = {} if m.mask is None else {"mask_filter_value": MASK_FILTER}
        if m.mask is not None:
            inputs += ["", _int32_mask(m, casts, before)]  # no bias, then the key padding mask
        node = helper.make_node("MultiHeadAttention", inputs, list(m.merged.output),
                                name=m.merged.name + "/MultiHeadAttention", domain=MS_DOMAIN,
                                num_heads=m.heads, scale=m.scale, **masked)
        m.merged.CopyFrom(node)
    if before:  # topological order: each Concat right before the attention that reads it
        nodes = [new for n in model.graph.node for new in [*before.get(n.output[0] if n.output else "", []), n]]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    if found:
        removed = _prune(model)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        log.info("attention: %d of %d fused into MultiHeadAttention (%d nodes removed)",
                 len(found), len(softmaxes), removed)
    return len(found)
