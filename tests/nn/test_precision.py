"""Tests of `pes_calc.nn.precision.float64_construction`: float64 where torch's
default floating dtype would apply, the same random draws, this thread only."""

import threading

import pytest
import torch
from torch import nn

from pes_calc.nn.precision import float64_construction


@pytest.fixture(autouse=True)
def float32_default():
    assert torch.get_default_dtype() == torch.float32
    with torch.random.fork_rng(devices=[]):  # the tests reseed the global RNG
        yield
    assert torch.get_default_dtype() == torch.float32


def test_factories_without_dtype_give_float64():
    with float64_construction():
        tensors = {
            "zeros": torch.zeros(2),
            "ones": torch.ones(2, 2),
            "randn": torch.randn(2),
            "rand": torch.rand(2),
            "empty": torch.empty(0),
            "eye": torch.eye(2),
            "linspace": torch.linspace(0, 1, 3),
            "full": torch.full((2,), 1.5),
            "arange": torch.arange(0.0, 1.0, 0.5),
        }
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float64, name
    assert tensors["empty"].shape == (0,)
    assert tensors["linspace"].tolist() == [0.0, 0.5, 1.0]


def test_data_factories_give_float64_for_floats():
    with float64_construction():
        value = torch.tensor([0.1])
        as_tensor = torch.as_tensor([1.0, 2.0])
    assert value.dtype == torch.float64 and as_tensor.dtype == torch.float64
    # the float64 nearest 0.1, not float32's 0.100000001490116...
    assert value.item() == 0.1


def test_default_dtype_named_explicitly_gives_float64():
    x = [1.0, 2.0]
    base = torch.ones(2)
    with float64_construction():
        explicit = torch.tensor(x, dtype=torch.get_default_dtype())
        zeros = torch.zeros(3, dtype=torch.get_default_dtype())
        converted = base.to(torch.get_default_dtype())
        converted_keyword = base.to(dtype=torch.get_default_dtype())
    assert explicit.dtype == torch.float64
    assert zeros.dtype == torch.float64
    assert converted.dtype == torch.float64
    assert converted_keyword.dtype == torch.float64
    assert explicit.tolist() == [1.0, 2.0]


def test_other_dtypes_are_kept():
    with float64_construction():
        integers = torch.tensor([1, 2])
        indices = torch.arange(3)
        half = torch.zeros(2, dtype=torch.float16)
        flags = torch.tensor([True])
        bfloat = torch.ones(2).to(torch.bfloat16)
    assert integers.dtype == torch.int64
    assert indices.dtype == torch.int64
    assert half.dtype == torch.float16
    assert flags.dtype == torch.bool
    assert bfloat.dtype == torch.bfloat16


def test_default_dtype_unchanged_inside_and_after():
    with float64_construction():
        assert torch.get_default_dtype() == torch.float32
    assert torch.get_default_dtype() == torch.float32
    assert torch.zeros(2).dtype == torch.float32
    assert torch.tensor([1.0]).dtype == torch.float32


def test_same_random_draws_as_a_float64_default():
    torch.manual_seed(11)
    with float64_construction():
        inside = torch.randn(3)
        inside_rand = torch.rand(4)
    torch.manual_seed(11)
    expected = torch.randn(3, dtype=torch.float64)
    expected_rand = torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    torch.testing.assert_close(inside_rand, expected_rand, rtol=0, atol=0)
    # not float32 draws cast up: those would have float32's precision only
    torch.manual_seed(11)
    single = torch.randn(3)
    assert not torch.equal(inside, single.double())


def test_modules_built_inside_have_float64_parameters():
    torch.manual_seed(5)
    with float64_construction():
        linear = nn.Linear(3, 2)
        norm = nn.LayerNorm(4)
    assert linear.weight.dtype == torch.float64
    assert linear.bias.dtype == torch.float64
    assert norm.weight.dtype == torch.float64
    torch.manual_seed(5)
    expected = nn.Linear(3, 2, dtype=torch.float64)
    torch.testing.assert_close(linear.weight, expected.weight, rtol=0, atol=0)
    torch.testing.assert_close(linear.bias, expected.bias, rtol=0, atol=0)
    # built outside, the same module is float32
    assert nn.Linear(3, 2).weight.dtype == torch.float32


def test_other_threads_are_not_affected():
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        inside.wait(timeout=10)
        seen["zeros"] = torch.zeros(2).dtype
        seen["tensor"] = torch.tensor([1.0]).dtype
        seen["linear"] = nn.Linear(2, 2).weight.dtype
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with float64_construction():
        inside.set()
        assert done.wait(timeout=10)
        here = torch.zeros(2).dtype
    thread.join(timeout=10)
    assert here == torch.float64
    assert seen == {
        "zeros": torch.float32,
        "tensor": torch.float32,
        "linear": torch.float32,
    }


def test_nested_blocks():
    with float64_construction():
        with float64_construction():
            assert torch.zeros(1).dtype == torch.float64
        assert torch.zeros(1).dtype == torch.float64
    assert torch.zeros(1).dtype == torch.float32


def test_float64_default_passes_through():
    torch.set_default_dtype(torch.float64)
    try:
        with float64_construction():
            assert torch.zeros(1).dtype == torch.float64
            assert torch.zeros(1, dtype=torch.float32).dtype == torch.float32
    finally:
        torch.set_default_dtype(torch.float32)
