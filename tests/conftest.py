import pytest

import probe


@pytest.fixture(scope="session")
def tiny():
    return probe.load("tiny")


@pytest.fixture(scope="session")
def tiny_xl():
    return probe.load("tiny-xl")
