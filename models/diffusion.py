"""Gaussian diffusion (DDPM forward process, epsilon-prediction loss, DDPM and DDIM samplers).

Follows Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (cosine schedule, respacing) and Song et al.
2021 (DDIM), with the defaults used by DiT (1000 steps, linear betas 1e-4..0.02).

What we train: the "simple" loss, MSE between true and predicted noise. A model with learned sigma
(2 x channels out, like DiT's ``learn_sigma=True``) is trained with Nichol & Dhariwal's hybrid loss,
L_simple + lambda * L_vlb (lambda = 1e-3): its second half v in [-1, 1] interpolates the log-variance
between beta~_t and beta_t, and the variational-bound term trains only that half (the mean enters it
with a stop-gradient). DDPM sampling then uses the learned variance; a fixed-variance model samples
with the posterior variance beta~_t ("fixed_small") or beta_t ("fixed_large", DiT's choice).
Classifier-free guidance is done here by doubling the batch with the null class, so any
``model_fn(x, t, y) -> out`` works; ``DiT.forward_with_cfg`` is not needed.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F

__all__ = ["GaussianDiffusion", "ModelFn", "SampleVariance", "linear_betas", "cosine_betas", "normal_kl",
           "gaussian_nll"]

SampleVariance = Literal["fixed_small", "fixed_large"]
VLB_WEIGHT = 1e-3  # lambda of the hybrid loss, on L_vlb = T * E_t[L_t] (Nichol & Dhariwal 2021)

#: model_fn(x_t (N, C, H, W), t (N,) long, y (N,) long) -> (N, C or 2C, H, W)
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule; endpoints scaled by 1000 / num_timesteps so any T spans the same noise range."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2.

    Betas are capped at ``max_beta`` because alpha_bar reaches 0 at the end, which would give beta = 1.
    """

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, exp(log_var)) per element, in nats."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


