"""Shared test helpers (plain functions and constants; fixtures live in conftest.py):

- ``golden``: where the golden sets from the official code are (tests/golden and $ONEREF_GOLDEN);
- ``compose``: the real Hydra config composed as the CLI does, shrunk for a 2-core CPU;
- ``cli``: running an entry point in a subprocess with the environment a test needs;
- ``models``: the tiny model every test builds.
"""
