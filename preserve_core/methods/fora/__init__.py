"""FORA: function-space orthogonal residual adaptation (METHODS.md, "FORA").

``method.py``   options, the method (set-up, training hooks, export)
``bases.py``    rank selection, the bases ``Q`` / ``U_1`` and the projections
``layer.py``    ``ForaLinear``: the LoRA form's layer
``optim.py``    ``ProjectedAdamW``: the full form's projected optimizer
``refresh.py``  re-estimating ``Q`` on the current model during training
"""

from .method import Fora, ForaOptions

__all__ = ["Fora", "ForaOptions"]
