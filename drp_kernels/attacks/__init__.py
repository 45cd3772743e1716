"""Attack engine (issue 5): PROVISIONAL, empty until the attacks land."""
__all__ = []
