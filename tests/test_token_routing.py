"""TREAD token routing in MicroDiT: routed tokens rejoin unchanged, routing 0 and evaluation are the plain model bit
for bit, every token's input gets a gradient, it composes with masking, the patch-mixer and the MoE, and the
forward FLOPs fall with the routing ratio (counted with torch.utils.flop_counter)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion.models.microdit import build_microdit
from diffusion.models.token_routing import TreadConfig, rejoin_tokens, route_tokens, run_blocks, tread_config
from test_microdit import SMALL, _inputs, _mini

ROUTE = {'ratio': 0.5, 'start': 1, 'end': 5}  # mini has 6 blocks: blocks 1..4 are skipped by the routed tokens


def test_route_and_rejoin_are_inverse_and_keep_order():
    x = torch.randn(3, 10, 5, generator=torch.Generator().manual_seed(0))
    kept, route = route_tokens(x, 0.3, generator=torch.Generator().manual_seed(1))
    assert kept.shape == (3, 7, 5) and (route.ids_kept.diff(dim=1) > 0).all()  # 3 routed, kept in token order
    assert torch.equal(rejoin_tokens(kept, route), x)
    changed = rejoin_tokens(kept + 1, route)
    moved = (changed != x).all(dim=-1)  # (3, 10): exactly the kept tokens changed
    assert moved.sum(dim=1).tolist() == [7, 7, 7] and torch.equal(moved.nonzero()[:, 1].view(3, 7), route.ids_kept)


def test_config_is_checked():
    assert tread_config(None, 6) is None
    assert tread_config(ROUTE, 6) == TreadConfig(0.5, 1, 5)
    for bad, match in (({'ratio': 1.0, 'start': 1, 'end': 5}, 'ratio'), ({'ratio': 0.5, 'start': 4, 'end': 4}, 'start'),
                       ({'ratio': 0.5, 'start': 0, 'end': 7}, 'depth'), ({'ratio': 0.5, 'start': 0}, 'keys')):
        with pytest.raises(ValueError, match=match):
            tread_config(bad, 6)
    with pytest.raises(ValueError, match='depth'):
        build_microdit('microdit-mini', **SMALL, tread={'ratio': 0.5, 'start': 2, 'end': 9})


@pytest.mark.parametrize('mixer', [True, False])
def test_routed_tokens_rejoin_unchanged_at_the_range_end(mixer):
    model = _mini(use_patch_mixer=mixer, tread=ROUTE).train()
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__('before', out.detach().clone()))
    model.blocks[5].register_forward_pre_hook(lambda m, a: seen.__setitem__('after', a[0].detach().clone()))
    x, t, cond = _inputs()
    model(x, t, **cond)
    assert seen['before'].shape == seen['after'].shape == (2, 16, 64)  # no token lost
    same = (seen['before'] == seen['after']).all(dim=-1)  # (N, T): the routed tokens, bit for bit
    assert same.sum(dim=1).tolist() == [8, 8]  # int(16 * 0.5) routed per sample, the other 8 went through
    differs = (seen['before'] != seen['after']).all(dim=-1)
    assert torch.equal(differs, ~same)  # every kept token was changed by the blocks in the range


@pytest.mark.parametrize('mixer', [True, False])
def test_ratio_zero_and_eval_mode_are_the_plain_model_exactly(mixer):
    x, t, cond = _inputs()
    plain = _mini(use_patch_mixer=mixer).train()
    reference = plain(x, t, **cond)
    zero = _mini(use_patch_mixer=mixer, tread={**ROUTE, 'ratio': 0.0}).train()
    torch.testing.assert_close(zero(x, t, **cond), reference, rtol=0, atol=0)
    routed = _mini(use_patch_mixer=mixer, tread=ROUTE)
    assert not torch.equal(routed.train()(x, t, **cond), reference)  # training routes ...
    torch.testing.assert_close(routed.eval()(x, t, **cond), plain.eval()(x, t, **cond), rtol=0, atol=0)  # eval not


@pytest.mark.parametrize('mixer', [True, False])
def test_gradients_reach_every_token_input(mixer):
    model = _mini(use_patch_mixer=mixer, tread={'ratio': 0.75, 'start': 0, 'end': 6}).train()  # even all blocks
    x, t, cond = _inputs()
    x.requires_grad_(True)
    out = model(x, t, **cond)
    (out**2).sum().backward()
    per_patch = x.grad.abs().unfold(2, 2, 2).unfold(3, 2, 2).sum(dim=(1, 4, 5))  # (N, 4, 4): one per token
    assert (per_patch > 0).all()
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_composes_with_masking_and_moe():
    model = _mini(tread=ROUTE, mask_ratio=0.5).train()
    assert any(type(b.mlp).__name__ == 'ExpertChoiceMoE' for b in model.blocks[1:5])  # MoE blocks in the range
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__('range', a[0].shape))
    model.blocks[5].register_forward_pre_hook(lambda m, a: seen.__setitem__('after', a[0].shape))
    x, t, cond = _inputs()
    out, mask = model(x, t, **cond, return_mask=True)
    assert seen == {'range': (2, 4, 64), 'after': (2, 8, 64)}  # 16 tokens, masking keeps 8, routing sends 4 on
    removed = mask.bool().unsqueeze(1).expand_as(out)
    assert (out[removed] == 0).all() and (out[~removed] != 0).all()
    (out**2).sum().backward()
    assert model.blocks[3].mlp.w1.grad.abs().sum() > 0  # the experts in the range learn


def test_run_blocks_plain_loop_without_routing():
    blocks = [torch.nn.Linear(3, 3) for _ in range(3)]
    x = torch.randn(2, 5, 3)
    expected = blocks[2](blocks[1](blocks[0](x)))
    for routing in (None, TreadConfig(0.0, 0, 3)):
        assert torch.equal(run_blocks(blocks, x, lambda b, h: b(h), routing), expected)


def _forward_flops(model, inputs) -> int:
    x, t, cond = inputs
    with FlopCounterMode(display=False) as counter:
        model(x, t, **cond)
    return counter.get_total_flops()


def test_flops_fall_with_the_routing_ratio():
    """Forward FLOPs of the mini model at 32 x 32 latents (256 tokens), routing blocks 1..4 of 6."""
    inputs = _inputs(size=32)
    flops = {}
    for ratio in (0.0, 0.5, 0.75):
        model = _mini(tread={**ROUTE, 'ratio': ratio}, sample_size=32).train()
        flops[ratio] = _forward_flops(model, inputs)
    half, quarter = flops[0.5] / flops[0.0], flops[0.75] / flops[0.0]
    print(f'TREAD forward FLOP ratios (mini, 256 tokens, blocks 1-4 of 6 routed): 0.5 -> {half:.3f}, '
          f'0.75 -> {quarter:.3f}')
    # The routed range's blocks cost ~(1 - ratio) of theirs (attention less), the rest of the model is unchanged.
    range_share = 1 - _range_free_share(inputs)
    assert quarter < half < 1.0
    assert half == pytest.approx(1 - 0.5 * range_share, abs=0.03)
    assert quarter == pytest.approx(1 - 0.75 * range_share, abs=0.03)
    assert _forward_flops(_mini(tread=ROUTE, sample_size=32).eval(), inputs) == flops[0.0]  # eval is unrouted


def _range_free_share(inputs) -> float:
    """Share of the plain model's forward FLOPs outside blocks 1..4 (measured by emptying the range)."""
    model = _mini(sample_size=32).train()
    total = _forward_flops(model, inputs)
    model.blocks = torch.nn.ModuleList([model.blocks[0], model.blocks[5]])
    return _forward_flops(model, inputs) / total
