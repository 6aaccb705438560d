"""FoLoRA: foundation-preserving LoRA by a generalized Rayleigh quotient (METHODS.md, "FoLoRA").

``method.py``      options, the method (set-up, training hooks, export)
``basis.py``       the generalized eigenproblem, gates, damping schedule, change of basis
``layer.py``       ``FoloraLinear``: the adapted layer
``gated_adam.py``  ``GatedAdamW``: direction-wise gated Adam
``refresh.py``     refreshing the task covariance ``C_t`` during training
"""

from .method import Folora, FoloraOptions

__all__ = ["Folora", "FoloraOptions"]
