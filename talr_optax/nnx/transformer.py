"""A small decoder-only transformer whose projections are quantized.

:class:`TransformerLM` is a pre-norm GPT-style language model over a small
vocabulary (bytes by default). Its ``num_layers`` blocks are created once
under ``nnx.vmap`` (every variable gets a leading layer axis) and applied
with ``nnx.scan``, so a deep model compiles as one block. The projections of
each block are :class:`~talr_optax.nnx.QuantLinear` layers:

* attention ``query``, ``key``, ``value``, ``out`` and the MLP's ``up`` and
  ``down`` kernels are quantized to ``weight_bits``;
* with ``multiply_scale=True``: no normalisation follows them to absorb the
  step size, so the quantized kernel is ``w_d / gamma * s``;
* weight-only by default. ``act_bits`` quantizes the input of ``down`` only,
  the one input that comes from a ReLU (unsigned quantizer); the other
  projections read a layer norm's output, which can be negative.

The token and position embeddings, the layer norms and the output layer stay
full precision. With ``weight_bits=None, act_bits=None`` the same class is
the full-precision model, with the same parameter paths, so
:func:`~talr_optax.nnx.load_full_precision` hands a pretrained model to QAT.

For per-layer transition rates pass
``layer_axes=talr_optax.nnx.layer_axes_for(model)`` to the optimizer: the
rate groups are then named ``blocks/attention/query/kernel[i]`` for layer
``i``.
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from talr_optax import _checks
from talr_optax.nnx import layers as layers_lib
from talr_optax.nnx.layers import QuantLinear

__all__ = ["TransformerBlock", "TransformerLM"]

# GPT-2's initialisation: N(0, 0.02) for every kernel and embedding.
_INIT = nnx.initializers.normal(0.02)


class _Attention(nnx.Module):
  """Causal multi-head self-attention with quantized q, k, v and output kernels."""

  def __init__(self, width: int, num_heads: int, weight_bits: int | None,
               out_init: tp.Callable[..., jax.Array], rngs: nnx.Rngs):
    def proj(init):
      return QuantLinear(width, width, use_bias=False, weight_bits=weight_bits, act_bits=None,
                         multiply_scale=True, kernel_init=init, rngs=rngs)

    self.num_heads = num_heads
    self.query, self.key, self.value = proj(_INIT), proj(_INIT), proj(_INIT)
    self.out = proj(out_init)

  def __call__(self, x: jax.Array) -> jax.Array:
    *lead, length, width = x.shape
    heads = lambda y: y.reshape(-1, length, self.num_heads, width // self.num_heads)
    y = jax.nn.dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                     heads(self.value(x)), is_causal=True)
    return self.out(y.reshape(*lead, length, width))


class _MLP(nnx.Module):
  """``down(relu(up(x)))``; ``act_bits`` quantizes the ReLU output ``down`` reads."""

  def __init__(self, width: int, hidden: int, weight_bits: int | None, act_bits: int | None,
               out_init: tp.Callable[..., jax.Array], rngs: nnx.Rngs):
    self.up = QuantLinear(width, hidden, use_bias=False, weight_bits=weight_bits,
                          act_bits=None, multiply_scale=True, kernel_init=_INIT, rngs=rngs)
    self.down = QuantLinear(hidden, width, use_bias=False, weight_bits=weight_bits,
                            act_bits=act_bits, multiply_scale=True, kernel_init=out_init,
                            rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(nnx.relu(self.up(x)))


class TransformerBlock(nnx.Module):
  """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

  Args:
    width: model width (>= 1), divisible by ``num_heads``.
    num_heads: attention heads (>= 1).
    mlp_ratio: MLP hidden width is ``mlp_ratio * width`` (>= 1).
    weight_bits: bits of the six projection kernels, in ``{1, 2, 3, 4, 8}``,
      or ``None`` (full precision).
    act_bits: bits of the MLP's hidden activations (the input of ``down``),
      or ``None``.
    num_layers: depth of the model the block is part of (>= 1): the output
      projections are initialised with std ``0.02 / sqrt(2 num_layers)`` as
      in GPT-2, so the residual stream does not grow with depth.
    rngs: random number generators.
  """

  def __init__(self, *, width: int, num_heads: int, mlp_ratio: int,
               weight_bits: int | None, act_bits: int | None, num_layers: int,
               rngs: nnx.Rngs):
    out_init = nnx.initializers.normal(0.02 / (2 * num_layers) ** 0.5)
    self.attention_norm = nnx.LayerNorm(width, rngs=rngs)
    self.attention = _Attention(width, num_heads, weight_bits, out_init, rngs)
    self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = _MLP(width, mlp_ratio * width, weight_bits, act_bits, out_init, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``(..., length, width)`` -> same shape; position ``t`` sees positions ``<= t``."""
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nnx.Module):
  """Decoder-only transformer language model with stacked, scanned blocks.

  ``tokens -> embed + position -> num_layers x TransformerBlock (scanned)
  -> layer norm -> linear -> logits``. Blocks are stored stacked: e.g.
  ``blocks.attention.query.kernel`` has shape ``(num_layers, width, width)``.

  Example::

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> lm = TransformerLM(context=16, width=32, num_layers=2, num_heads=2,
    ...                    weight_bits=2, rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((3, 16), jnp.int32)).shape
    (3, 16, 256)

  Args:
    vocab_size: number of token ids (>= 1); 256 for bytes.
    context: longest sequence the model reads (>= 1): the number of learned
      positions.
    width: model width (>= 1), divisible by ``num_heads``.
    num_layers: number of blocks (>= 1).
    num_heads: attention heads per block (>= 1).
    mlp_ratio: MLP hidden width over ``width`` (>= 1).
    weight_bits: bits of the attention and MLP kernels, in ``{1, 2, 3, 4,
      8}``, or ``None`` for the full-precision model.
    act_bits: bits of the MLP hidden activations, or ``None`` (default:
      weight-only quantization).
    rngs: random number generators.

  Raises:
    ValueError: a size not an int >= 1, ``width`` not divisible by
      ``num_heads``, bits outside the accepted values; checked before any
      parameter is drawn.
    TypeError: ``rngs`` is not an ``nnx.Rngs``.
  """

  def __init__(
      self,
      *,
      vocab_size: int = 256,
      context: int,
      width: int,
      num_layers: int,
      num_heads: int,
      mlp_ratio: int = 4,
      weight_bits: int | None,
      act_bits: int | None = None,
      rngs: nnx.Rngs,
  ):
    owner = "TransformerLM"
    sizes = {name: _checks.check_int(name, value, owner=owner) for name, value in (
        ("vocab_size", vocab_size), ("context", context), ("width", width),
        ("num_layers", num_layers), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio))}
    if sizes["width"] % sizes["num_heads"]:
      raise ValueError(f"{owner}: width must be divisible by num_heads, got width = "
                       f"{width}, num_heads = {num_heads}.")
    weight_bits = layers_lib.validate_layer_bits(weight_bits, "weight_bits", owner)
    act_bits = layers_lib.validate_layer_bits(act_bits, "act_bits", owner)
    layers_lib.check_rngs(rngs, owner)
    self.context = sizes["context"]
    self.num_layers = sizes["num_layers"]
    self.embed = nnx.Embed(sizes["vocab_size"], sizes["width"], embedding_init=_INIT, rngs=rngs)
    self.position = nnx.Param(_INIT(rngs.params(), (sizes["context"], sizes["width"])))
    block = dict(width=sizes["width"], num_heads=sizes["num_heads"],
                 mlp_ratio=sizes["mlp_ratio"], weight_bits=weight_bits, act_bits=act_bits,
                 num_layers=sizes["num_layers"])

    @nnx.split_rngs(splits=sizes["num_layers"])
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> TransformerBlock:
      return TransformerBlock(**block, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.LayerNorm(sizes["width"], rngs=rngs)
    self.head = nnx.Linear(sizes["width"], sizes["vocab_size"], kernel_init=_INIT, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: integer ids, shape ``(..., length)`` with ``length <=
        context``.

    Returns:
      float32 logits ``(..., length, vocab_size)``; position ``t`` depends
      on ``tokens[..., :t + 1]`` only.
    """
    length = tokens.shape[-1]
    if length > self.context:
      raise ValueError(f"TransformerLM: tokens have length {length}, more than the "
                       f"model's context = {self.context}.")
    x = self.embed(tokens) + self.position[:length]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through(x: jax.Array, block: TransformerBlock) -> jax.Array:
      return block(x)

    return self.head(self.norm(through(x, self.blocks))).astype(jnp.float32)
