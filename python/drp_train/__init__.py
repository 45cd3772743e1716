"""drp_train: the thin training layer over drp_kernels' public API."""
__all__ = []
