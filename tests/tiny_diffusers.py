"""Tiny diffusers DiT and PixArt transformers (random weights, offline) shared by the diffusers tests."""
import diffusers
import pytest
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


def perturbed(model, seed=1):
    """diffusers zero-inits adaLN-Zero and the output layers, which would make every plan score zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_dit_pipeline():
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                          norm_type="ada_norm_zero").eval()   # the pipeline's null class is 1000
    return diffusers.DiTPipeline(transformer=perturbed(dit), vae=vae.eval(),
                                 scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000))


def tiny_pixart_pipeline(kind: str = "PixArtAlphaPipeline"):
    """A PixArt-alpha pipeline built offline: a one-layer T5 encoder and a word-level tokenizer (random weights),
    a 4-level VAE (factor 8: the 256-px resolution bin gives 32x32 latents, the transformer's sample size)."""
    transformers = pytest.importorskip("transformers", reason="PixArt's pipeline needs transformers (T5)")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "red", "blue", "house", "on", "the", "hill"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32,
                                                           num_layers=1, num_heads=2)).eval()
    transformer = perturbed(diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=32,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
        use_additional_conditions=False).eval())
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4,
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=256).eval()
    return getattr(diffusers, kind)(tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer,
                                    scheduler=diffusers.DPMSolverMultistepScheduler())
