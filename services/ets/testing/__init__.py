"""Test and demo support that ships with the package: tiny local models, random frontiers,
scripted in-process upstreams for the search service (``upstreams``) and the development
orchestrator that starts and stops the whole CPU stack (``stack``: ``scripts/demo.sh``, the stack
tests, ``bench/stack.py``).

Used by the tests, the README's main job and the CPU compose profile, so it must not import
anything from outside the project at run time.
"""
