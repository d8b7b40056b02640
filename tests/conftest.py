import pytest

import probe


@pytest.fixture(scope="session")
def tiny():
    return probe.load("tiny")


@pytest.fixture(scope="session")
def tiny_xl():
    return probe.load("tiny-xl")


@pytest.fixture
def one_thread():
    """Tiny tensors: extra intra-op threads only add contention (gradcheck is far slower on a busy 2-core box)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_left():
    """The tiny pipeline with left padding: the prompt's tokens sit at the end of the encoder's sequence."""
    pipe = probe.load("tiny")
    pipe.tokenizer.padding_side = "left"
    return pipe
