"""Token merging: the random 2x2 partition, merge and unmerge, ratio 0 is exact, and only the self-attentions at the
finest attention level see fewer tokens."""
import pytest
import torch

from ldm.errors import UserError
from ldm.modules.speedups import TokenMerging, approximated
from ldm.modules.speedups.tome import bipartite_matching, random_dst_mask
from tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 77, 32, generator=g)


def test_one_dst_token_per_2x2_patch_and_none_in_a_leftover_row():
    mask = random_dst_mask(5, 6, torch.Generator().manual_seed(0)).view(5, 6)
    patches = mask[:4].reshape(2, 2, 3, 2).sum(dim=(1, 3))   # [2 patch rows, 3 patch columns]
    assert torch.equal(patches, torch.ones(2, 3, dtype=torch.long))
    assert not mask[4].any()
    again = random_dst_mask(5, 6, torch.Generator().manual_seed(0)).view(5, 6)
    other = random_dst_mask(5, 6, torch.Generator().manual_seed(1)).view(5, 6)
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_unmerge_inverts_merge_for_the_tokens_not_merged():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 8, generator=g)
    merge = bipartite_matching(x, 12, random_dst_mask(6, 6, g))
    merged = merge.merge(x)
    assert merged.shape == (2, 36 - 12, 8)
    back = merge.unmerge(merged)
    assert back.shape == x.shape
    for b in range(2):
        moved = set(merge.src[merge.merged[b]].tolist())
        receiving = set(merge.dst[merge.into[b]].tolist())
        untouched = [i for i in range(36) if i not in moved | receiving]
        assert torch.equal(back[b, untouched], x[b, untouched])
        # a receiving dst token is the mean of itself and what merged into it; a merged token takes that value
        for position, token in enumerate(merge.src[merge.merged[b]].tolist()):
            dst_position = merge.into[b, position]
            sources = merge.src[merge.merged[b][merge.into[b] == dst_position]]
            group = [merge.dst[dst_position].item(), *sources.tolist()]
            torch.testing.assert_close(back[b, token], x[b, group].mean(dim=0))


def test_the_most_similar_tokens_merge_first():
    # two src tokens equal to a dst token, every other token random: those two merge when r = 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, generator=g)
    mask = random_dst_mask(4, 4, g)
    dst, src = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
    x[0, src[3]] = x[0, dst[1]]
    x[0, src[7]] = 2 * x[0, dst[2]]   # same direction: cosine similarity 1
    merge = bipartite_matching(x, 2, mask)
    assert sorted(merge.merged[0].tolist()) == [3, 7]
    assert sorted(merge.into[0].tolist()) == [1, 2]


def test_ratio_0_is_exact_and_a_ratio_changes_the_output_but_not_its_shape(model):
    unet = model.model.diffusion_model
    x, t, context = unet_inputs()
    with torch.no_grad():
        exact = unet(x, t, context=context)
        off = TokenMerging(unet, 0.0).attach()
        try:
            assert torch.equal(unet(x, t, context=context), exact)
        finally:
            off.remove()
        with approximated(model, tome=0.5):
            merged = unet(x, t, context=context)
        assert merged.shape == exact.shape and not torch.equal(merged, exact)
        assert torch.equal(unet(x, t, context=context), exact)
    assert all("forward" not in vars(m) for m in unet.modules())
    assert not unet._forward_pre_hooks


def test_only_self_attention_at_the_finest_level_sees_fewer_tokens(model):
    """The tiny U-Net attends at 8x8 (64 tokens) and 4x4 (16): only the 8x8 self-attentions merge."""
    unet = model.model.diffusion_model
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, set()).add(args[0].shape[1])
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in unet.named_modules()
               if name.endswith(("attn1.to_q", "attn2.to_q", "ff.net.0.proj"))]
    x, t, context = unet_inputs()
    try:
        with torch.no_grad(), approximated(model, tome=0.5):
            unet(x, t, context=context)
    finally:
        for handle in handles:
            handle.remove()
    assert {name: sizes for name, sizes in seen.items() if "attn1" in name} == {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": {32},
        "input_blocks.3.1.transformer_blocks.0.attn1.to_q": {16},
        "middle_block.1.transformer_blocks.0.attn1.to_q": {16},
        "output_blocks.0.1.transformer_blocks.0.attn1.to_q": {16},
        "output_blocks.1.1.transformer_blocks.0.attn1.to_q": {16},
        "output_blocks.2.1.transformer_blocks.0.attn1.to_q": {32},
        "output_blocks.3.1.transformer_blocks.0.attn1.to_q": {32},
    }
    assert all(sizes <= {64, 16} for name, sizes in seen.items() if "attn1" not in name)


def test_a_sampling_run_is_reproducible(model):
    from ldm.generate import txt2img
    runs = [txt2img(model, "a red circle", steps=3, n_samples=1, progress=False, tome=0.5) for _ in range(2)]
    assert runs[0][0].tobytes() == runs[1][0].tobytes()


@pytest.mark.parametrize("ratio", [-0.1, 0.8, "half", True])
def test_ratio_out_of_range_is_refused(model, ratio):
    with pytest.raises(UserError, match="token-merging ratio must be from 0"):
        TokenMerging(model.model.diffusion_model, ratio)
