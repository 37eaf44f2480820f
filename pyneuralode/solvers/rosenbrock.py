"""Rosenbrock (linearly implicit) methods — filled in by the stiff-solver work."""
__all__: list = []
