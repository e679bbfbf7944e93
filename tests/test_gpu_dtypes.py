"""The GPU path on CPU: CUDA autocast's dtype rules emulated (diffusion/training/autocast_rules.py), the MoE under
them, and training steps that never wait on the device (no host syncs, no host-to-device copies per step)."""
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

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


# --------------------------------------------------------------------------------------------- MoE in bf16


def test_gpu_autocast_queries_see_cpu_autocast_inside_the_block():
    """composer's low_precision_layernorm/groupnorm ask torch.is_autocast_enabled() (CUDA's): inside the block
    they run in bf16 as on a GPU."""
    from composer.algorithms.low_precision_groupnorm.low_precision_groupnorm import LPGroupNorm
    from composer.algorithms.low_precision_layernorm.low_precision_layernorm import LPLayerNorm
    norm = LPLayerNorm(8)
    assert not torch.is_autocast_enabled()
    with cuda_autocast_rules():
        assert torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == BF16
        assert norm(_x(2, 8)).dtype == BF16 and LPGroupNorm(2, 4)(_x(2, 4, 3)).dtype == BF16
        assert torch.nn.LayerNorm(8)(_x(2, 8)).dtype == FP32
        with torch.autocast('cpu', enabled=False):
            assert not torch.is_autocast_enabled() and norm(_x(2, 8)).dtype == FP32
    assert not torch.is_autocast_enabled() and norm(_x(2, 8)).dtype == FP32


def _microdit_recipe_backbone(mask_ratio):
    """MicroDiT at test width with the recipes' low_precision_layernorm applied to it (composer's surgery)."""
    from composer.algorithms.low_precision_layernorm import apply_low_precision_layernorm
    from composer.core import Precision

    from diffusion.models.microdit import build_microdit
    torch.manual_seed(0)
    model = build_microdit('microdit-mini', dim=64, head_dim=16, multiple_of=32, patch_mixer_dim=32, sample_size=8,
                           cross_attention_dim=32, mask_ratio=mask_ratio)
    with torch.no_grad():  # the zero-initialised output layers would leave the experts without gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    apply_low_precision_layernorm(model, Precision.AMP_BF16)
    return model.train()


@pytest.mark.parametrize('mask_ratio', [0.0, 0.75])
def test_microdit_moe_trains_under_cuda_bf16_autocast(mask_ratio):
    """Finding 4: with the router softmax in fp32 (CUDA) and the block in bf16 (low-precision LayerNorm), the MoE
    combined an fp32 gated output into a bf16 buffer and raised. Forward + backward now run; every expert gets a
    finite gradient and the MoE output keeps its input's dtype."""
    from diffusion.models.layers import ExpertChoiceMoE
    model = _microdit_recipe_backbone(mask_ratio)
    moes = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    seen = []
    for moe in moes:
        moe.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    g = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, generator=g), torch.randn(2, 7, 32, generator=g)
    with cuda_autocast_rules():
        out, _ = model(x, t, text_hidden=text, return_mask=True)
        loss = out.float().square().mean()
    loss.backward()
    assert seen and all(dtype_in == dtype_out == BF16 for dtype_in, dtype_out in seen)
    assert torch.isfinite(loss)
    for moe in moes:
        for p in moe.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_moe_keeps_fp32_numbers_and_sums_gated_outputs_in_fp32():
    """In fp32 the output is bit-identical to summing each expert's gated output; with an fp32 router and bf16
    tokens it is the fp32 sum rounded once to bf16."""
    from diffusion.models.layers import ExpertChoiceMoE
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(16, 32, num_experts=4, capacity=2.0)
    moe.init_weights(0.02)
    x = torch.randn(2, 8, 16)
    g, idx = moe.route(x)
    ref = torch.zeros_like(x)
    for n in range(2):
        for e in range(4):
            h = torch.nn.functional.gelu(x[n, idx[n, e]] @ moe.w1[e]) @ moe.w2[e]
            ref[n].index_add_(0, idx[n, e], h * g[n, e, :, None])
    torch.testing.assert_close(moe(x), ref, rtol=1e-6, atol=1e-7)
    with cuda_autocast_rules():
        out = moe(x.bfloat16())
    assert out.dtype == BF16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-3)


# --------------------------------------------------------------------------------------------- host syncs per step

aten = torch.ops.aten
# Ops whose result is read on the host or whose output shape depends on the data: each waits for the device.
_READS = {aten._local_scalar_dense.default: '.item() / bool() / int() / float()', aten.nonzero.default: 'nonzero',
          aten.masked_select.default: 'masked_select', aten.unique_dim.default: 'unique',
          aten._unique2.default: 'unique', aten.repeat_interleave.Tensor: 'repeat_interleave(Tensor)',
          aten.equal.default: 'torch.equal'}


