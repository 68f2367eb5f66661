"""Tiny diffusers DiT and PixArt transformers (random weights, offline) shared by the diffusers tests."""
import diffusers
import torch


def tiny_dit(activation_fn: str = "gelu-approximate"):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                           norm_type="ada_norm_zero", activation_fn=activation_fn).eval()


def tiny_pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                              cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
                                              use_additional_conditions=False).eval()
