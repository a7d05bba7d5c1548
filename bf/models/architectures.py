"""Architectures ``bf random-model`` can create, as diffusers/transformers configs.

``sd15`` is Stable Diffusion v1.5 exactly (UNet 859.52M parameters); ``sd15-tiny``
keeps every block type (cross-attention down/up blocks, a plain down and up block,
the cross-attention mid block, ResBlocks with time projections, a KL autoencoder
with 8x downsampling) at a width that builds and runs in a second on a CPU.

``sdxl`` is Stable Diffusion XL base 1.0 exactly (UNet 2567.46M parameters, two text
encoders: CLIP ViT-L and OpenCLIP ViT-bigG with its projection, the SDXL VAE, Euler);
``sdxl-tiny`` keeps its block types (a plain first level, transformer stacks of more
than one layer, linear projections, the ``text_time`` added embedding of the pooled
prompt and the micro-conditioning) at tiny width.
"""

from __future__ import annotations

from dataclasses import dataclass

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

TINY_UNET = {
    **SD15_UNET,
    "attention_head_dim": 2,
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 8,
}

TINY_TEXT_ENCODER = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}

TINY_VAE = {
    **SD15_VAE,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


# The shipped model (bf/assets/shapes-sd): SD-v1.5 block types, 128x128 images,
# 16x16 latents, sized so the whole directory stays under 25 MB in fp16.
SHAPES_UNET = {
    **SD15_UNET,
    "attention_head_dim": 3,  # heads; 16- and 32-wide heads run on the fused attention kernels
    "block_out_channels": [48, 96, 96, 96],
    "cross_attention_dim": 48,
    "norm_num_groups": 16,
    "sample_size": 16,
}

SHAPES_TEXT_ENCODER = {
    **SD15_TEXT_ENCODER,
    "hidden_size": 48,
    "intermediate_size": 192,
    "num_attention_heads": 3,
    "num_hidden_layers": 4,
    "projection_dim": 48,
}

SHAPES_VAE = {
    **SD15_VAE,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 128,
}


SDXL_UNET = {
    **SD15_UNET,  # SDXL's settings where they differ: three levels, deeper transformers, the added embedding
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "projection_class_embeddings_input_dim": 2816,  # pooled prompt (1280) + 6 micro-conditioning values x 256
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_TEXT_ENCODER = SD15_TEXT_ENCODER  # CLIP ViT-L; SDXL reads its penultimate layer

SDXL_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

SDXL_VAE = {**SD15_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025}

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TINY_SDXL_TEXT_ENCODER = {**TINY_TEXT_ENCODER, "num_hidden_layers": 3}  # 3: the penultimate layer is not the first
TINY_SDXL_TEXT_ENCODER_2 = {
    **SDXL_TEXT_ENCODER_2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}

TINY_SDXL_UNET = {
    **SDXL_UNET,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [2, 2, 4],
    "block_out_channels": [32, 32, 64],
    "cross_attention_dim": 64,  # the two text encoders' hidden states side by side
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "sample_size": 8,
    "transformer_layers_per_block": [1, 1, 2],
}

TINY_SDXL_VAE = {**TINY_VAE, "force_upcast": True, "scaling_factor": 0.13025}


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: dict
    text_encoder: dict
    vae: dict
    scheduler: dict
    description: str
    text_encoder_2: dict | None = None  # SDXL's second text encoder (with projection)

    @property
    def family(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd15"


ARCHITECTURES = {
    "sd15": Architecture(
        "sd15", SD15_UNET, SD15_TEXT_ENCODER, SD15_VAE, SD15_SCHEDULER, "Stable Diffusion v1.5, exact (UNet 859.52M parameters)"
    ),
    "sd15-tiny": Architecture(
        "sd15-tiny", TINY_UNET, TINY_TEXT_ENCODER, TINY_VAE, SD15_SCHEDULER, "SD-v1.5 block types at tiny width, for tests"
    ),
    "shapes": Architecture(
        "shapes", SHAPES_UNET, SHAPES_TEXT_ENCODER, SHAPES_VAE, SD15_SCHEDULER, "the shipped model's architecture, untrained"
    ),
    "sdxl": Architecture(
        "sdxl",
        SDXL_UNET,
        SDXL_TEXT_ENCODER,
        SDXL_VAE,
        SDXL_SCHEDULER,
        "Stable Diffusion XL base 1.0, exact (UNet 2567.46M parameters)",
        SDXL_TEXT_ENCODER_2,
    ),
    "sdxl-tiny": Architecture(
        "sdxl-tiny",
        TINY_SDXL_UNET,
        TINY_SDXL_TEXT_ENCODER,
        TINY_SDXL_VAE,
        SDXL_SCHEDULER,
        "SDXL block types at tiny width, for tests",
        TINY_SDXL_TEXT_ENCODER_2,
    ),
}
