"""The Hessian of a :class:`landscape.Loss` in any space: one operator (:mod:`.operator`, a scipy
``LinearOperator`` whose products come from a backend of :mod:`.products`) that every algorithm
consumes — top eigenvalues (:mod:`.spectrum`), trace (:mod:`.trace`), spectral density
(:mod:`.density`), the dense matrix (:mod:`.dense`) — plus the linear-algebra helpers (:mod:`.linalg`)
and the attention switch for double backward (:mod:`.attention`). Imports :mod:`landscape`, never
:mod:`landscape.study`."""
from .attention import AttentionError
from .dense import dense_hessian, dense_matrix
from .density import HessianDensity, hessian_density
from .operator import HessianError, HessianOperator
from .spectrum import HessianEigenvalues, hessian_eigenvalues
from .trace import TraceEstimate, hessian_trace

__all__ = ["AttentionError", "dense_hessian", "dense_matrix", "HessianDensity", "hessian_density", "HessianError",
           "HessianOperator", "HessianEigenvalues", "hessian_eigenvalues", "TraceEstimate", "hessian_trace"]
