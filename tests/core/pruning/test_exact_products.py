import pytest
import torch

from core.pruning.exact_products import exact_fp32_products, reduced_mode
from core.pruning.methods.sparsegpt import Hessian

CPU = torch.device("cpu")
BF16_UNITS = reduced_mode(torch.bfloat16, CPU) is not None


def _hessian_error(source: torch.dtype) -> float:
    """Relative error of the accumulated H against the float64 definition, for inputs of dtype `source`."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 64, 300, generator=g) * 3).to(source)  # 4 sequences, in_features 300
    h = Hessian(300, CPU)
    h.add_batch(x[:3])
    h.add_batch(x[3:])
    flat = x.reshape(-1, 300).double()
    ref = 2 / 4 * flat.t() @ flat
    return ((h.matrix.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
def test_hessian_of_narrow_activations_is_as_exact_as_float32(source):
    # a lossy reduced mode (e.g. fp16 values rounded to bf16) would give ~1e-3 here
    assert _hessian_error(source) < 1e-6


def test_only_formats_that_hold_the_inputs_exactly_get_a_reduced_mode():
    assert reduced_mode(torch.float32, CPU) is None
    assert reduced_mode(torch.float16, CPU) is None  # 10-bit significands do not fit bf16's 8
    cuda = torch.device("cuda")
    assert reduced_mode(torch.float32, cuda) is None
    assert reduced_mode(torch.float16, cuda)[1] == "tf32"
    assert reduced_mode(torch.bfloat16, cuda)[1] == "tf32"


def test_the_process_wide_flag_is_restored_even_after_an_error():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(ValueError):
        with exact_fp32_products(torch.bfloat16, CPU):
            raise ValueError
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.skipif(
    not BF16_UNITS,
    reason="oneDNN keeps full float32 products on this CPU (no AMX, or AVX512-BF16 alone): the float32 path is used",
)
def test_bf16_units_are_used_for_bf16_inputs_where_the_cpu_has_them():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    exact = a @ b
    with exact_fp32_products(torch.bfloat16, CPU) as on:
        reduced = a @ b  # float32 values that bf16 does not hold: the mode shows as rounding
    assert on
    assert not torch.allclose(reduced, exact, rtol=1e-5, atol=1e-5)
    assert torch.allclose(reduced, a.bfloat16().float() @ b.bfloat16().float(), rtol=1e-4, atol=1e-3)
