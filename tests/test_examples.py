"""The documented examples run: the API docstring (`dcfx example`: test_cli.py)."""

import doctest

import dcfx.api


def test_api_docstring_examples():
    result = doctest.testmod(dcfx.api)
    assert result.attempted > 0 and result.failed == 0
