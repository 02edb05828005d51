"""Small quantizable models and the full-precision -> QAT hand-over.

All models keep the first convolution and the last linear layer full
precision and put a batch norm after every quantized convolution, which
absorbs the step sizes the quantizers do not multiply back
(``multiply_scale=False``, as in Lee et al., ICCV 2025). With
``weight_bits=None, act_bits=None`` they are plain full-precision models with
the same parameter paths, which is what :func:`load_full_precision` relies on:

    fp = ResNet20(weight_bits=None, act_bits=None, rngs=nnx.Rngs(0))
    ...train fp...
    qat = ResNet20(weight_bits=2, act_bits=2, rngs=nnx.Rngs(0))
    load_full_precision(qat, fp)
    calibrate(qat, first_batch)

Activations are quantized unsigned, so only at the input of a conv that
follows a ReLU (or ReLU6); a conv whose input can be negative quantizes its
kernel only.
"""

from __future__ import annotations

import typing as tp
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from talr_optax import _checks
from talr_optax.nnx import layers as layers_lib
from talr_optax.nnx.layers import QuantConv

__all__ = [
    "SmallCNN",
    "BasicBlock",
    "ResNet20",
    "InvertedResidual",
    "MobileNetV2Tiny",
    "calibrate",
    "reset_calibration",
    "load_full_precision",
]


# He normal, the reference ResNet's torch.nn.init.kaiming_normal_ (std
# sqrt(2 / fan_in), not truncated).
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def _validate(owner: str, weight_bits: tp.Any, act_bits: tp.Any, rngs: tp.Any,
              **sizes: tp.Any) -> dict[str, int]:
  """Checks a model's arguments before any parameter is drawn; returns the sizes as ints."""
  layers_lib.validate_layer_bits(weight_bits, "weight_bits", owner)
  layers_lib.validate_layer_bits(act_bits, "act_bits", owner)
  layers_lib.check_rngs(rngs, owner)
  return {name: _checks.check_int(name, v, owner=owner) for name, v in sizes.items()}


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # momentum 0.9 is PyTorch's 0.1 (the reference code's setting).
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


