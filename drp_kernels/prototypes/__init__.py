"""Class prototypes far apart from each other: generation, the hypercube search, separation, files.

* ``generation.py``: ``repulsive_prototypes`` and its methods ("box", "sphere", "paper"; "default"
  picks one per metric), the repulsion energies they minimise;
* ``hypercube.py``: the +-1 corner codes of method "hypercube";
* ``separation.py``: ``separation``, how far apart a set is against the known optima;
* ``files.py``: ``save_prototypes`` / ``load_prototypes``, which record the metric and method.
"""
from .._constants import METRICS
from .files import load_prototypes, save_prototypes
from .generation import PROTOTYPE_METHODS, repulsive_prototypes
from .separation import separation

#: The name ``drp_kernels.prototypes`` gave ``PROTOTYPE_METHODS`` when it was one module (kept working).
METHODS = PROTOTYPE_METHODS

__all__ = ["PROTOTYPE_METHODS", "METHODS", "METRICS", "repulsive_prototypes", "separation", "save_prototypes",
           "load_prototypes"]
