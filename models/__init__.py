"""Pure torch.nn.Module model families: ViT, MAE, CLIP, DiT, the frozen VAE and Gaussian diffusion."""