def _stem(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Conv:
  """The full-precision first conv (3x3, no bias: a batch norm follows)."""
  return nnx.Conv(in_features, out_features, (3, 3), use_bias=False, kernel_init=he_normal,
                  rngs=rngs)


def _qconv(weight_bits: int | None, act_bits: int | None, rngs: nnx.Rngs,
           kernel_size: tuple[int, ...] = (3, 3)) -> tp.Callable[..., QuantConv]:
  """A QuantConv factory for convs followed by a batch norm (no bias, scales absorbed)."""
  return partial(QuantConv, kernel_size=kernel_size, use_bias=False, weight_bits=weight_bits,
                 act_bits=act_bits, multiply_scale=False, kernel_init=he_normal, rngs=rngs)


class SmallCNN(nnx.Module):
  """A CNN for 8x8 images (scikit-learn digits): about 15k parameters.

  conv3x3(16, FP) - BN - ReLU - qconv3x3(32, stride 2) - BN - ReLU -
  qconv3x3(32, stride 2) - BN - ReLU - global average pool - linear (FP).

  Args:
    weight_bits: bits of the quantized convs' kernels, or ``None``.
    act_bits: bits of the quantized convs' inputs, or ``None``.
    in_channels: input channels (1 for digits).
    num_classes: output classes.
    width: channels of the first conv; the quantized convs use ``2 * width``.
    rngs: random number generators.

  Raises:
    ValueError: bits outside ``{1, 2, 3, 4, 8, None}``, or a size
      (``in_channels``, ``num_classes``, ``width``) that is not an int >= 1.
    TypeError: ``rngs`` is not an ``nnx.Rngs``.
  """

  def __init__(
      self,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      in_channels: int = 1,
      num_classes: int = 10,
      width: int = 16,
      rngs: nnx.Rngs,
  ):
    sizes = _validate("SmallCNN", weight_bits, act_bits, rngs, in_channels=in_channels,
                      num_classes=num_classes, width=width)
    in_channels, num_classes, width = (sizes[k] for k in ("in_channels", "num_classes", "width"))
    qconv = _qconv(weight_bits, act_bits, rngs)
    self.conv1 = _stem(in_channels, width, rngs)
    self.bn1 = _batch_norm(width, rngs)
    self.conv2 = qconv(width, 2 * width, strides=2)
    self.bn2 = _batch_norm(2 * width, rngs)
    self.conv3 = qconv(2 * width, 2 * width, strides=2)
    self.bn3 = _batch_norm(2 * width, rngs)
    self.linear = nnx.Linear(2 * width, num_classes, kernel_init=he_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of NHWC images ``x``."""
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.relu(self.bn3(self.conv3(x)))
    return self.linear(jnp.mean(x, axis=(1, 2)))


def _shortcut_a(x: jax.Array, out_features: int, stride: int) -> jax.Array:
  """Option-A shortcut: subsample, then zero-pad the new channels (no params)."""
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  extra = out_features - x.shape[-1]
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nnx.Module):
  """ResNet basic block with two quantized 3x3 convs and an option-A shortcut.

  Both convs read ReLU outputs (the block input is the previous block's
  ReLU output), so both quantize their inputs.

  Args:
    in_features: input channels.
    out_features: output channels.
    stride: stride of the first conv (and of the shortcut's subsampling).
    weight_bits: kernel bits or ``None``.
    act_bits: input bits or ``None``.
    rngs: random number generators.

  Raises:
    ValueError: sizes or ``stride`` not ints >= 1, ``out_features <
      in_features`` (the shortcut only pads), bad bits.
    TypeError: ``rngs`` is not an ``nnx.Rngs``.
  """

  def __init__(
      self,
      *,
      in_features: int,
      out_features: int,
      stride: int,
      weight_bits: int | None,
      act_bits: int | None,
      rngs: nnx.Rngs,
  ):
    sizes = _validate("BasicBlock", weight_bits, act_bits, rngs, in_features=in_features,
                      out_features=out_features, stride=stride)
    in_features, out_features, stride = (
        sizes[k] for k in ("in_features", "out_features", "stride"))
    if out_features < in_features:
      raise ValueError(
          "BasicBlock: out_features must be >= in_features (the option-A shortcut "
          f"zero-pads channels, it cannot drop them), got in_features = {in_features}, "
          f"out_features = {out_features}."
      )
    qconv = _qconv(weight_bits, act_bits, rngs)
    self.conv1 = qconv(in_features, out_features, strides=stride)
    self.bn1 = _batch_norm(out_features, rngs)
    self.conv2 = qconv(out_features, out_features)
    self.bn2 = _batch_norm(out_features, rngs)
    self.stride = stride
    self.out_features = out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + _shortcut_a(x, self.out_features, self.stride))


class ResNet20(nnx.Module):
  """CIFAR ResNet-20 (He et al., 2016) with option-A shortcuts: 0.27M params.

  conv3x3(16, FP) - BN - ReLU - 3 stages x 3 basic blocks (16, 32, 64
  channels, stride 2 at the start of stages 2 and 3) - global average pool -
  linear (FP). All 18 convs inside the blocks are quantized.

  Args:
    weight_bits: bits of the quantized convs' kernels, or ``None``.
    act_bits: bits of the quantized convs' inputs, or ``None``.
    in_channels: input channels (3 for CIFAR).
    num_classes: output classes.
    rngs: random number generators.

  Raises:
    ValueError: bits outside ``{1, 2, 3, 4, 8, None}``, or ``in_channels`` /
      ``num_classes`` not an int >= 1.
    TypeError: ``rngs`` is not an ``nnx.Rngs``.
  """

  def __init__(
      self,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      in_channels: int = 3,
      num_classes: int = 10,
      rngs: nnx.Rngs,
  ):
    sizes = _validate("ResNet20", weight_bits, act_bits, rngs, in_channels=in_channels,
                      num_classes=num_classes)
    in_channels, num_classes = sizes["in_channels"], sizes["num_classes"]
    self.conv1 = _stem(in_channels, 16, rngs)
    self.bn1 = _batch_norm(16, rngs)
    blocks = []
    in_features = 16
    for stage, width in enumerate((16, 32, 64)):
      for i in range(3):
        stride = 2 if stage > 0 and i == 0 else 1
        blocks.append(BasicBlock(
            in_features=in_features, out_features=width, stride=stride,
            weight_bits=weight_bits, act_bits=act_bits, rngs=rngs,
        ))
        in_features = width
    self.blocks = nnx.List(blocks)
    self.linear = nnx.Linear(64, num_classes, kernel_init=he_normal, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of NHWC images ``x``."""
    x = nnx.relu(self.bn1(self.conv1(x)))
    for block in self.blocks:
      x = block(x)
    return self.linear(jnp.mean(x, axis=(1, 2)))


class InvertedResidual(nnx.Module):
  """MobileNetV2 inverted residual block (Sandler et al., 2018), quantized.

  1x1 expand conv - BN - ReLU6 - 3x3 depthwise conv (``feature_group_count``
  = channels) - BN - ReLU6 - 1x1 project conv - BN, plus the input when
  ``stride == 1`` and the channel count is unchanged. The projection has no
  ReLU (the linear bottleneck), so the block output, and so the next block's
  input, can be negative.

  Where activations are quantized (unsigned): at the inputs of the depthwise
  and project convs, which follow a ReLU6. The expand conv reads the block
  input (a linear bottleneck), so only its kernel is quantized. With
  ``expand_ratio=1`` there is no expand conv and the depthwise conv reads the
  block input itself, quantized: use it only on a non-negative input (e.g.
  right after a ReLU stem, as in :class:`MobileNetV2Tiny`).

  Args:
    in_features: input channels.
    out_features: output channels.
    stride: stride of the depthwise conv.
    expand_ratio: hidden channels are ``expand_ratio * in_features``.
    weight_bits: kernel bits of all three convs, or ``None``.
    act_bits: input bits of the depthwise and project convs, or ``None``.
    rngs: random number generators.

  Raises:
    ValueError: a size, ``stride`` or ``expand_ratio`` not an int >= 1, bad bits.
    TypeError: ``rngs`` is not an ``nnx.Rngs``.
  """

  def __init__(
      self,
      *,
      in_features: int,
      out_features: int,
      stride: int,
      expand_ratio: int,
      weight_bits: int | None,
      act_bits: int | None,
      rngs: nnx.Rngs,
  ):
    sizes = _validate("InvertedResidual", weight_bits, act_bits, rngs, in_features=in_features,
                      out_features=out_features, stride=stride, expand_ratio=expand_ratio)
    in_features, out_features, stride, expand_ratio = (
        sizes[k] for k in ("in_features", "out_features", "stride", "expand_ratio"))
    hidden = in_features * expand_ratio
    if expand_ratio != 1:
      self.expand = _qconv(weight_bits, None, rngs, kernel_size=(1, 1))(in_features, hidden)
      self.bn_expand = _batch_norm(hidden, rngs)
    else:
      self.expand = nnx.data(None)
      self.bn_expand = nnx.data(None)
    self.depthwise = _qconv(weight_bits, act_bits, rngs)(
        hidden, hidden, strides=stride, feature_group_count=hidden)
    self.bn_depthwise = _batch_norm(hidden, rngs)
    self.project = _qconv(weight_bits, act_bits, rngs, kernel_size=(1, 1))(hidden, out_features)
    self.bn_project = _batch_norm(out_features, rngs)
    self.residual = stride == 1 and in_features == out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    """``bn(project(relu6(bn(depthwise(relu6(bn(expand(x)))))))) (+ x)``."""
    h = x
    if self.expand is not None:
      h = nnx.relu6(self.bn_expand(self.expand(h)))
    h = nnx.relu6(self.bn_depthwise(self.depthwise(h)))
    y = self.bn_project(self.project(h))
    return x + y if self.residual else y


class MobileNetV2Tiny(nnx.Module):
  """A MobileNetV2-style depthwise-separable net for 8x8 images: about 10k params.

  conv3x3(16, FP) - BN - ReLU6 - inverted residual blocks (expand ratio,
  channels, stride) = (1, 8, 1), (4, 16, 2), (4, 16, 1) with a residual,
  (4, 24, 2) - qconv1x1(64) - BN - ReLU6 - global average pool - linear (FP).
  An 8x8 input ends at 2x2. All convs except the first are quantized: the
  depthwise and project convs of each block on kernel and input, the expand
  convs and the last 1x1 conv (which read a linear bottleneck, possibly
  negative) on the kernel only; see :class:`InvertedResidual`.

  Args and errors: as :class:`ResNet20` (``in_channels`` 1 for digits).
  """

  # (expand_ratio, out_features, stride) per block.
  BLOCKS = ((1, 8, 1), (4, 16, 2), (4, 16, 1), (4, 24, 2))
  LAST_FEATURES = 64

  def __init__(
      self,
      *,
      weight_bits: int | None,
      act_bits: int | None,
      in_channels: int = 1,
      num_classes: int = 10,
      rngs: nnx.Rngs,
  ):
    sizes = _validate("MobileNetV2Tiny", weight_bits, act_bits, rngs, in_channels=in_channels,
                      num_classes=num_classes)
    self.conv1 = _stem(sizes["in_channels"], 16, rngs)
    self.bn1 = _batch_norm(16, rngs)
    blocks = []
    in_features = 16
    for expand_ratio, out_features, stride in self.BLOCKS:
      blocks.append(InvertedResidual(
          in_features=in_features, out_features=out_features, stride=stride,
          expand_ratio=expand_ratio, weight_bits=weight_bits, act_bits=act_bits, rngs=rngs))
      in_features = out_features
    self.blocks = nnx.List(blocks)
    self.conv_last = _qconv(weight_bits, None, rngs, kernel_size=(1, 1))(
        in_features, self.LAST_FEATURES)
    self.bn_last = _batch_norm(self.LAST_FEATURES, rngs)
    self.linear = nnx.Linear(self.LAST_FEATURES, sizes["num_classes"], kernel_init=he_normal,
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of NHWC images ``x``."""
    x = nnx.relu6(self.bn1(self.conv1(x)))
    for block in self.blocks:
      x = block(x)
    x = nnx.relu6(self.bn_last(self.conv_last(x)))
    return self.linear(jnp.mean(x, axis=(1, 2)))


def _check_model(model: tp.Any, owner: str, name: str) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"{owner}: {name} must be an nnx.Module (e.g. a SmallCNN or ResNet20), got "
        f"{name} of type {type(model).__name__}."
    )


def _check_batch(x: tp.Any) -> None:
  """``x`` must be a numeric, non-empty, finite array with a batch axis."""
  if not isinstance(x, (jax.Array, np.ndarray)):
    raise TypeError(
        "calibrate: x must be a batch as a jax.Array or numpy.ndarray, got x of type "
        f"{type(x).__name__}."
    )
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
    raise ValueError(f"calibrate: x must hold numbers, got x of dtype {x.dtype}.")
  if x.ndim < 1 or x.shape[0] < 1:
    raise ValueError(
        "calibrate: x must be a non-empty batch (batch axis first, size >= 1), got x "
        f"of shape {tuple(x.shape)}."
    )
  if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
    raise ValueError(
        "calibrate: x holds NaN or Inf; the step sizes computed from it would be NaN."
    )


def reset_calibration(model: nnx.Module) -> None:
  """Marks every quantized layer uncalibrated: the next training forward
  (or :func:`calibrate`) sets its weight and activation step sizes again."""
  for _, layer in layers_lib.quantized_layers(model):
    layer.calibrated[...] = False


def _call(model: nnx.Module, x: jax.Array) -> tp.Any:
  return model(x)


# One compiled program instead of one compilation per op in eager mode (the
# cache is keyed on the model structure and ``forward``); nnx.jit writes the
# new scales back into the model.
@partial(nnx.jit, static_argnums=2)
def _calibration_pass(model: nnx.Module, x: jax.Array, forward: tp.Callable) -> None:
  forward(model, x)


def calibrate(
    model: nnx.Module,
    x: jax.Array,
    forward: tp.Callable[[nnx.Module, jax.Array], tp.Any] | None = None,
) -> None:
  """Sets all step sizes of ``model`` from its current weights and one batch.

  Runs one forward pass in training mode (compiled with ``nnx.jit``), as the
  first training step would: every quantized layer freezes
  ``s = 3 * std(kernel)`` and sets its activation step size to
  ``3 * std(input) / sqrt(1 - 2/pi)`` (per layer for stacked layers applied
  with ``nnx.scan``). Batch-norm statistics and the train/eval mode are
  restored afterwards.

  Call it after loading weights, and before the first ``nnx.jit`` step
  that uses :func:`levels_fn_for` (see there why).

  Args:
    model: the model to calibrate (modified in place).
    x: a training batch.
    forward: ``forward(model, x)`` if the model is not called as
      ``model(x)``.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``, ``x`` is not an array.
    ValueError: ``forward`` is not callable; ``x`` is empty, has no batch
      axis, or holds NaN or Inf (the scales would be NaN); a quantized layer
      gets no step size from ``x`` (its input or kernel has std 0 on it, e.g.
      an all-zero batch), naming the layers. The model is left as it was.
    Any error of the forward pass (e.g. a shape that does not fit the model),
    with the batch's shape in front of the message; the model is left as it was.
  """
  _check_model(model, "calibrate", "model")
  if forward is not None:
    _checks.check_callable("forward", forward, "None or a callable forward(model, x)",
                           owner="calibrate")
  _check_batch(x)
  modes = [
      (module, name, getattr(module, name))
      for _, module in nnx.iter_modules(model)
      for name in ("deterministic", "use_running_average")
      if hasattr(module, name)
  ]
  # Arrays are immutable, so the pure state is a snapshot.
  batch_stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  quantizer_state = nnx.as_pure(nnx.state(
      model, nnx.Any(layers_lib.WeightScale, layers_lib.ActivationScale, layers_lib.Calibrated)))
  reset_calibration(model)
  model.train()
  try:
    try:
      _calibration_pass(model, x, forward or _call)
    except (TypeError, ValueError) as e:
      nnx.update(model, quantizer_state)  # a failed call leaves the model as it was
      kind = TypeError if isinstance(e, TypeError) else ValueError
      raise kind(
          f"calibrate: the batch x of shape {tuple(x.shape)} and dtype {x.dtype} does "
          f"not fit the model: {e}") from e
    except Exception:
      nnx.update(model, quantizer_state)
      raise
    # A layer calibrates only from a batch that defines its step sizes.
    missed = [path for path, layer in layers_lib.quantized_layers(model)
              if not bool(jnp.all(layer.calibrated[...]))]
    if missed:
      nnx.update(model, quantizer_state)
      names = ", ".join("'" + "/".join(map(str, path)) + "'" for path in missed[:5])
      raise ValueError(
          f"calibrate: the batch x defines no step size for {len(missed)} quantized "
          f"layer(s): {names}. Their input (or kernel) has std 0 or no elements on it, "
          "e.g. an all-zero or constant batch x; pass a representative training batch."
      )
  finally:
    nnx.update(model, batch_stats)
    for module, name, value in modes:
      setattr(module, name, value)


def _path_name(path: tuple[tp.Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def load_full_precision(target: nnx.Module, source: nnx.Module | nnx.State) -> None:
  """Copies a (pretrained) model's weights into a quantized model.

  Copies every ``nnx.Param`` except activation scales (kernels, biases,
  batch-norm scale and bias) and every ``nnx.BatchStat`` of ``source`` into the
  variables at the same paths of ``target``, then marks ``target``'s
  quantizers uncalibrated so that its step sizes follow the new weights.

  Args:
    target: model to load into (modified in place), e.g. built with
      ``weight_bits=2``.
    source: a model with the same architecture (e.g. ``weight_bits=None``)
      or its ``nnx.state(model)`` (Variable leaves, so it can be filtered).

  Raises:
    TypeError: if ``target`` is not an ``nnx.Module``.
    ValueError: if ``source`` is not a module or state, holds nothing to
      copy, a copied path is missing in ``target`` or has another shape, or
      a weight of ``target`` is missing in ``source``. Nothing is copied then.
  """
  _check_model(target, "load_full_precision", "target")
  weights = nnx.All(nnx.Any(nnx.Param, nnx.BatchStat), nnx.Not(layers_lib.ActivationScale))
  if isinstance(source, nnx.Module):
    source = nnx.state(source, weights)
  elif isinstance(source, nnx.State):
    source = nnx.filter_state(source, weights)
  else:
    raise ValueError(
        f"source must be an nnx.Module or an nnx.State, got {type(source).__name__}."
    )
  src = nnx.to_flat_state(source)
  if not len(src):
    raise ValueError(
        "load_full_precision: source has no nnx.Param or nnx.BatchStat to copy "
        "(a pure state cannot be filtered; pass the model or nnx.state(model))."
    )
  dst = dict(nnx.to_flat_state(nnx.state(target)))
  for path, value in src:
    name = _path_name(path)
    if path not in dst:
      raise ValueError(
          f"load_full_precision: target has no variable at '{name}' (source and target "
          "must be the same architecture, e.g. both SmallCNN with the same width)."
      )
    src_shape = jnp.shape(value[...] if isinstance(value, nnx.Variable) else value)
    if src_shape != dst[path].shape:
      raise ValueError(
          f"load_full_precision: shape mismatch at '{name}': source "
          f"{src_shape}, target {dst[path].shape}."
      )
  # Every weight of target must come from source: a partial load would leave
  # some layers at their random initialisation without a word.
  src_paths = {path for path, _ in src}
  missing = sorted(
      _path_name(path) for path, _ in nnx.to_flat_state(nnx.state(target, weights))
      if path not in src_paths)
  if missing:
    shown = ", ".join(f"'{m}'" for m in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise ValueError(
        f"load_full_precision: source has no value for {len(missing)} weight(s) of "
        f"target: {shown}{more} (source and target must be the same architecture)."
    )
  nnx.update(target, nnx.as_pure(source))
  reset_calibration(target)
