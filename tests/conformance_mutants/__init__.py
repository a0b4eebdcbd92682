"""Deliberately broken adapters that the conformance suite must catch.

``mutants`` wraps the correct thread/process adapter or the example adapter, each
mutant breaking one promise in a few lines; ``tests/test_conformance_strength.py``
runs the suite test meant to catch each one and checks that it fails.
"""
