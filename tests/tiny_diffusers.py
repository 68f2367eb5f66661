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


def tiny_flow_vae(sample_size: int = 16):
    """A one-level AutoencoderKL (2x in space, 4 latent channels) as the flow-matching pipelines configure theirs:
    no quant convolutions, a shift and a scaling factor (random weights)."""
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=sample_size,
                                   use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                                   scaling_factor=1.5).eval()


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


def _word_tokenizer(max_length: int = 16):
    """A word-level tokenizer over a dozen words (offline; for T5 and CLIP alike)."""
    transformers = pytest.importorskip("transformers", reason="text-to-image pipelines need transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "red", "blue", "house", "on", "the", "hill"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=max_length), len(words)


def pack_only_models():
    """Tiny SD3, Flux and Sana transformers, each with the keyword inputs of one call (for the any-model path:
    `treeq quantize --diffusers --uniform`, artifacts, pipelines)."""
    torch.manual_seed(0)
    sd3 = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                          caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                          pos_embed_max_size=16)
    flux = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    sana = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                            cross_attention_dim=16, caption_channels=16, sample_size=8)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 5, 16, generator=g)
    return {
        "sd3": (sd3, dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=text,
                          pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([500, 20]))),
        "flux": (flux, dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=text,
                            pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.5, 0.1]),
                            img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3))),
        "sana": (sana, dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=text,
                            timestep=torch.tensor([500, 20]))),
    }


def tiny_flux_pipeline():
    """A Flux pipeline built offline: one-layer CLIP and T5 encoders over a word-level tokenizer, a one-double- and
    two-single-block transformer, a 2-level VAE (random weights)."""
    transformers = pytest.importorskip("transformers", reason="Flux's pipeline needs transformers (CLIP, T5)")
    tokenizer, vocab = _word_tokenizer()
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=8, eos_token_id=1, pad_token_id=0)).eval()
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2)).eval()
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                                   attention_head_dim=8, num_attention_heads=2,
                                                   joint_attention_dim=24, pooled_projection_dim=16,
                                                   axes_dims_rope=(2, 2, 4)).eval()
    vae = tiny_flow_vae()
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                                  tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=_word_tokenizer()[0],
                                  transformer=transformer)


def tiny_sd3_pipeline(shifting: bool = False):
    """An SD3 pipeline built offline: two one-layer CLIP encoders (with projection) and a one-layer T5 over a
    word-level tokenizer, a two-block transformer, a 2-level VAE (random weights). ``shifting``: a flow-matching
    scheduler with dynamic shifting (its schedule moves with the resolution, as FLUX.1-dev's does)."""
    transformers = pytest.importorskip("transformers", reason="SD3's pipeline needs transformers (CLIP, T5)")
    tokenizer, vocab = _word_tokenizer()
    torch.manual_seed(0)

    def clip():
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32, projection_dim=4, bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()

    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2)).eval()
    transformer = perturbed(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16).eval())
    vae = tiny_flow_vae()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=shifting)
    return diffusers.StableDiffusion3Pipeline(
        scheduler=sched, vae=vae, transformer=transformer, text_encoder=clip(), tokenizer=tokenizer,
        text_encoder_2=clip(), tokenizer_2=_word_tokenizer()[0], text_encoder_3=t5, tokenizer_3=_word_tokenizer()[0])


def tiny_wan_pipeline():
    """A Wan text-to-video pipeline built offline: a one-layer UMT5 encoder over a word-level tokenizer, a two-block
    transformer, a one-level causal video VAE (2x in time and space; random weights). Loading it back from disk
    needs accelerate (Wan keeps modules in float32)."""
    transformers = pytest.importorskip("transformers", reason="Wan's pipeline needs transformers (UMT5)")
    tokenizer, vocab = _word_tokenizer()
    torch.manual_seed(0)
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32,
                                                                 num_layers=1, num_heads=2)).eval()
    transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                                  num_layers=2, rope_max_seq_len=32).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2,
                                     scale_factor_spatial=2).eval()
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=umt5, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def tiny_wan_a14b_pipeline():
    """A Wan 2.2 A14B-style pipeline built offline: ``tiny_wan_pipeline`` with a second expert, ``transformer_2``
    (other random weights), denoising below timestep 500 (``boundary_ratio`` 0.5), ``transformer`` above it."""
    t2v = tiny_wan_pipeline()   # (skips without transformers)
    torch.manual_seed(1)
    low = diffusers.WanTransformer3DModel.from_config(t2v.transformer.config).eval()
    return diffusers.WanPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                 transformer=t2v.transformer, transformer_2=low, scheduler=t2v.scheduler,
                                 boundary_ratio=0.5)


