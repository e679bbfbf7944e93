"""The GPU dtype path on CPU: CUDA autocast's rules emulated (diffusion/training/autocast_rules.py)."""
import pytest
import torch
import torch.nn.functional as F

from diffusion.training.autocast_rules import cuda_autocast_rules

BF16, FP32 = torch.bfloat16, torch.float32


def _x(*shape):
    return torch.randn(*shape)


# (op, expected dtype under CUDA autocast with bf16 inputs where the op takes them)
CUDA_DTYPES = [
    ('softmax', lambda x: torch.softmax(x.bfloat16(), -1), FP32),
    ('Tensor.softmax', lambda x: x.bfloat16().softmax(-1), FP32),
    ('F.softmax', lambda x: F.softmax(x.bfloat16(), dim=-1), FP32),
    ('F.log_softmax', lambda x: F.log_softmax(x.bfloat16(), dim=-1), FP32),
    ('softmax dtype given', lambda x: torch.softmax(x.bfloat16(), -1, dtype=BF16), BF16),
    ('layer_norm', lambda x: F.layer_norm(x.bfloat16(), (8,)), FP32),
    ('LayerNorm module', lambda x: torch.nn.LayerNorm(8)(x.bfloat16()), FP32),
    ('group_norm', lambda x: F.group_norm(x.bfloat16().reshape(2, 4, 2, 2), 2), FP32),
    ('GroupNorm module', lambda x: torch.nn.GroupNorm(2, 4)(x.bfloat16().reshape(2, 4, 2, 2)), FP32),
    ('norm', lambda x: x.bfloat16().norm(dim=-1), FP32),
    ('normalize', lambda x: F.normalize(x.bfloat16(), dim=-1), FP32),
    ('sum', lambda x: x.bfloat16().sum(), FP32),
    ('sum of bools', lambda x: (x > 0).sum(), torch.int64),
    ('exp', lambda x: x.bfloat16().exp(), FP32),
    ('pow', lambda x: x.bfloat16() ** 2, FP32),
    ('mse_loss', lambda x: F.mse_loss(x.bfloat16(), x.bfloat16()), FP32),
    ('interpolate nearest', lambda x: F.interpolate(x.bfloat16().reshape(2, 4, 2, 2), scale_factor=2.0), FP32),
    ('linear', lambda x: F.linear(x, torch.randn(3, 8)), BF16),
    ('Linear module', lambda x: torch.nn.Linear(8, 3)(x), BF16),
    ('matmul', lambda x: x @ torch.randn(8, 3), BF16),
    ('einsum', lambda x: torch.einsum('ij,jk->ik', x, torch.randn(8, 3)), BF16),
    ('conv2d', lambda x: torch.nn.Conv2d(4, 2, 1)(x.reshape(2, 4, 2, 2)), BF16),
    ('sdpa', lambda x: F.scaled_dot_product_attention(*(x.reshape(1, 1, 4, 8),) * 3), BF16),
    ('gelu', lambda x: F.gelu(x.bfloat16()), BF16),
    ('mul fp32 x bf16', lambda x: x * x.bfloat16(), FP32),
    ('dot promotes', lambda x: torch.dot(x[0], x[1].bfloat16()), FP32),
]


@pytest.mark.parametrize('name,op,dtype', CUDA_DTYPES, ids=[c[0] for c in CUDA_DTYPES])
def test_ops_get_cuda_autocast_dtypes(name, op, dtype):
    with cuda_autocast_rules():
        assert op(_x(4, 8)).dtype == dtype


def test_plain_cpu_autocast_differs_where_the_rules_matter():
    """The cases the emulation exists for: CPU autocast keeps these in bf16, CUDA does not."""
    x = _x(2, 8).bfloat16()
    with torch.autocast('cpu', dtype=BF16):
        assert torch.softmax(x, -1).dtype == BF16
        assert F.layer_norm(x, (8,)).dtype == BF16
    with cuda_autocast_rules():
        assert torch.softmax(x, -1).dtype == FP32
        assert F.layer_norm(x, (8,)).dtype == FP32


def test_mismatches_of_the_gpu_path_raise():
    """index_add of an fp32 source into bf16 and index_copy (promoted by CPU autocast only) raise as on CUDA."""
    h = _x(4, 8)
    with cuda_autocast_rules():
        out = torch.nn.Linear(8, 8)(h)  # bf16
        gate = torch.softmax(_x(4, 1), 0)  # fp32
        with pytest.raises(RuntimeError, match='same scalar type'):
            torch.zeros_like(out).index_add(0, torch.arange(4), out * gate)
        with pytest.raises(RuntimeError):
            torch.zeros_like(out).index_copy(0, torch.arange(4), out.float())
        with pytest.raises(RuntimeError, match='unsafe to autocast'):
            F.binary_cross_entropy(torch.rand(3), torch.rand(3))


def test_rules_follow_the_autocast_state_and_keep_gradients():
    x = _x(2, 8).bfloat16().requires_grad_()
    with cuda_autocast_rules():
        with torch.autocast('cpu', enabled=False):
            assert torch.softmax(x, -1).dtype == BF16  # autocast off inside: untouched
        y = torch.softmax(x, -1)
    assert torch.softmax(x, -1).dtype == BF16  # mode gone after the block
    (y * torch.arange(8.0)).sum().backward()
    assert x.grad is not None and x.grad.dtype == BF16 and torch.isfinite(x.grad.float()).all()
    with cuda_autocast_rules(enter_autocast=False):
        assert torch.softmax(x, -1).dtype == BF16  # no autocast region: no rules
        with torch.autocast('cpu', dtype=BF16):
            assert torch.softmax(x, -1).dtype == FP32
