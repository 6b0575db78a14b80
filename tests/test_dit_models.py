"""DiT and Gaussian diffusion: published sizes, adaLN-Zero init, forward process, samplers, a tiny overfit."""

from __future__ import annotations

import math

import pytest
import torch

from models.diffusion import GaussianDiffusion, linear_betas
from models.dit import DiT, DiTBlock, dit_from_name, get_2d_sincos_pos_embed
from tests.helpers import assert_bf16_follows_fp32, fp32_and_bf16_loss_curves


def tiny_dit(seed: int = 0, **kwargs) -> DiT:
    torch.manual_seed(seed)
    args = dict(input_size=8, in_channels=4, num_classes=10, learn_sigma=True)
    args.update(kwargs)
    return dit_from_name("DiT-N/2", **args)


def randomize_zero_inits(model: DiT, seed: int = 1) -> DiT:
    """Give the zero-initialised adaLN and final layers random weights, so outputs depend on inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model


# ----------------------------------------------------------------------------- DiT


def test_dit_xl2_has_published_parameter_count():
    with torch.device("meta"):
        model = dit_from_name("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert not model.pos_embed.requires_grad


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    model = tiny_dit()
    x = torch.randn(3, 16, 64)
    c = torch.randn(3, 64)
    for block in model.blocks:
        assert isinstance(block, DiTBlock)
        assert torch.equal(block(x, c), x)
    # A block on its own has random adaLN weights; zeroing the modulation is what makes it the identity.
    standalone = DiTBlock(64, num_heads=2)
    assert not torch.equal(standalone(x, c), x)
    torch.nn.init.zeros_(standalone.adaLN_modulation[-1].weight)
    torch.nn.init.zeros_(standalone.adaLN_modulation[-1].bias)
    assert torch.equal(standalone(x, c), x)


def test_dit_output_is_exactly_zero_at_init_and_has_expected_shape():
    model = tiny_dit(learn_sigma=True)
    x = torch.randn(5, 4, 8, 8)
    out = model(x, torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,)))
    assert out.shape == (5, 8, 8, 8)
    assert torch.count_nonzero(out) == 0
    fixed_sigma = tiny_dit(learn_sigma=False)
    assert fixed_sigma(x, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)).shape == (5, 4, 8, 8)


def test_unpatchify_inverts_patch_order():
    model = tiny_dit(learn_sigma=False, input_size=8)
    p, c, g = model.patch_size, model.out_channels, model.x_embedder.grid_size
    image = torch.randn(2, c, 8, 8)
    # Patchify by hand, row-major over the grid, each patch flattened as (p, q, c).
    tokens = image.reshape(2, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * c)
    assert torch.equal(model.unpatchify(tokens), image)


def test_pos_embed_is_fixed_sincos():
    model = tiny_dit()
    expected = get_2d_sincos_pos_embed(64, model.x_embedder.grid_size)
    assert torch.allclose(model.pos_embed[0], expected)
    assert expected.shape == (16, 64)
    # Position (0, 0): sin halves are 0, cos halves are 1, for the column and the row parts.
    assert torch.equal(expected[0], torch.cat([torch.zeros(16), torch.ones(16), torch.zeros(16), torch.ones(16)]))
    # Token 1 is (row 0, column 1): only the column half (first D/2) differs from token 0.
    assert torch.equal(expected[1, 32:], expected[0, 32:]) and not torch.equal(expected[1, :32], expected[0, :32])


def test_bad_sizes_raise_named_errors():
    with pytest.raises(ValueError, match="input_size=10.*patch_size=4"):
        dit_from_name("DiT-N/4", input_size=10, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="unknown DiT name"):
        dit_from_name("DiT-Q/2", input_size=8, in_channels=4, num_classes=10)


def test_label_dropout_only_in_training_mode():
    model = tiny_dit(class_dropout_prob=0.1)
    seen: list[torch.Tensor] = []
    model.y_embedder.embedding_table.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    n = 512
    x = torch.randn(n, 4, 8, 8)
    t = torch.zeros(n, dtype=torch.long)
    y = torch.randint(0, 10, (n,))
    torch.manual_seed(0)
    model.train()
    model(x, t, y)
    model.eval()
    model(x, t, y)
    train_ids, eval_ids = seen
    dropped = train_ids == model.num_classes
    assert 0 < dropped.sum() < n * 0.3  # about 10 % dropped
    assert torch.equal(train_ids[~dropped], y[~dropped])
    assert torch.equal(eval_ids, y)
    assert model.null_class == 10
    forced = model.y_embedder.token_drop(y[:4], force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, y[1].item(), 10, y[3].item()]


def test_forward_with_cfg_scale_one_equals_conditional():
    model = randomize_zero_inits(tiny_dit()).eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 10])
    y = torch.tensor([3, 10])
    out = model.forward_with_cfg(torch.cat([x[:1], x[:1]]), t, y, cfg_scale=1.0)
    cond = model(x[:1], t[:1], y[:1])
    assert torch.allclose(out[:1, :4], cond[:, :4], atol=1e-6)
    with pytest.raises(ValueError, match="cfg_scale"):
        model.forward_with_cfg(x, t, y, cfg_scale=0.5)


# ----------------------------------------------------------------------- diffusion


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_and_q_sample_match_closed_form(schedule):
    diffusion = GaussianDiffusion(num_timesteps=1000, schedule=schedule)
    betas = diffusion.betas
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert torch.all(betas > 0) and torch.all(betas <= 0.999)
    running, cumulative = 1.0, []
    for beta in betas.tolist():
        running *= 1.0 - beta
        cumulative.append(running)
    assert torch.allclose(diffusion.alphas_cumprod, torch.tensor(cumulative, dtype=torch.float64), rtol=1e-12)
    assert torch.all(diffusion.alphas_cumprod[1:] < diffusion.alphas_cumprod[:-1])
    if schedule == "linear":
        assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ab = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).float()
    assert torch.allclose(diffusion.q_sample(x0, t, noise), expected, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_per_seed(sampler):
    model = randomize_zero_inits(tiny_dit()).eval()
    diffusion = GaussianDiffusion()
    y = torch.tensor([0, 3, 7])

    def draw(seed: int, cfg_scale: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        if sampler == "ddim":
            return diffusion.ddim_sample(model, (3, 4, 8, 8), y, cfg_scale=cfg_scale, steps=5, eta=0.5,
                                         generator=generator)
        return diffusion.ddpm_sample(model, (3, 4, 8, 8), y, cfg_scale=cfg_scale, steps=5, generator=generator)

    first, again, other = draw(0, 1.0), draw(0, 1.0), draw(1, 1.0)
    assert first.shape == (3, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    guided, guided_again = draw(0, 4.0), draw(0, 4.0)
    assert torch.equal(guided, guided_again)
    assert not torch.allclose(guided, first)


def test_cfg_scale_below_one_raises():
    model = tiny_dit().eval()
    diffusion = GaussianDiffusion()
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="cfg_scale"):
        diffusion.ddim_sample(model, (2, 4, 8, 8), y, cfg_scale=0.5, steps=2)
    with pytest.raises(ValueError, match="cfg_scale"):
        diffusion.ddpm_sample(model, (2, 4, 8, 8), y, cfg_scale=0.0, steps=2)


def test_full_ddpm_chain_matches_posterior_variance():
    # With all T steps the respaced beta equals the schedule's own beta.
    diffusion = GaussianDiffusion(num_timesteps=50)
    seq = diffusion.timestep_sequence(50)
    assert seq == list(range(49, -1, -1))
    assert diffusion.timestep_sequence(5)[0] == 49 and diffusion.timestep_sequence(5)[-1] == 0
    # With a zero epsilon model, the sampler must take every step of the hand-written posterior chain:
    # mean from q(x_{t-1} | x_t, x_0), variance beta_t (fixed_large) or beta~_t (fixed_small), same noise.
    shape, y = (2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    betas, ab = diffusion.betas.tolist(), diffusion.alphas_cumprod.tolist()

    def by_hand(variance: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator)
        for t in range(49, -1, -1):
            ab_prev = ab[t - 1] if t > 0 else 1.0
            x0 = x / math.sqrt(ab[t])
            x = betas[t] * math.sqrt(ab_prev) / (1 - ab[t]) * x0 + (1 - ab_prev) * math.sqrt(1 - betas[t]) / (1 - ab[t]) * x
            if t > 0:
                var = betas[t] if variance == "fixed_large" else betas[t] * (1 - ab_prev) / (1 - ab[t])
                x = x + math.sqrt(var) * torch.randn(shape, generator=generator)
        return x

    for variance in ("fixed_small", "fixed_large"):
        sampled = diffusion.ddpm_sample(lambda x, t, labels: torch.zeros_like(x), shape, y, variance=variance,
                                        generator=torch.Generator().manual_seed(0))
        assert torch.allclose(sampled, by_hand(variance), rtol=1e-4, atol=1e-5), variance
    assert not torch.allclose(by_hand("fixed_small"), by_hand("fixed_large"), rtol=1e-2)


def test_overfit_tiny_dit_lowers_diffusion_loss():
    torch.manual_seed(0)
    model = dit_from_name("DiT-N/2", input_size=8, in_channels=4, num_classes=4, learn_sigma=True)
    diffusion = GaussianDiffusion()
    latents = torch.randn(8, 4, 8, 8).clamp(-2, 2)
    labels = torch.arange(8) % 4
    eval_t = torch.linspace(0, 999, 8).long()

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            _, metrics = diffusion.training_loss(model, latents, t=eval_t, y=labels,
                                                 generator=torch.Generator().manual_seed(123))
        model.train()
        return metrics["mse"].item()  # the epsilon MSE; the loss also holds the variance's bound term

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss, metrics = diffusion.training_loss(model, latents, y=labels, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert before == pytest.approx(1.0, abs=0.3)  # zero output at init: loss = E[noise^2]
    assert after < 0.8 * before, (before, after)
    assert set(metrics) >= {"mse", "vlb"}
    assert model.pos_embed.grad is None


def test_bf16_autocast_training_follows_the_fp32_loss_curve():
    """The documented precision choice (``train.precision: bf16``, DiT-S/2's faster CPU step): the same
    model trained under bf16 autocast keeps its loss curve within a few percent of fp32."""
    latents, labels = torch.randn(16, 4, 8, 8).clamp(-2, 2), torch.arange(16) % 4

    def start():
        model = dit_from_name("DiT-N/2", input_size=8, in_channels=4, num_classes=4, learn_sigma=True)
        generator, diffusion = torch.Generator().manual_seed(0), GaussianDiffusion()
        return model, lambda: diffusion.training_loss(model, latents, y=labels, generator=generator)[0]

    fp32, bf16 = fp32_and_bf16_loss_curves(start, 30, lr=2e-3, weight_decay=0.0)
    assert fp32[-5:].mean() < 0.8 * fp32[:5].mean()  # it trained
    assert_bf16_follows_fp32(fp32, bf16)


# ------------------------------------------------------------ learned sigma: hybrid loss and sampling


def test_vlb_terms_match_a_hand_computed_kl_and_decoder_nll():
    diffusion = GaussianDiffusion(num_timesteps=100)
    betas = linear_betas(100).tolist()
    ab = [math.prod(1 - b for b in betas[: i + 1]) for i in range(100)]
    t = torch.tensor([0, 4, 99])
    x0, x_t, eps, v = (torch.tensor(vals, dtype=torch.float32).view(3, 1, 1, 1) for vals in
                       ([0.3, -1.2, 0.8], [0.5, -0.4, 1.5], [0.1, 0.7, -0.9], [0.2, -0.6, 0.9]))
    got = diffusion.vlb_terms(x0, x_t, t, eps, v)

    def posterior(i: int, start: float, noisy: float) -> tuple[float, float]:
        prev = ab[i - 1] if i > 0 else 1.0
        mean = betas[i] * math.sqrt(prev) / (1 - ab[i]) * start + (1 - prev) * math.sqrt(1 - betas[i]) / (1 - ab[i]) * noisy
        return mean, betas[i] * (1 - prev) / (1 - ab[i])

    expected = []
    for k, i in enumerate(t.tolist()):
        start, noisy, e, value = x0[k].item(), x_t[k].item(), eps[k].item(), v[k].item()
        true_mean, true_var = posterior(i, start, noisy)
        small = true_var if i > 0 else posterior(1, 0.0, 0.0)[1]  # beta~_0 = 0 is clipped to beta~_1
        predicted_start = (noisy - math.sqrt(1 - ab[i]) * e) / math.sqrt(ab[i])
        model_mean = posterior(i, predicted_start, noisy)[0]
        frac = (value + 1) / 2
        model_var = math.exp(frac * math.log(betas[i]) + (1 - frac) * math.log(small))
        if i == 0:  # decoder: Gaussian negative log density of x_0
            nats = 0.5 * math.log(2 * math.pi * model_var) + (start - model_mean) ** 2 / (2 * model_var)
        else:  # KL between two univariate Gaussians, written with standard deviations
            nats = (math.log(math.sqrt(model_var) / math.sqrt(true_var))
                    + (true_var + (true_mean - model_mean) ** 2) / (2 * model_var) - 0.5)
        expected.append(nats / math.log(2))
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-4, atol=1e-6), (got, expected)


def test_hybrid_loss_trains_the_variance_and_leaves_the_mean_to_the_mse():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 999])
    output = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1)).requires_grad_()
    loss, metrics = diffusion.training_loss(lambda x, tt, y: output, x0, t=t, generator=torch.Generator().manual_seed(2))
    loss.backward()
    eps_only = output.detach()[:, :2].clone().requires_grad_()
    mse, _ = diffusion.training_loss(lambda x, tt, y: eps_only, x0, t=t, generator=torch.Generator().manual_seed(2))
    mse.backward()
    assert torch.equal(output.grad[:, :2], eps_only.grad)  # stop-gradient: the bound does not pull on epsilon
    assert output.grad[:, 2:].abs().sum() > 0  # the variance channels learn
    assert loss.item() == pytest.approx(mse.item() + 1e-3 * 1000 * metrics["vlb"].item(), rel=1e-5)


def test_learned_variance_spans_fixed_small_to_fixed_large_in_ddpm_sampling():
    diffusion = GaussianDiffusion(num_timesteps=100)
    y = torch.zeros(2, dtype=torch.long)

    def constant_model(value: float | None):
        def model_fn(x, t, labels):
            eps = 0.1 * x
            return eps if value is None else torch.cat([eps, torch.full_like(x, value)], dim=1)
        return model_fn

    def draw(model_fn, variance="fixed_small"):
        return diffusion.ddpm_sample(model_fn, (2, 3, 4, 4), y, steps=10, variance=variance,
                                     generator=torch.Generator().manual_seed(0))

    small, large = draw(constant_model(None)), draw(constant_model(None), "fixed_large")
    assert not torch.allclose(small, large)
    assert torch.allclose(draw(constant_model(-1.0)), small, atol=1e-5)
    assert torch.allclose(draw(constant_model(1.0)), large, atol=1e-5)
    model = randomize_zero_inits(tiny_dit(learn_sigma=True)).eval()
    guided = diffusion.ddpm_sample(model, (3, 4, 8, 8), torch.tensor([0, 3, 7]), cfg_scale=3.0, steps=10,
                                   generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(guided).all()
    with pytest.raises(ValueError, match="variance"):
        draw(constant_model(None), "learned")


def test_scoring_convnet_embeds_to_its_last_width_and_refuses_a_side_it_cannot_pool():
    from models.convnet import ConvNetClassifier

    net = ConvNetClassifier(in_chans=3, num_classes=10, widths=(8, 16, 24)).eval()
    images = torch.rand(5, 3, 32, 32)
    features = net.embed(images)
    assert features.shape == (5, 24)
    torch.testing.assert_close(net(images), net.head(features))
    with pytest.raises(ValueError, match=r"\(30, 30\) is not divisible by 4"):
        net.embed(torch.rand(1, 3, 30, 30))
