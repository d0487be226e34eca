"""Test and demo support that ships with the package: tiny local models and process fixtures.

Used by the tests, the README's main job and the CPU compose profile, so it must not import
anything from outside the project at run time.
"""
