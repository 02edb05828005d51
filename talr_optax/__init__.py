"""talr_optax: transition rate scheduling for quantization-aware training in Optax.

The transition-adaptive learning rate (TALR) of Lee et al., "Scheduling Weight
Transitions for Quantization-Aware Training" (ICCV 2025), as an Optax
transformation, with the paper's quantizers, target schedules and ready
optimizers (SGDT, AdamT, AdamWT). Flax NNX layers live in ``talr_optax.nnx``.
"""

from talr_optax.checkpoints import check_restorable
from talr_optax.counting import count_transitions
from talr_optax.metrics import metrics
from talr_optax.optimizers import adamt, adamwt, sgdt
from talr_optax.oscillations import TrackOscillationsState, track_oscillations
from talr_optax.quantizers import (
    activation_levels,
    distance_to_transition,
    fake_quant_activation,
    fake_quant_weight,
    initial_activation_scale,
    initial_weight_scale,
    levels_fn_from_scales,
    weight_levels,
)
from talr_optax.schedules import cosine_target, initial_target
from talr_optax.transform import (
    RateNames,
    ScaleByTALRState,
    TrackTransitionsState,
    scale_by_talr,
    track_transitions,
)

__version__ = "0.1.0"

__all__ = [
    "RateNames",
    "ScaleByTALRState",
    "TrackOscillationsState",
    "TrackTransitionsState",
    "activation_levels",
    "adamt",
    "adamwt",
    "check_restorable",
    "cosine_target",
    "count_transitions",
    "distance_to_transition",
    "fake_quant_activation",
    "fake_quant_weight",
    "initial_activation_scale",
    "initial_target",
    "initial_weight_scale",
    "levels_fn_from_scales",
    "metrics",
    "scale_by_talr",
    "sgdt",
    "track_oscillations",
    "track_transitions",
    "weight_levels",
]
