"""talr_optax: transition rate scheduling for quantization-aware training in Optax.

The transition-adaptive learning rate (TALR) of Lee et al., "Scheduling Weight
Transitions for Quantization-Aware Training" (ICCV 2025), as an Optax
transformation, with the paper's quantizers, target schedules and ready
optimizers (SGDT, AdamT, AdamWT), and the oscillation remedies of Nagel et al.
(ICML 2022) users compare it with: dampening and iterative freezing. Flax NNX layers live in ``talr_optax.nnx``.
"""

from talr_optax.annealing import delayed_cosine_schedule
from talr_optax.checkpoints import check_restorable
from talr_optax.counting import count_transitions
from talr_optax.dampening import DampenOscillationsState, dampen_oscillations
from talr_optax.freezing import FreezeOscillationsState, freeze_oscillations
from talr_optax.metrics import metrics
from talr_optax.optimizers import adamt, adamwt, sgdt
from talr_optax.oscillations import TrackOscillationsState, track_oscillations
from talr_optax.quantizers import (
    activation_levels,
    distance_to_transition,
    fake_quant_activation,
    fake_quant_weight,
    initial_activation_scale,
    centers_fn_from_scales,
    initial_weight_scale,
    level_values,
    levels_fn_from_scales,
    weight_centers,
    weight_levels,
)
from talr_optax.schedules import (TargetSchedule, cosine_target, ema_momentum_for, initial_target,
                                  measured_target)
from talr_optax.transform import (
    RateNames,
    ScaleByTALRState,
    TrackTransitionsState,
    scale_by_talr,
    track_transitions,
)

__version__ = "0.1.0"

__all__ = [
    "DampenOscillationsState",
    "FreezeOscillationsState",
    "RateNames",
    "ScaleByTALRState",
    "TrackOscillationsState",
    "TargetSchedule",
    "TrackTransitionsState",
    "activation_levels",
    "adamt",
    "adamwt",
    "check_restorable",
    "centers_fn_from_scales",
    "cosine_target",
    "count_transitions",
    "dampen_oscillations",
    "delayed_cosine_schedule",
    "distance_to_transition",
    "ema_momentum_for",
    "fake_quant_activation",
    "fake_quant_weight",
    "freeze_oscillations",
    "initial_activation_scale",
    "initial_target",
    "initial_weight_scale",
    "level_values",
    "levels_fn_from_scales",
    "measured_target",
    "metrics",
    "scale_by_talr",
    "sgdt",
    "track_oscillations",
    "track_transitions",
    "weight_centers",
    "weight_levels",
]