def tiny_wan_ti2v_pipeline():
    """A Wan 2.2 TI2V-style pipeline built offline: ``tiny_wan_pipeline`` with ``expand_timesteps`` (one timestep per
    latent token; with an image, the first frame's held at 0 and its latents replaced by the image's). Saved, it
    loads as text-to-video, or with images as ``WanImageToVideoPipeline``, as the real TI2V-5B does."""
    pytest.importorskip("transformers", reason="Wan's pipeline needs transformers (UMT5)")
    t2v = tiny_wan_pipeline()
    return diffusers.WanPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                 transformer=t2v.transformer, scheduler=t2v.scheduler, expand_timesteps=True)


def tiny_wan_i2v_pipeline():
    """A Wan 2.1 image-to-video pipeline built offline: ``tiny_wan_pipeline``'s encoder and VAE, a two-layer CLIP
    vision encoder (32-px images, its penultimate tokens the transformer's image tokens), a transformer reading the
    latents, the first frame's mask (2 channels: the VAE's time factor) and its latents (random weights)."""
    transformers = pytest.importorskip("transformers", reason="Wan's pipeline needs transformers (UMT5, CLIP)")
    t2v = tiny_wan_pipeline()
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=12, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16,
        projection_dim=12)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                                  in_channels=10, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                                  num_layers=2, rope_max_seq_len=32, image_dim=12,
                                                  added_kv_proj_dim=16).eval()
    return diffusers.WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                             scheduler=t2v.scheduler, image_processor=processor, image_encoder=clip,
                                             transformer=transformer)


def tiny_qwen():
    """A two-block Qwen-Image transformer (random weights, perturbed: diffusers zero-initialises its output layers)."""
    torch.manual_seed(0)
    return perturbed(diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4)).eval())


def tiny_qwen_pipeline():
    """A Qwen-Image pipeline built offline: a one-layer Qwen2.5-VL text encoder over a character-level tokenizer
    (its chat template's markers as tokens), ``tiny_qwen``, a one-level Qwen-Image VAE, a flow-matching scheduler
    with dynamic shifting (random weights)."""
    import string

    transformers = pytest.importorskip("transformers", reason="Qwen-Image's pipeline needs transformers (Qwen2.5-VL)")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + list(string.printable)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_(start|end)\|>|."), behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                     padding_side="right")
    torch.manual_seed(0)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(chars), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=16, num_heads=2, intermediate_size=32,
                           fullatt_block_indexes=[0]),
        vocab_size=len(chars), hidden_size=16)
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                      base_image_seq_len=16, max_image_seq_len=256,
                                                      shift_terminal=0.02, time_shift_type="exponential")
    return diffusers.QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       transformer=tiny_qwen())


def tiny_sana(patch_size: int = 1, sprint: bool = False):
    """A two-block Sana transformer (linear self-attention, cross-attention, GLUMBConv feed-forward), its scale-shift
    tables perturbed off their init so every block's gates matter; ``sprint``: Sana-Sprint's (a guidance embedding,
    q/k RMSNorm)."""
    torch.manual_seed(0)
    # (Sana-Sprint's pipeline bins resolutions for sample size 32 only: 1024 px)
    extra = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads", sample_size=32) if sprint else \
        dict(sample_size=16)
    return perturbed(diffusers.SanaTransformer2DModel(
        patch_size=patch_size, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        **extra).eval())


def tiny_sana_pipeline(sprint: bool = False):
    """A Sana pipeline built offline: a one-layer Gemma2 encoder over a word-level tokenizer, ``tiny_sana`` (sample
    size 16: the 512-px resolution bins), a 6-level DC-AE (factor 32: 512 px -> 16x16 latents) of ResBlocks, a
    flow-matching scheduler (random weights); ``sprint``: a Sana-Sprint pipeline (its transformer, the SCM
    scheduler)."""
    transformers = pytest.importorskip("transformers", reason="Sana's pipeline needs transformers (Gemma2)")
    tokenizer, vocab = _word_tokenizer(max_length=300)
    torch.manual_seed(0)
    gemma = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512)).eval()
    levels = 6
    vae = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock",) * levels,
        decoder_block_types=("ResBlock",) * levels, encoder_block_out_channels=(4,) * levels,
        decoder_block_out_channels=(4,) * levels, encoder_qkv_multiscales=((),) * levels,
        decoder_qkv_multiscales=((),) * levels, encoder_layers_per_block=(1,) * levels,
        decoder_layers_per_block=(1,) * levels, downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()
    if sprint:
        return diffusers.SanaSprintPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae,
                                            transformer=tiny_sana(sprint=True), scheduler=diffusers.SCMScheduler())
    return diffusers.SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae, transformer=tiny_sana(),
                                  scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def tiny_zimage():
    """A Z-Image transformer: one noise- and one context-refiner block, two main blocks (random weights, perturbed:
    diffusers zero-initialises its modulations)."""
    torch.manual_seed(0)
    model = diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, qk_norm=True, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]).eval()
    with torch.no_grad():   # (diffusers before 0.38 leaves the padding tokens uninitialised: torch.empty)
        model.x_pad_token.zero_()
        model.cap_pad_token.zero_()
    return perturbed(model)