class GaussianDiffusion:
    """Noise schedule plus forward process, training loss and samplers for epsilon-predicting models.

    Schedule tables are computed in float64 (products of 1000 numbers close to 1 lose precision in
    float32) and handed out as float32 on the device of the query.
    """

    def __init__(self, num_timesteps: int = 1000, schedule: Literal["linear", "cosine"] = "linear"):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if schedule == "linear":
            betas = linear_betas(num_timesteps)
        elif schedule == "cosine":
            betas = cosine_betas(num_timesteps)
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.betas = betas  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0): variance beta~_t and the mean's coefficients on x_0 and x_t.
        posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 is 0; its log is clipped to beta~_1 as in improved-diffusion (only the t = 0 NLL reads it).
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if num_timesteps > 1 else betas
        self._sources = {
            "sqrt_alphas_cumprod": self.alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - self.alphas_cumprod).sqrt(),
            "log_betas": betas.log(),
            "posterior_log_variance_clipped": clipped.log(),
            "posterior_mean_coef_x0": betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod),
            "posterior_mean_coef_xt": (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - self.alphas_cumprod),
        }
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """A float32 copy of a float64 schedule table on ``device``, cached so indexing stays on-device."""
        key = (name, torch.device(device))
        if key not in self._tables:
            self._tables[key] = self._sources[name].to(device=device, dtype=torch.float32)
        return self._tables[key]

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Gather per-sample coefficients (N,) and shape them (N, 1, ..., 1) for broadcasting."""
        values = self._table(name, t.device)[t]  # (N,)
        return values.reshape(-1, *([1] * (ndim - 1)))

    @staticmethod
    def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        # Draw on the generator's own device, then move: a CPU generator gives the same noise on any device.
        source_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=source_device).to(device)

    # ------------------------------------------------------- forward process, loss

    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Uniform timesteps in [0, num_timesteps).

        Args:
            batch: number of timesteps N.
            generator: optional RNG for reproducible draws.
            device: where the result lives (default CPU).

        Returns:
            (N,) long tensor.
        """
        device = torch.device(device or "cpu")
        source_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=source_device).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x0, (1 - ab_t) I).

        Args:
            x0: (N, C, H, W) clean latents.
            t: (N,) long timesteps.
            noise: (N, C, H, W) standard normal noise.

        Returns:
            (N, C, H, W) ``sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise``.
        """
        sqrt_ab = self._extract("sqrt_alphas_cumprod", t, x0.ndim)  # (N, 1, 1, 1)
        sqrt_one_minus_ab = self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim)
        return sqrt_ab * x0 + sqrt_one_minus_ab * noise

    def training_loss(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Epsilon-prediction MSE (the "simple" DDPM loss), plus the VLB term for a learned-sigma model.

        Args:
            model_fn: ``model_fn(x_t, t, y)``; C channels (epsilon) or 2 x C (epsilon, then the
                variance values v), the latter trained with the hybrid loss MSE + 1e-3 * T * L_t.
            x0: (N, C, H, W) clean latents.
            t: (N,) timesteps; drawn uniformly when None.
            y: (N,) class labels passed through to the model (required by class-conditional models).
            generator: optional RNG for the timesteps and the noise.

        Returns:
            ``(loss, metrics)``: scalar loss and detached 0-d tensors ``mse`` and ``t_mean``, plus
            ``vlb`` (mean L_t in bits per dimension) for a learned-sigma model.
        """
        if t is None:
            t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        noise = self._randn(tuple(x0.shape), generator, x0.device).to(x0.dtype)  # (N, C, H, W)
        x_t = self.q_sample(x0, t, noise)  # (N, C, H, W)
        eps, var_values = self._split_output(model_fn(x_t, t, y), x0.shape[1])  # (N, C, H, W) each
        mse = F.mse_loss(eps.float(), noise.float())
        metrics = {"mse": mse.detach(), "t_mean": t.float().mean()}
        if var_values is None:
            return mse, metrics
        # Stop-gradient on epsilon: the bound trains the variance, the MSE alone trains the mean.
        vlb = self.vlb_terms(x0.float(), x_t.float(), t, eps.detach().float(), var_values.float())  # (N,)
        metrics["vlb"] = vlb.mean().detach()
        return mse + VLB_WEIGHT * self.num_timesteps * vlb.mean(), metrics

    @staticmethod
    def _split_output(model_out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(epsilon, variance values or None) of a model output with C (fixed sigma) or 2C (learned) channels."""
        if model_out.shape[1] not in (channels, 2 * channels):
            raise ValueError(
                f"model output has {model_out.shape[1]} channels; expected {channels} (epsilon) "
                f"or {2 * channels} (epsilon + learned sigma)"
            )
        if model_out.shape[1] == channels:
            return model_out, None
        return model_out[:, :channels], model_out[:, channels:]

    # ------------------------------------------------------- variational bound

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0): (N, C, H, W)."""
        return (self._extract("posterior_mean_coef_x0", t, x0.ndim) * x0
                + self._extract("posterior_mean_coef_xt", t, x0.ndim) * x_t)

    def learned_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log variance of p(x_{t-1} | x_t): v in [-1, 1] interpolates between log beta~_t (v = -1) and log beta_t (v = 1)."""
        frac = (var_values + 1) / 2  # (N, C, H, W)
        min_log = self._extract("posterior_log_variance_clipped", t, var_values.ndim)
        max_log = self._extract("log_betas", t, var_values.ndim)
        return frac * max_log + (1 - frac) * min_log

    def vlb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                  var_values: torch.Tensor) -> torch.Tensor:
        """L_t of the variational bound per sample, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0; at t = 0 the decoder NLL -log p(x_0 | x_1),
        here a continuous Gaussian density: latents are not 8-bit pixels, so the discretised likelihood
        of improved-diffusion would have no meaning.

        Args:
            x0, x_t: (N, C, H, W) clean and noised latents.
            t: (N,) long timesteps.
            eps: (N, C, H, W) predicted noise (pass it detached for the hybrid loss).
            var_values: (N, C, H, W) the model's variance outputs v.

        Returns:
            (N,) float.
        """
        sqrt_ab = self._extract("sqrt_alphas_cumprod", t, x0.ndim)
        sqrt_one_minus_ab = self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim)
        x0_pred = (x_t - sqrt_one_minus_ab * eps) / sqrt_ab  # (N, C, H, W)
        model_mean = self.posterior_mean(x0_pred, x_t, t)
        model_log_var = self.learned_log_variance(var_values, t)
        true_log_var = self._extract("posterior_log_variance_clipped", t, x0.ndim).expand_as(x0)
        kl = normal_kl(self.posterior_mean(x0, x_t, t), true_log_var, model_mean, model_log_var)
        nll = gaussian_nll(x0, model_mean, model_log_var)
        per_element = torch.where((t == 0).view(-1, *([1] * (x0.ndim - 1))), nll, kl)  # (N, C, H, W)
        return per_element.flatten(1).mean(1) / math.log(2.0)

    # ------------------------------------------------------------------ sampling

    def _guided_output(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: int,
        y: torch.Tensor,
        cfg_scale: float,
        null_class: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(epsilon, variance values or None) at timestep ``t``, with classifier-free guidance when
        ``cfg_scale > 1``; guidance applies to epsilon, the variance is the conditional one (as DiT)."""
        n, c = x.shape[:2]
        t_batch = torch.full((n,), t, dtype=torch.long, device=x.device)  # (N,)
        if cfg_scale == 1.0:
            return self._split_output(model_fn(x, t_batch, y), c)
        x_in = torch.cat([x, x], dim=0)  # (2N, C, H, W)
        y_in = torch.cat([y, torch.full_like(y, null_class)], dim=0)  # (2N,) conditional, then null
        eps, var_values = self._split_output(model_fn(x_in, torch.cat([t_batch, t_batch]), y_in), c)  # (2N, C, H, W)
        eps_cond, eps_uncond = eps.chunk(2, dim=0)
        guided = eps_uncond + cfg_scale * (eps_cond - eps_uncond)  # (N, C, H, W)
        return guided, None if var_values is None else var_values[:n]

    def _check_sampling_args(
        self, model_fn: ModelFn, shape: tuple[int, ...], y: torch.Tensor, cfg_scale: float, null_class: int | None
    ) -> int | None:
        if cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1 (1 disables guidance), got cfg_scale={cfg_scale}")
        if y.shape != (shape[0],):
            raise ValueError(f"y must have shape ({shape[0]},) to match shape={tuple(shape)}, got {tuple(y.shape)}")
        if null_class is None:
            null_class = getattr(model_fn, "null_class", None)
        if cfg_scale > 1 and null_class is None:
            raise ValueError(
                "cfg_scale > 1 needs a null class: pass null_class=, or a model with a null_class attribute "
                "(a DiT trained with class_dropout_prob > 0)"
            )
        return null_class

    def timestep_sequence(self, steps: int) -> list[int]:
        """``steps`` timesteps spread evenly over [0, T-1], both ends included, in decreasing order."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_timesteps}], got steps={steps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        seq = torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long().unique()
        return seq.flip(0).tolist()

    @torch.no_grad()
    def ddpm_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        y: torch.Tensor,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        steps: int | None = None,
        null_class: int | None = None,
        variance: SampleVariance = "fixed_small",
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling with the model's learned variance, or a fixed one.

        Args:
            model_fn: epsilon model ``model_fn(x_t, t, y)``; put a DiT in eval mode first.
            shape: (N, C, H, W) of the latents to draw.
            y: (N,) class labels.
            cfg_scale: classifier-free guidance scale; 1 disables guidance, < 1 is an error.
            generator: RNG for the initial noise and every step; a fixed seed gives identical samples.
            device: where to sample (default: the device of ``y``).
            steps: number of steps; None runs all ``num_timesteps``. Fewer steps respace the chain
                (Nichol & Dhariwal): the betas of the sub-sequence are derived from alpha_bar.
            null_class: label of the unconditional embedding; default ``model_fn.null_class``.
            variance: for a model with C output channels, the step variance: the posterior's beta~
                ("fixed_small") or beta ("fixed_large", DiT's choice). A model with 2C channels
                (learned sigma) always uses its own interpolation between the two.

        Returns:
            (N, C, H, W) samples x_0.
        """
        null_class = self._check_sampling_args(model_fn, shape, y, cfg_scale, null_class)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
        device = torch.device(device) if device is not None else y.device
        y = y.to(device)
        seq = self.timestep_sequence(steps or self.num_timesteps)
        x = self._randn(tuple(shape), generator, device)  # (N, C, H, W) x_T
        for i, t in enumerate(seq):
            s = seq[i + 1] if i + 1 < len(seq) else -1  # next (smaller) timestep, -1 = data
            ab_t = self.alphas_cumprod[t].item()
            ab_s = self.alphas_cumprod[s].item() if s >= 0 else 1.0
            beta = 1.0 - ab_t / ab_s  # beta of the (respaced) step t -> s
            eps, var_values = self._guided_output(model_fn, x, t, y, cfg_scale, null_class)
            x0 = (x - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)  # (N, C, H, W)
            # Posterior q(x_s | x_t, x_0): mean is a blend of x_0 and x_t.
            coef_x0 = beta * math.sqrt(ab_s) / (1.0 - ab_t)
            coef_xt = (1.0 - ab_s) * math.sqrt(1.0 - beta) / (1.0 - ab_t)
            x = coef_x0 * x0 + coef_xt * x
            if s < 0:  # no noise on the last step
                continue
            small = beta * (1.0 - ab_s) / (1.0 - ab_t)  # beta~ of the step
            if var_values is not None:
                # Respaced chains interpolate between the respaced step's beta~ and beta (improved-diffusion).
                frac = (var_values + 1) / 2  # (N, C, H, W), as in training: no clamp
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(small)))
            else:
                std = math.sqrt(beta if variance == "fixed_large" else small)
            x = x + std * self._randn(tuple(shape), generator, device)
        return x

    @torch.no_grad()
    def ddim_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        y: torch.Tensor,
        cfg_scale: float = 1.0,
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        null_class: int | None = None,
    ) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021); ``eta=0`` is deterministic given x_T, ``eta=1`` matches DDPM.

        Args:
            model_fn: epsilon model ``model_fn(x_t, t, y)``; put a DiT in eval mode first.
            shape: (N, C, H, W) of the latents to draw.
            y: (N,) class labels.
            cfg_scale: classifier-free guidance scale; 1 disables guidance, < 1 is an error.
            steps: number of denoising steps, spread evenly over the schedule.
            eta: stochasticity; 0 = deterministic ODE-like updates.
            generator: RNG for x_T (and the per-step noise when eta > 0).
            device: where to sample (default: the device of ``y``).
            null_class: label of the unconditional embedding; default ``model_fn.null_class``.

        Returns:
            (N, C, H, W) samples x_0.
        """
        null_class = self._check_sampling_args(model_fn, shape, y, cfg_scale, null_class)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got eta={eta}")
        device = torch.device(device) if device is not None else y.device
        y = y.to(device)
        seq = self.timestep_sequence(steps)
        x = self._randn(tuple(shape), generator, device)  # (N, C, H, W) x_T
        for i, t in enumerate(seq):
            s = seq[i + 1] if i + 1 < len(seq) else -1
            ab_t = self.alphas_cumprod[t].item()
            ab_s = self.alphas_cumprod[s].item() if s >= 0 else 1.0
            eps, _ = self._guided_output(model_fn, x, t, y, cfg_scale, null_class)  # DDIM's variance is eta's
            x0 = (x - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)  # (N, C, H, W)
            sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t) * (1.0 - ab_t / ab_s))
            # Re-noise the x_0 estimate to level s along the predicted direction, plus fresh noise.
            x = math.sqrt(ab_s) * x0 + math.sqrt(max(1.0 - ab_s - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * self._randn(tuple(shape), generator, device)
        return x
