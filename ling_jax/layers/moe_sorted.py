"""The CPU grouped SwiGLU of the ``sorted`` dispatch: gather, compute, scatter back, per expert tile.

Input: token-expert assignments already sorted by expert (``tokens[r]`` is the token of sorted
row ``r``; expert ``g`` owns rows ``[starts[g], starts[g] + sizes[g])``). For every expert, XLA
while-loops with *dynamic* trip counts walk its rows a tile at a time: read the tile's token
vectors, run the expert's SwiGLU, and scatter-add the weighted results straight into the
``[T, E]`` output. The expert's weights are sliced once per expert.

Tiles (``tiles``, e.g. 256, 224, ..., 32: multiples of a quantum): as many tiles of the largest
size as fit, then ONE tile of the smallest size that holds the remainder. An expert thus costs
``size // top + 1`` loop iterations (each has a fixed overhead of ~10 us on CPU) and wastes fewer
rows than the quantum. This replaced a halving ladder (128, 64, 32, ...) that covered a remainder
with several small tiles: on 2 CPU cores a matmul tile below ~96 rows runs on one core at about
a third of the dense rate, so one slightly padded tile is faster than three exact small ones.

Two ways to read a tile (``contiguous``): gather its rows from ``x [T, E]`` inside the loop (no
``[T*K, E]`` buffer: on these CPUs writing a fresh 32 MB buffer costs as much as a 0.3 GFLOP
matmul), or gather all rows once into ``xs = x[tokens]`` and slice contiguous tiles (~1.5x faster
for tiles of 16-32 rows: a matmul fed by an in-loop gather runs far below peak). The default takes
the contiguous layout when experts hold fewer than 1024 rows on average.

Limitation: XLA runs a loop's small matmuls (tiles below ~96 rows) on one core, while a large
dense matmul uses every core; splitting the experts into independent loops did not make XLA run
them concurrently (measured). With ~128 rows per expert (top-1 of 64 experts over 8192 tokens)
the tiles reach ~0.75 of the dense matmul rate and routing + sorting cost ~12% more, so such
low-load configurations sit near 0.6 of a dense matmul (see ``experiments/bench_moe.py``).

The backward pass (``jax.custom_vjp``; a dynamic-trip-count loop is not reverse-differentiable)
walks the same tiles, recomputes the SwiGLU and accumulates the gradient of the rows (or of
``x``), of the combine weight of every row, and each expert's weight gradients in float32.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

F32 = jnp.float32


def pick_tiles(rows: int, num_experts: int) -> tuple[int, ...]:
    """Static tile sizes: multiples of a quantum ``q`` up to ``top``.

    ``top`` is the power of two at or above twice the mean load per expert (8..512), and there are
    ``mean / 16`` sizes (1..8; each size is a loop body to compile, which dominates small problems):
    an expert with up to ``top`` rows runs ONE matmul tile, padded by fewer than ``q`` rows, and a
    larger one runs full ``top`` tiles plus one such tile. On 2 CPU cores tiles below ~96 rows run on
    one core, so one well-sized tile beats a ladder of small ones (measured: ``experiments/bench_moe.py``).
    """
    mean = max(rows // max(num_experts, 1), 1)
    top = min(512, max(8, 1 << (2 * mean - 1).bit_length()))
    q = max(8, top // min(8, max(1, mean // 16)))
    return tuple(range(top, 0, -q))


def _walk(carry, start, size, tiles: tuple[int, ...], step: Callable):
    """Runs ``step(carry, r0, n_own, tile)`` over rows [start, start + size) tile by tile.

    ``n_own`` (traced) is how many of the tile's rows belong to the range (the rest belong to the
    next expert, or are padding). Plan: ``size // tiles[0]`` full tiles of the largest size, then
    ONE tile covering the remainder, of the smallest size in ``tiles`` that holds it (none if the
    remainder is empty). Every size is a loop with a dynamic trip count, each starting where the
    previous one stopped (this chained form measured 1.9x faster than independent 0/1-trip loops).
    """
    top = tiles[0]
    rest = size % top
    done = jnp.zeros((), jnp.int32)
    for level, tile in enumerate(tiles):
        smaller = tiles[level + 1] if level + 1 < len(tiles) else 0
        covers = ((rest > 0) & (rest <= tile) & (rest > smaller)).astype(jnp.int32)  # smallest size >= rest
        n = size // top + covers if level == 0 else covers
        base, left = start + done, size - done

        def body(i, c, base=base, left=left, tile=tile):
            return step(c, base + i * tile, left - i * tile, tile)

        carry = jax.lax.fori_loop(0, n, body, carry)
        done = done + n * tile
    return carry


def _dsilu(z):
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _read(src, tok, r0, tile, contiguous):
    """Rows of one tile: a slice of pre-gathered rows, or a gather of token rows."""
    if contiguous:
        return jax.lax.dynamic_slice(src, (r0, 0), (tile, src.shape[1]))  # [tile, E]
    return src[jax.lax.dynamic_slice(tok, (r0,), (tile,))]  # [tile, E]


def _tile_weights(wts, r0, n_own, tile):
    """(own [tile] bool, weight [tile] with 0 for rows not owned)."""
    own = jnp.arange(tile) < n_own
    return own, jnp.where(own, jax.lax.dynamic_slice(wts, (r0,), (tile,)), 0.0)


def _padded(src, tokens, weights, pad, contiguous):
    """Pads row arrays by the largest tile: a last tile may read past the end."""
    src = jnp.pad(src, ((0, pad), (0, 0))) if contiguous else src
    return src, jnp.pad(tokens, (0, pad)), jnp.pad(weights, (0, pad))


def _forward(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, num_tokens, tiles, contiguous):
    """Sum over experts of weighted SwiGLU outputs, scattered into [T, E] (float32)."""
    e = src.shape[1]
    src, tok, wts = _padded(src, tokens, weights, tiles[0], contiguous)

    def expert(g, out):
        wg, wu, wd = w_gate[g], w_up[g], w_down[g]  # [E, F], [E, F], [F, E]

        def step(out, r0, n_own, tile):
            idx = jax.lax.dynamic_slice(tok, (r0,), (tile,))  # [tile] token of each row
            own, w = _tile_weights(wts, r0, n_own, tile)
            a = _read(src, tok, r0, tile, contiguous)  # [tile, E]
            y = (jax.nn.silu(a @ wg) * (a @ wu)) @ wd  # [tile, E]
            return out.at[idx].add(jnp.where(own[:, None], y.astype(F32) * w[:, None], 0.0))

        return _walk(out, starts[g], sizes[g], tiles, step)

    return jax.lax.fori_loop(0, w_gate.shape[0], expert, jnp.zeros((num_tokens, e), F32))


def _backward(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, dout, tiles, contiguous):
    """Gradients: (d src, d weights [M], dW_gate/up/down [X, ...]) in float32.

    ``dout`` is the output cotangent: pre-gathered per row ``[M, E]`` when contiguous, else ``[T, E]``.
    """
    e = src.shape[1]
    m = tokens.shape[0]
    f = w_gate.shape[-1]
    src, tok, wts = _padded(src, tokens, weights, tiles[0], contiguous)
    dout = jnp.pad(dout, ((0, tiles[0]), (0, 0))) if contiguous else dout
    cdt = src.dtype

    def expert(g, carry):
        dsrc, dw, dwg_all, dwu_all, dwd_all = carry
        wg, wu, wd = w_gate[g], w_up[g], w_down[g]

        def step(c, r0, n_own, tile):
            dsrc, dw, ag, au, ad = c
            own, w = _tile_weights(wts, r0, n_own, tile)  # [tile]
            a = _read(src, tok, r0, tile, contiguous)  # [tile, E]
            gate, up = a @ wg, a @ wu  # [tile, F]
            act = jax.nn.silu(gate)
            h = act * up
            y = h @ wd  # [tile, E]
            go = _read(dout, tok, r0, tile, contiguous).astype(F32)  # [tile, E]
            dwt = jnp.where(own, jnp.sum(go * y.astype(F32), axis=-1), 0.0)  # d weight per row
            cur = jax.lax.dynamic_slice(dw, (r0,), (tile,))
            dw = jax.lax.dynamic_update_slice(dw, jnp.where(own, dwt, cur), (r0,))
            dy = (go * w[:, None]).astype(cdt)  # [tile, E]; rows not owned have w = 0
            ad = ad + jnp.dot(h.T, dy, preferred_element_type=F32)  # [F, E]
            dh = dy @ wd.T  # [tile, F]
            dgate = (dh * up * _dsilu(gate.astype(F32)).astype(cdt)).astype(cdt)
            dup = (dh * act).astype(cdt)
            ag = ag + jnp.dot(a.T, dgate, preferred_element_type=F32)  # [E, F]
            au = au + jnp.dot(a.T, dup, preferred_element_type=F32)
            da = jnp.dot(dgate, wg.T, preferred_element_type=F32) + jnp.dot(dup, wu.T, preferred_element_type=F32)
            if contiguous:  # rows of the next expert in the tail keep their value
                cur = jax.lax.dynamic_slice(dsrc, (r0, 0), (tile, e))
                dsrc = jax.lax.dynamic_update_slice(dsrc, jnp.where(own[:, None], da, cur), (r0, 0))
            else:
                idx = jax.lax.dynamic_slice(tok, (r0,), (tile,))
                dsrc = dsrc.at[idx].add(jnp.where(own[:, None], da, 0.0))
            return dsrc, dw, ag, au, ad

        zeros_ef, zeros_fe = jnp.zeros((e, f), F32), jnp.zeros((f, e), F32)
        dsrc, dw, ag, au, ad = _walk((dsrc, dw, zeros_ef, zeros_ef, zeros_fe), starts[g], sizes[g], tiles, step)
        dwg_all = jax.lax.dynamic_update_slice(dwg_all, ag[None], (g, 0, 0))
        dwu_all = jax.lax.dynamic_update_slice(dwu_all, au[None], (g, 0, 0))
        dwd_all = jax.lax.dynamic_update_slice(dwd_all, ad[None], (g, 0, 0))
        return dsrc, dw, dwg_all, dwu_all, dwd_all

    n = w_gate.shape[0]
    init = (jnp.zeros(src.shape, F32), jnp.zeros((m + tiles[0],), F32), jnp.zeros((n, e, f), F32),
            jnp.zeros((n, e, f), F32), jnp.zeros((n, f, e), F32))
    dsrc, dw, dwg, dwu, dwd = jax.lax.fori_loop(0, n, expert, init)
    return (dsrc[:m] if contiguous else dsrc), dw[:m], dwg, dwu, dwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _grouped_swiglu(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, num_tokens, tiles, contiguous):
    return _forward(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, num_tokens, tiles, contiguous)


def _fwd(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, num_tokens, tiles, contiguous):
    out = _forward(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, num_tokens, tiles, contiguous)
    return out, (src, tokens, weights, starts, sizes, w_gate, w_up, w_down)


def _bwd(num_tokens, tiles, contiguous, res, dout):
    src, tokens, weights, starts, sizes, w_gate, w_up, w_down = res
    dout = dout.astype(F32)
    if contiguous:
        dout = dout[tokens]  # [M, E]: the output cotangent of every row, contiguous per tile
    dsrc, dw, dwg, dwu, dwd = _backward(src, tokens, weights, starts, sizes, w_gate, w_up, w_down, dout, tiles,
                                        contiguous)
    return (dsrc.astype(src.dtype), None, dw.astype(weights.dtype), None, None,
            dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype))


_grouped_swiglu.defvjp(_fwd, _bwd)


def grouped_swiglu(
    x: Float[Array, "T E"],
    tokens: Int[Array, " M"],
    weights: Float[Array, " M"],
    starts: Int[Array, " X"],
    sizes: Int[Array, " X"],
    w_gate: Float[Array, "X E F"],
    w_up: Float[Array, "X E F"],
    w_down: Float[Array, "X F E"],
    *,
    tiles: int | tuple[int, ...] | None = None,
    contiguous: bool | None = None,
) -> Float[Array, "T E"]:
    """``out[tokens[r]] += weights[r] * swiglu_{g(r)}(x[tokens[r]])`` over the rows of every expert.

    Rows outside ``[starts[g], starts[g] + sizes[g])`` for every g are ignored (e.g. dropped or
    zero-expert assignments sorted to the end). Differentiable in x, weights and the expert weights.
    ``tiles``: one tile size or decreasing sizes (full tiles of the first, then one tile of the smallest
    size that holds the rest; default :func:`pick_tiles`); ``contiguous``
    (default: mean rows per expert < 1024) gathers all rows once instead of per tile. Returns float32.
    """
    m, num_x = tokens.shape[0], w_gate.shape[0]
    tiles = pick_tiles(m, num_x) if tiles is None else (tiles,) if isinstance(tiles, int) else tuple(tiles)
    if not tiles or any(t <= 0 for t in tiles) or list(tiles) != sorted(tiles, reverse=True):
        raise ValueError(f"tiles must be positive and decreasing, got {tiles}")
    contiguous = m < 1024 * num_x if contiguous is None else bool(contiguous)
    tokens = tokens.astype(jnp.int32)
    src = x[tokens] if contiguous else x  # [M, E] rows in expert order, or the tokens themselves
    return _grouped_swiglu(src, tokens, weights.astype(F32), starts.astype(jnp.int32), sizes.astype(jnp.int32),
                           w_gate, w_up, w_down, x.shape[0], tuple(int(t) for t in tiles), contiguous)
