"""Tests for the ViT encoder (models/vit.py) and the masked autoencoder (models/mae.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from models.mae import (
    MaskedAutoencoder,
    denormalize_pred,
    mae_from_name,
    patchify,
    random_masking,
    reconstruction_tiles,
    unpatchify,
)
from models.layers import Attention, PatchEmbed, attend, sincos_position_embedding_2d
from models.vit import VIT_SIZES, DropPath, VisionTransformer, param_count, vit_from_name
from tests.helpers import assert_bf16_follows_fp32, fp32_and_bf16_loss_curves


def nano_mae(**kwargs) -> MaskedAutoencoder:
    """A nano MAE on 16x16 single-channel images with 4x4 patches (L = 16): fast enough for every test."""
    arguments = dict(img_size=16, patch_size=4, in_chans=1, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2)
    arguments.update(kwargs)
    return mae_from_name("nano", **arguments)


# ----------------------------------------------------------------------------- patches and masking


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height, width", [(8, 8), (8, 12), (12, 4)])
def test_patchify_unpatchify_round_trip(channels: int, height: int, width: int) -> None:
    imgs = torch.randn(2, channels, height, width)
    patches = patchify(imgs, patch_size=4)
    assert patches.shape == (2, (height // 4) * (width // 4), 16 * channels)
    back = unpatchify(patches, 4, channels, grid_hw=(height // 4, width // 4))
    assert torch.equal(back, imgs)


def test_patchify_layout_is_row_major_with_channels_last() -> None:
    imgs = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(imgs, 2)  # (1, 4, 8)
    # Patch 1 is the top-right 2x2 block; its first pixel is (row 0, col 2) of channel 0 then channel 1.
    assert patches[0, 1, :2].tolist() == [imgs[0, 0, 0, 2].item(), imgs[0, 1, 0, 2].item()]


def test_unpatchify_rejects_non_square_without_grid() -> None:
    with pytest.raises(ValueError, match="grid_hw"):
        unpatchify(torch.zeros(1, 6, 16), 4, 1)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.1, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("num_tokens", [16, 49, 64])
def test_random_masking_keeps_exact_count_and_restores(mask_ratio: float, num_tokens: int) -> None:
    N, D = 3, 5
    x = torch.randn(N, num_tokens, D)
    generator = torch.Generator().manual_seed(0)
    x_visible, mask, ids_restore = random_masking(x, mask_ratio, generator)

    len_keep = max(1, int(num_tokens * (1 - mask_ratio)))
    assert x_visible.shape == (N, len_keep, D)
    assert mask.shape == (N, num_tokens)
    assert torch.equal(mask.sum(dim=1), torch.full((N,), float(num_tokens - len_keep)))

    # Filling the hidden slots with their true tokens and gathering with ids_restore must give x back.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    hidden = torch.gather(x, 1, ids_shuffle[:, len_keep:, None].expand(-1, -1, D))
    restored = torch.gather(torch.cat([x_visible, hidden], dim=1), 1, ids_restore[:, :, None].expand(-1, -1, D))
    assert torch.equal(restored, x)

    # The mask marks exactly the positions whose tokens were dropped.
    visible_rows = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    assert torch.equal(visible_rows, x_visible)
    assert torch.all(torch.gather(mask, 1, ids_shuffle[:, :len_keep]) == 0)


def test_kept_patch_count_truncates_as_mae_does() -> None:
    # 28 px images, patch 4: L = 49 and 49 * 0.4 = 19.6. MAE keeps int(L * (1 - ratio)) = 19, not 20.
    model = mae_from_name("nano", img_size=28, patch_size=4, in_chans=1, mask_ratio=0.6)
    latent, mask, _ = model.forward_encoder(torch.randn(2, 1, 28, 28), 0.6)
    assert latent.shape[1] == 1 + 19 and torch.all(mask.sum(dim=1) == 30)


def test_random_masking_is_reproducible_with_generator() -> None:
    x = torch.randn(2, 16, 4)
    first = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    second = random_masking(x, 0.75, torch.Generator().manual_seed(3))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- MAE


def test_encoder_sees_only_visible_tokens() -> None:
    model = nano_mae()
    imgs = torch.randn(2, 1, 16, 16)
    for mask_ratio in (0.25, 0.75):
        latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio)
        kept = int(16 * (1 - mask_ratio))
        assert latent.shape == (2, 1 + kept, 64)
        assert mask.shape == ids_restore.shape == (2, 16)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 16, 16) and loss.ndim == 0


def test_loss_counts_masked_patches_only() -> None:
    model = nano_mae()
    imgs = torch.randn(2, 1, 16, 16)
    pred = torch.randn(2, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, ::3] = 1
    base = model.forward_loss(imgs, pred, mask)

    changed_visible = pred.clone()
    changed_visible[mask == 0] += 10.0
    assert torch.allclose(model.forward_loss(imgs, changed_visible, mask), base)

    changed_masked = pred.clone()
    changed_masked[0, 0] += 10.0  # position 0 is hidden
    assert not torch.allclose(model.forward_loss(imgs, changed_masked, mask), base)

    # By hand: mean over pixels, then over the hidden patches.
    per_patch = ((pred - patchify(imgs, 4)) ** 2).mean(-1)
    assert torch.allclose(base, per_patch[mask == 1].mean())


def test_norm_pix_loss_and_denormalize_agree() -> None:
    model = nano_mae(norm_pix_loss=True)
    imgs = torch.randn(2, 1, 16, 16)
    target = patchify(imgs, 4)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.ones(2, 16)
    assert model.forward_loss(imgs, normalised, mask).item() < 1e-10
    assert torch.allclose(denormalize_pred(imgs, normalised, 4), target, atol=1e-5)


def test_mae_encoder_state_dict_loads_into_vit() -> None:
    model = nano_mae(drop_path_rate=0.1).eval()
    vit = vit_from_name("nano", img_size=16, patch_size=4, in_chans=1).eval()
    vit.load_state_dict(model.encoder.state_dict(), strict=True)
    imgs = torch.randn(2, 1, 16, 16)
    assert torch.allclose(vit.forward_features(imgs), model.encoder.forward_features(imgs))
    # Positions are fixed: in the state dict and counted, but never trained.
    assert not vit.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert "pos_embed" in vit.state_dict()


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: nano_mae(mask_ratio=0.0), "mask_ratio"),
        (lambda: nano_mae(mask_ratio=1.0), "mask_ratio"),
        (lambda: nano_mae(img_size=18), "img_size"),
        (lambda: mae_from_name("gigantic", img_size=16, patch_size=4), "valid sizes"),
        (lambda: vit_from_name("gigantic"), "nano"),
        (lambda: PatchEmbed(30, 4, 3, 8), "patch_size 4"),
        (lambda: VisionTransformer(img_size=32, patch_size=4, global_pool="max"), "global_pool"),
        (lambda: VisionTransformer(img_size=32, patch_size=4, embed_dim=66, num_heads=6), "divisible by 4"),
        (lambda: VisionTransformer(img_size=32, patch_size=4, embed_dim=64, num_heads=3), "num_heads"),
        (lambda: sincos_position_embedding_2d(6, 4, cls_token=False), "embed_dim"),
    ],
)
def test_bad_inputs_raise_value_error(build, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build()


def test_bad_mask_ratio_at_call_time() -> None:
    model = nano_mae()
    with pytest.raises(ValueError, match=r"mask_ratio.*1\.5"):
        model(torch.randn(1, 1, 16, 16), mask_ratio=1.5)


def test_patch_embed_error_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"img_size 30 must be a positive multiple of patch_size 4"):
        PatchEmbed(30, 4, 3, 8)


def test_overfit_fixed_batch_lowers_loss() -> None:
    torch.manual_seed(0)
    model = nano_mae()
    imgs = torch.rand(8, 1, 16, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(30):
        # The same mask every step, so the loss measures fitting rather than mask luck.
        loss, _, _ = model(imgs, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_reconstruction_tiles_show_original_masked_and_pasted_reconstruction() -> None:
    imgs = torch.rand(3, 3, 8, 8)
    pred = torch.full((3, 4, 48), 5.0)  # out of range on purpose: must be clamped
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]] * 3)
    tiles = reconstruction_tiles(imgs, pred, mask, patch_size=4, max_images=2)
    assert tiles.shape == (2, 3, 3, 8, 8)
    assert tiles.min() >= 0 and tiles.max() <= 1
    original, masked, recon = tiles[0]
    assert torch.equal(original, imgs[0])
    assert torch.all(masked[:, :4, :4] == 0.5) and torch.equal(masked[:, :4, 4:], imgs[0][:, :4, 4:])
    assert torch.all(recon[:, :4, :4] == 1.0) and torch.equal(recon[:, 4:, :4], imgs[0][:, 4:, :4])

    normalised = (imgs - 0.5) / 0.25
    undone = reconstruction_tiles(normalised, pred, mask, 4, max_images=1, mean=[0.5] * 3, std=[0.25] * 3)
    assert torch.allclose(undone[0, 0], imgs[0])


# ----------------------------------------------------------------------------- ViT parts


@pytest.mark.parametrize(
    "size, expected",
    [("tiny", 5_717_416), ("small", 22_050_664), ("base", 86_567_656), ("large", 304_326_632)],
)
def test_published_parameter_counts(size: str, expected: int) -> None:
    with torch.device("meta"):  # counts only; no memory, no init time
        model = vit_from_name(size, img_size=224, patch_size=16, num_classes=1000)
    assert param_count(model) == expected
    spec = VIT_SIZES[size]
    assert param_count(model, trainable_only=True) == expected - 197 * spec.embed_dim  # frozen positions


def test_vit_forward_shapes_and_pooling() -> None:
    model = vit_from_name("nano", img_size=16, patch_size=4, in_chans=3, num_classes=10).eval()
    imgs = torch.randn(2, 3, 16, 16)
    tokens = model.forward_features(imgs)
    assert tokens.shape == (2, 17, 64)
    assert torch.equal(model.pool(tokens, "token"), tokens[:, 0])
    assert torch.allclose(model.pool(tokens, "avg"), tokens[:, 1:].mean(1))
    assert model(imgs).shape == (2, 10)
    features = vit_from_name("nano", img_size=16, patch_size=4, global_pool="avg")(imgs)
    assert features.shape == (2, 64)


def test_avg_pool_classifier_normalises_after_pooling_as_mae_finetunes() -> None:
    model = vit_from_name("nano", img_size=16, patch_size=4, in_chans=1, num_classes=3, global_pool="avg").eval()
    keys = set(model.state_dict())
    assert {"fc_norm.weight", "fc_norm.bias"} <= keys and not any(k.startswith("norm.") for k in keys)
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 1.5)  # not the identity, so a missing fc_norm would show
    imgs = torch.randn(2, 1, 16, 16)
    # By hand: the blocks' output with no final norm; mean over the patch tokens; then fc_norm and the head.
    hidden = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), model.embed_patches(imgs)], 1)
    for block in model.blocks:
        hidden = block(hidden)
    assert torch.allclose(model.forward_features(imgs), hidden)
    pooled = F.layer_norm(hidden[:, 1:].mean(1), (64,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    assert torch.allclose(model(imgs), model.head(pooled), atol=1e-6)


def test_sincos_position_embedding() -> None:
    emb = sincos_position_embedding_2d(16, 3, cls_token=True)
    assert emb.shape == (10, 16)
    assert torch.all(emb[0] == 0)
    # Patch (row 0, col 0): sin(0) = 0 and cos(0) = 1 in each axis' half.
    assert emb[1].tolist() == [0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4
    # Column varies along the first half, row along the second (row-major token order).
    assert torch.equal(emb[2, 8:], emb[1, 8:]) and not torch.equal(emb[2, :8], emb[1, :8])
    assert torch.equal(emb[4, :8], emb[1, :8]) and not torch.equal(emb[4, 8:], emb[1, 8:])
    assert emb[1:, 4 + 3].tolist() == pytest.approx([math.cos(col * 10000 ** (-3 / 4)) for _ in range(3) for col in range(3)])


def test_drop_path_identity_in_eval_and_per_sample_in_train() -> None:
    drop = DropPath(0.5)
    x = torch.randn(64, 5, 4)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(0)
    out = drop(x)
    kept = (out != 0).flatten(1).all(dim=1)
    dropped = (out == 0).flatten(1).all(dim=1)
    assert torch.all(kept | dropped)  # whole samples, never single tokens
    assert torch.allclose(out[kept], x[kept] * 2)  # survivors rescaled by 1 / keep_prob
    assert 0 < kept.sum() < 64


def test_sdpa_attention_matches_manual_softmax() -> None:
    torch.manual_seed(0)
    attention = Attention(dim=32, num_heads=4)
    x = torch.randn(3, 7, 32)
    N, T, D = x.shape
    q, k, v = attention.qkv(x).reshape(N, T, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh) each
    weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)  # (N, H, T, T)
    manual = attention.proj((weights @ v).transpose(1, 2).reshape(N, T, D))
    assert torch.allclose(attention(x), manual, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_bf16_attention_matches_fp32_sdpa(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # On bf16 CPU tensors (what autocast hands it) ``attend`` takes explicit matmuls around a softmax
    # instead of the fused kernel, which is slow in bf16 there: the same attention, forward and
    # backward, to bf16's precision.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, requires_grad=True) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    reference.square().sum().backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]

    def fused_kernel(*args, **kwargs):
        raise AssertionError("the fused kernel ran on bf16 CPU tensors")

    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_kernel)
    out = attend(*low, causal=causal)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert torch.allclose(out.float(), reference, atol=0.03, rtol=0.03)
    for got, want in zip(low, expected):
        assert torch.allclose(got.grad.float(), want, atol=0.1, rtol=0.05)
    if causal:  # the first query sees only the first key, so its output is the first value
        assert torch.allclose(out[:, :, 0].float(), v[:, :, 0].detach(), atol=0.02)


def test_cpu_bf16_causal_attention_with_fewer_queries_than_keys_aligns_as_sdpa_does() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # query i sees keys 0..i
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True).float()
    assert torch.allclose(got, expected, atol=0.03, rtol=0.03)


def test_mae_bf16_autocast_training_follows_the_fp32_loss_curve() -> None:
    """The documented precision choice (``train.precision: bf16``, MAE's faster CPU step): the same MAE
    trained under bf16 autocast keeps its loss curve within a few percent of fp32."""
    imgs = torch.rand(16, 1, 16, 16)

    def start():
        model, step = nano_mae(), itertools.count()
        return model, lambda: model(imgs, generator=torch.Generator().manual_seed(next(step)))[0]

    fp32, bf16 = fp32_and_bf16_loss_curves(start, 20, lr=2e-3, betas=(0.9, 0.95))
    assert fp32[-5:].mean() < 0.7 * fp32[:5].mean()  # it trained
    assert_bf16_follows_fp32(fp32, bf16)


def test_vit_mae_and_dit_share_one_set_of_layers() -> None:
    from models import dit, layers, vit

    # One class each: the ViT, the MAE decoder and DiT blocks all build from models/layers.py.
    vit_block = vit.Block(32, 4)
    dit_block = dit.DiTBlock(32, 4)
    assert type(vit_block.attn) is type(dit_block.attn) is layers.Attention
    assert type(vit_block.mlp) is type(dit_block.mlp) is layers.Mlp
    assert type(vit_from_name("nano", img_size=16, patch_size=4).patch_embed) is layers.PatchEmbed
    assert type(dit.dit_from_name("DiT-N/2", input_size=8, num_classes=2).x_embedder) is layers.PatchEmbed
    # DiT keeps its tanh GELU, the ViT the exact one.
    assert dit_block.mlp.act.approximate == "tanh" and vit_block.mlp.act.approximate == "none"
    assert torch.equal(dit.get_2d_sincos_pos_embed(16, 3), sincos_position_embedding_2d(16, 3, cls_token=True)[1:])


def test_vit_state_dict_keys_are_unchanged() -> None:
    # Encoders exported before the shared layers existed must still load by name.
    keys = set(vit_from_name("nano", img_size=16, patch_size=4, num_classes=2).state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias", "head.weight", "head.bias"}
    for index in range(4):
        expected |= {f"blocks.{index}.{name}" for name in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    assert keys == expected