class DeviceWaits(TorchDispatchMode):
    """Records every op of a step on the ``meta`` device that a GPU would make the host wait for: reads of values
    (``.item()``, ``bool()``, ``.tolist()``...), data-dependent shapes, boolean-mask indexing, and copies between
    the host and the device. Meta tensors have no values, so each read gets a stand-in (1) and the step goes on:
    one run lists them all, with the line of this project's code that asked."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def _record(self, what):
        stack = [f'{f.filename.rsplit("/diffusion/", 1)[-1]}:{f.lineno}' for f in traceback.extract_stack()
                 if '/diffusion/' in f.filename and '/site-packages/' not in f.filename]
        self.waits.append(f'{what} at {stack[-1] if stack else "?"}')

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self._record(_READS[func])
            if func is aten._local_scalar_dense.default:
                return True if args[0].dtype == torch.bool else 1
            if func is aten.nonzero.default:
                return torch.zeros(0, args[0].dim(), dtype=torch.long, device=args[0].device)
        masks = [i for i in args[1] if i is not None and i.dtype in (torch.bool, torch.uint8)] \
            if func is aten.index.Tensor else []
        if masks:
            self._record('boolean-mask indexing')
            return args[0].new_empty((0, *args[0].shape[masks[0].dim():]))
        if func in (aten._to_copy.default, aten.copy_.default):
            src, dst = (args[1], args[0].device) if func is aten.copy_.default else \
                (args[0], torch.device(kwargs.get('device') or args[0].device))
            if src.device != dst and src.dim() > 0:
                self._record(f'copy {src.device} -> {dst} of {tuple(src.shape)}')
                if dst.type == 'cpu':
                    return torch.zeros(src.shape, dtype=kwargs.get('dtype') or src.dtype)
        return func(*args, **kwargs)


def _step_waits(model, batch):
    """Device waits of the second training step (model forward, loss, backward) on ``meta``; the first may cache."""
    model = model.train().to('meta')
    batch = {k: v.to('meta') if torch.is_tensor(v) else v for k, v in batch.items()}
    for step in range(2):
        with DeviceWaits() as recorder:
            model.loss(model(batch), batch).backward()
    return recorder.waits


def test_unet_step_never_waits_on_the_device():
    """Caption dropout (empty caption from the text encoder), DDPM v-prediction with min-SNR weights: no host
    read, no host-to-device copy in the step (was: bool(dropped.any()), the alpha-bar table copied twice)."""
    from diffusion.models.latent_diffusion import build_latent_diffusion
    torch.manual_seed(0)
    model = build_latent_diffusion(
        autoencoder={'name': 'autoencoder_kl', 'config': 'tiny'}, text_encoder={'name': 'minilm'},
        backbone={'name': 'unet', 'preset': 'mini-s', 'sample_size': 8},
        noise_schedule={'name': 'ddpm', 'prediction_type': 'v_prediction', 'loss_weighting': 'min_snr'})
    batch = {'latents': torch.randn(2, 4, 8, 8), 'text_hidden': torch.randn(2, 77, 384),
             'text_mask': torch.ones(2, 77, dtype=torch.long), 'caption_dropped': torch.tensor([True, False])}
    waits = _step_waits(model, batch)
    assert not waits, 'the step waits on the device:\n' + '\n'.join(waits)


def test_microdit_step_never_waits_on_the_device(tmp_path):
    """Masked MicroDiT with MoE, EDM, caption dropout with a stored empty caption: no host read, no copy (was:
    bool(dropped.any()), the empty caption copied from the host, the MoE's int(take.sum(...).max()))."""
    from safetensors.torch import save_file

    from diffusion.models.latent_diffusion import LatentDiffusion
    from diffusion.models.microdit import build_microdit
    from diffusion.schedules import EDMSchedule
    save_file({'text_hidden': torch.zeros(7, 32), 'text_mask': torch.ones(7, dtype=torch.long)}, tmp_path / 'e.st')
    torch.manual_seed(0)
    backbone = build_microdit('microdit-mini', dim=64, head_dim=16, multiple_of=32, patch_mixer_dim=32,
                              sample_size=8, cross_attention_dim=32, mask_ratio=0.75)
    assert backbone.skip_dropped_experts
    model = LatentDiffusion(backbone, EDMSchedule(sigma_data=0.9), scaling_factor=1.0, use_text_mask=True,
                            empty_caption_path=str(tmp_path / 'e.st'))
    batch = {'latents': torch.randn(2, 4, 8, 8), 'text_hidden': torch.randn(2, 7, 32),
             'text_mask': torch.ones(2, 7, dtype=torch.long), 'caption_dropped': torch.tensor([True, False])}
    waits = _step_waits(model, batch)
    assert not waits, 'the step waits on the device:\n' + '\n'.join(waits)


def test_the_recorder_sees_each_kind_of_wait():
    x = torch.ones(4, device='meta')
    with DeviceWaits() as recorder:
        bool(x.any()), x.sum().item(), int(x.max()), x.tolist(), x[x > 0], x.nonzero()
        x + torch.arange(4).to('meta')
    kinds = ' '.join(recorder.waits)
    assert kinds.count('.item()') == 3 and 'copy meta -> cpu' in kinds and 'boolean-mask' in kinds
    assert 'nonzero' in kinds and 'copy cpu -> meta' in kinds
