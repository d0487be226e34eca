"""Test and demo support that ships with the package: tiny local models, random frontiers, and
scripted in-process upstreams for the search service (``upstreams``).

Used by the tests, the README's main job and the CPU compose profile, so it must not import
anything from outside the project at run time.
"""