def tiny_zimage_pipeline():
    """A Z-Image pipeline built offline: a one-layer Qwen3 encoder over a word-level tokenizer with a chat template
    (the pipeline wraps every prompt in it), ``tiny_zimage``, a 2-level VAE, a dynamically shifted flow-matching
    scheduler (random weights). 32-px images: 16x16 latents, 64 image tokens."""
    transformers = pytest.importorskip("transformers", reason="Z-Image's pipeline needs transformers (Qwen3)")
    tokenizer, vocab = _word_tokenizer(max_length=512)
    tokenizer.chat_template = "{% for m in messages %}a {{ m['content'] }} the{% endfor %}"   # (never empty)
    torch.manual_seed(0)
    qwen3 = transformers.Qwen3Model(transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)).eval()
    vae = tiny_flow_vae(32)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=16, max_image_seq_len=256)
    return diffusers.ZImagePipeline(scheduler=sched, vae=vae, text_encoder=qwen3, tokenizer=tokenizer,
                                    transformer=tiny_zimage())


def tiny_flux2(guidance: bool = False):
    """A FLUX.2 transformer: two double-stream and two single-stream blocks, 4 position axes (random weights,
    perturbed); ``guidance``: FLUX.2 [dev]'s embedded guidance (klein embeds none)."""
    torch.manual_seed(0)
    return perturbed(diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=guidance).eval())


def tiny_flux2_klein_pipeline():
    """A FLUX.2 [klein] pipeline built offline: a 28-layer, width-8 Qwen3 (the pipeline stacks its layers 9, 18 and
    27: 24 features per token) over a word-level tokenizer with a chat template, ``tiny_flux2``, a 2-level FLUX.2
    VAE (4 latent channels, 2x2-patchified: 16), the flow-matching scheduler (random weights). 32-px images: 8x8
    packed latents, 64 image tokens; prompts padded to 512 tokens."""
    transformers = pytest.importorskip("transformers", reason="FLUX.2 [klein]'s pipeline needs transformers (Qwen3)")
    tokenizer, vocab = _word_tokenizer(max_length=512)
    tokenizer.chat_template = "{% for m in messages %}a {{ m['content'] }} the{% endfor %}"
    torch.manual_seed(0)
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=1024)).eval()
    vae = diffusers.AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                       layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                                       mid_block_add_attention=False).eval()
    return diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                        text_encoder=qwen3, tokenizer=tokenizer, transformer=tiny_flux2())


def tiny_chroma(in_channels: int = 16):
    """A Chroma transformer: one double- and three single-stream blocks (unequal counts: the approximator's rows
    are laid out by both), a two-layer approximator (random weights, perturbed off diffusers' zero
    initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=[2, 2, 4], approximator_hidden_dim=16,
        approximator_layers=2).eval())


def tiny_chroma_pipeline():
    """A Chroma pipeline built offline: a one-layer T5 encoder over a word-level tokenizer (prompts padded to 512
    tokens, the padding masked), ``tiny_chroma``, a 2-level VAE, a flow-matching scheduler (random weights)."""
    transformers = pytest.importorskip("transformers", reason="Chroma's pipeline needs transformers (T5)")
    tokenizer, vocab = _word_tokenizer(max_length=512)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2)).eval()
    vae = tiny_flow_vae()
    return diffusers.ChromaPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5,
                                    tokenizer=tokenizer, transformer=tiny_chroma())


def tiny_ltx():
    """A two-block LTX-Video transformer (random weights, perturbed off diffusers' zero initialisations)."""
    torch.manual_seed(0)
    return perturbed(diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16).eval())


def tiny_ltx_pipeline():
    """An LTX-Video pipeline built offline: a one-layer T5 encoder over a word-level tokenizer (prompts padded to
    128 tokens), ``tiny_ltx``, a 2-level LTX VAE (2x in space and time), a flow-matching scheduler (random weights).
    9 frames of 32x32: 5 x 16 x 16 latent tokens."""
    transformers = pytest.importorskip("transformers", reason="LTX-Video's pipeline needs transformers (T5)")
    tokenizer, vocab = _word_tokenizer(max_length=128)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2)).eval()
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        down_block_types=("LTXVideoDownBlock3D",) * 2, layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, False), decoder_spatio_temporal_scaling=(True, False),
        decoder_inject_noise=(False, False, False), upsample_residual=(False, False), upsample_factor=(1, 1),
        patch_size=1, patch_size_t=1).eval()
    return diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5,
                                 tokenizer=tokenizer, transformer=tiny_ltx())
