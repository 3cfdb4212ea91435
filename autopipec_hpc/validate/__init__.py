"""Validation of a staged potential as a materials scientist would judge it: equation of
state, cubic elastic constants, dimer curves, vacancy formation energy, hot MD stability;
a gate of typed tolerances; ``validation.json`` and ``validation.png``.

Core: it imports neither the scheduler nor the login side. ``settings`` is light (the
training config imports it); the rest needs numpy and ASE.
"""
