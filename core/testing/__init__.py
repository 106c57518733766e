"""Test helpers for meshagent and its plugins: the kvstore contract suite and pytest fixtures.

Installed as the pytest plugin ``meshagent`` (entry point ``pytest11``), so a third-party
plugin's tests get the fixtures without a conftest.
"""
