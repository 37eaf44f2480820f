"""ESDIRK (singly diagonally implicit) methods — filled in by the stiff-solver work."""
__all__: list = []
