"""Tiny random-weight stand-ins for every role of the manifest, built offline in the layout the hub gives.

Each builder writes what `save_pretrained` writes for the real model, so the worker loads a tiny folder with the
same code and the same calls as a real one. The models are small but shaped like the real ones where it matters
for tests: the SDXL VAE downsamples ×8 and the WAN VAE ×8 in space and ×4 in time, so run time grows with the
requested size as it does in production.

Every component is built right after `torch.manual_seed`, and nothing written depends on the time or the target
path, so two builds give byte-identical files.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from tiny_tokenizers import clip_token_ids, t5_tokenizer, write_clip_tokenizer
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    Dinov2Config,
    DPTImageProcessor,
    UMT5Config,
    UMT5EncoderModel,
)

from diffusion_worker.manifest import ModelRole

Module = TypeVar("Module", bound=torch.nn.Module)

# Two CLIP text encoders whose hidden sizes add up to the UNet's cross-attention width, as in SDXL (768 + 1280).
CLIP_HIDDEN = 32
SDXL_CROSS_ATTENTION = 2 * CLIP_HIDDEN
# The UNet's added time embedding: six size/crop numbers of 8 channels each, plus text encoder 2's projection.
SDXL_TIME_EMBED = 8
# 32 latents × 8 (VAE) = 256 px: the pipelines' default size for the tiny SDXL (the real one: 128 × 8 = 1024).
SDXL_SAMPLE_SIZE = 32
# WAN's transformer width (heads × head dim); the I2V image keys and values are projected from it.
WAN_HEADS, WAN_HEAD_DIM = 2, 12
WAN_TEXT_DIM = 32
WAN_IMAGE_DIM = 32
# Noise latents, the encoded first frame and WAN's 4-channel frame mask, stacked as the I2V transformer input.
WAN_I2V_IN_CHANNELS = 16 + 16 + 4
LORA_RANK = 4
SDXL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def seeded(seed: int, build: Callable[[], Module]) -> Module:
    """Builds one component from a fixed seed; seeding each one keeps it independent of what was built before."""
    torch.manual_seed(seed)
    return build()


# --- SDXL -------------------------------------------------------------------------------------------------------


def sdxl_unet(cross_attention_dim: int = SDXL_CROSS_ATTENTION, time_ids: int = 6) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SDXL_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * SDXL_TIME_EMBED + CLIP_HIDDEN,
    )


def sdxl_refiner_unet() -> UNet2DConditionModel:
    # The refiner attends to text encoder 2's hidden states alone (1280 wide in the real one, not 768 + 1280), and
    # embeds five time ids (original size, crop, aesthetic score) instead of six (original size, crop, target size).
    return sdxl_unet(cross_attention_dim=CLIP_HIDDEN, time_ids=5)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def sdxl_vae(force_upcast: bool) -> AutoencoderKL:
    # Four blocks, three downsamplings: ×8 like the real VAE, so a 1024 px job attends over 128² latents, not 512².
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=SDXL_SAMPLE_SIZE * 8,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )


def clip_text_config(pad_token: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        projection_dim=CLIP_HIDDEN,
        max_position_embeddings=77,
        hidden_act="gelu",
        **clip_token_ids(pad_token),
    )


def build_sdxl(folder: Path, role: ModelRole) -> None:
    pads = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # as in the real SDXL repo
    with tempfile.TemporaryDirectory() as scratch:
        tokenizers = {}
        for name, pad_token in pads.items():
            write_clip_tokenizer(Path(scratch, name), pad_token)
            tokenizers[name] = CLIPTokenizer.from_pretrained(Path(scratch, name))
        pipeline = StableDiffusionXLPipeline(
            vae=seeded(4, lambda: sdxl_vae(force_upcast=True)),
            text_encoder=seeded(1, lambda: CLIPTextModel(clip_text_config(pads["tokenizer"]))),
            text_encoder_2=seeded(2, lambda: CLIPTextModelWithProjection(clip_text_config(pads["tokenizer_2"]))),
            unet=seeded(3, sdxl_unet),
            scheduler=sdxl_scheduler(),
            image_encoder=None,
            feature_extractor=None,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
            **tokenizers,
        )
        pipeline.save_pretrained(folder, variant=role.variant)
        # transformers 5 saves a tokenizer as tokenizer.json; the real repo ships vocab.json and merges.txt, which
        # load through a conversion of their own: put back the files the real repo has.
        for name in pads:
            shutil.rmtree(folder / name)
            shutil.copytree(Path(scratch, name), folder / name)


def build_sdxl_refiner(folder: Path, role: ModelRole) -> None:
    """The refiner repo's layout: a pipeline with no first text encoder. The builder then drops the components the
    worker takes from the base (text encoder 2, its tokenizer, the VAE, the scheduler), as the download does; the
    tiny base's text encoder 2 (seed 2) is what the tiny refiner UNet is made to read."""
    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(Path(scratch), "!")
        pipeline = StableDiffusionXLImg2ImgPipeline(
            vae=seeded(5, lambda: sdxl_vae(force_upcast=False)),
            text_encoder=None,
            text_encoder_2=seeded(2, lambda: CLIPTextModelWithProjection(clip_text_config("!"))),
            tokenizer=None,
            tokenizer_2=CLIPTokenizer.from_pretrained(scratch),
            unet=seeded(8, sdxl_refiner_unet),
            scheduler=sdxl_scheduler(),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
        pipeline.save_pretrained(folder, variant=role.variant)


def build_sdxl_vae(folder: Path, role: ModelRole) -> None:
    # Another seed than the base VAE's, so that a test can tell which of the two decoded an image.
    vae = seeded(5, lambda: sdxl_vae(force_upcast=False))
    vae.save_pretrained(folder, variant=role.variant)


def build_controlnet(folder: Path, role: ModelRole) -> None:
    # The ControlNet copies the tiny SDXL UNet (same seed: same weights), as the real one starts from SDXL's.
    controlnet = ControlNetModel.from_unet(seeded(3, sdxl_unet))
    # A fresh ControlNet ignores its control image: its output layers start at zero, and the default init of its
    # eight-conv image encoder shrinks the image's signal ~10⁴×. He-initialised encoder convs and small random
    # output layers make the control image change the result, as a trained ControlNet's does.
    torch.manual_seed(6)
    for layer in controlnet.controlnet_cond_embedding.modules():
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.zeros_(layer.bias)
    for layer in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(layer.weight, std=0.05)
        torch.nn.init.zeros_(layer.bias)
    controlnet.save_pretrained(folder, variant=role.variant)


# --- Depth ------------------------------------------------------------------------------------------------------


def build_depth_estimator(folder: Path, role: ModelRole) -> None:
    backbone = Dinov2Config(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=16,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[16, 32, 32, 32],
        fusion_hidden_size=32,
        head_hidden_size=16,
        depth_estimation_type="relative",
    )
    seeded(7, lambda: DepthAnythingForDepthEstimation(config)).save_pretrained(folder, variant=role.variant)
    DPTImageProcessor(
        size={"height": 32, "width": 32},
        keep_aspect_ratio=False,
        ensure_multiple_of=1,
        do_pad=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)


# --- WAN 2.1 ----------------------------------------------------------------------------------------------------


def wan_transformer(image_to_video: bool) -> WanTransformer3DModel:
    image = {}
    if image_to_video:
        # The I2V model attends to CLIP image features through extra key/value projections of its own width.
        image = {"image_dim": WAN_IMAGE_DIM, "added_kv_proj_dim": WAN_HEADS * WAN_HEAD_DIM}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=WAN_HEADS,
        attention_head_dim=WAN_HEAD_DIM,
        in_channels=WAN_I2V_IN_CHANNELS if image_to_video else 16,
        out_channels=16,
        text_dim=WAN_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        # The real value: rotary tables for up to 1024 latent positions per axis, so any size the contract allows
        # works (with 32, anything over 512 px failed).
        rope_max_seq_len=1024,
        **image,
    )


def _wan_components() -> dict[str, object]:
    tokenizer = t5_tokenizer()
    text_config = UMT5Config(
        d_model=WAN_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": seeded(10, lambda: UMT5EncoderModel(text_config)),
        # Three spatial downsamplings (×8) and two temporal ones (×4), as in the real WAN VAE.
        "vae": seeded(
            11,
            lambda: AutoencoderKLWan(
                base_dim=3,
                z_dim=16,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
            ),
        ),
        # The scheduler the real WAN 2.1 repos ship (480p: flow shift 3).
        "scheduler": UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            num_train_timesteps=1000,
        ),
    }


def build_wan_t2v(folder: Path, role: ModelRole) -> None:
    pipeline = WanPipeline(**_wan_components(), transformer=seeded(12, lambda: wan_transformer(False)))
    pipeline.save_pretrained(folder, variant=role.variant)


def build_wan_i2v(folder: Path, role: ModelRole) -> None:
    vision = CLIPVisionConfig(
        hidden_size=WAN_IMAGE_DIM,
        intermediate_size=37,
        num_attention_heads=4,
        # The pipeline reads the second-to-last hidden state, so at least two layers.
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=WAN_IMAGE_DIM,
    )
    pipeline = WanImageToVideoPipeline(
        **_wan_components(),
        transformer=seeded(13, lambda: wan_transformer(True)),
        image_encoder=seeded(14, lambda: CLIPVisionModel(vision)),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    pipeline.save_pretrained(folder, variant=role.variant)
    # Without torchvision transformers hands out CLIPImageProcessorPil, and the pipeline records that class; the
    # real repo names CLIPImageProcessor, which transformers resolves to whichever backend is installed.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["image_processor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


ROLE_BUILDERS: dict[str, Callable[[Path, ModelRole], None]] = {
    "sdxl": build_sdxl,
    "sdxl_vae": build_sdxl_vae,
    "sdxl_refiner": build_sdxl_refiner,
    "controlnet_depth": build_controlnet,
    "depth_estimator": build_depth_estimator,
    "wan_t2v": build_wan_t2v,
    "wan_i2v": build_wan_i2v,
}


def build_role(role: ModelRole, folder: Path) -> None:
    """Writes the tiny stand-in for `role` into `folder`.

    Weights are saved under the role's variant name (model.fp16.safetensors) so that loaders meet the files of
    the real repo, but stay float32: on CPU the worker computes in float32 anyway.
    """
    try:
        builder = ROLE_BUILDERS[role.name]
    except KeyError:
        raise ValueError(f"no tiny builder for role {role.name!r}; known: {', '.join(ROLE_BUILDERS)}") from None
    with torch.no_grad():
        builder(folder, role)


# --- LoRAs ------------------------------------------------------------------------------------------------------

# The three layouts LoRAs are published in: diffusers' own (what `save_lora_weights` writes), kohya's (sd-scripts;
# most SDXL LoRAs, both of the manifest's) and ComfyUI's, as Kijai publishes WAN LoRAs (the manifest's causvid).
# diffusers converts the last two as it loads them; tests write each kind with `write_lora`.
LORA_STYLES = ("diffusers", "kohya", "kijai")
# The layout each manifest LoRA's real file has, so that the tiny stand-in takes the same path through the loader.
MANIFEST_LORA_STYLES = {"sdxl-offset": "kohya", "pixel-art-xl": "kohya", "causvid": "kijai"}
# kohya and Kijai files carry an alpha per layer, applied as alpha / rank: not 1 here, so the loaders' rescaling runs
# (diffusers' WAN converter rescales cross-attention and FFN tensors in place).
LORA_ALPHA = 2.0
# kohya trains SDXL on Stability's own UNet, whose blocks are numbered, not nested: a diffusers module path
# (down_blocks.1.attentions.0) names an SGM one (input_blocks.4.1). Transformer blocks keep their names.
SGM_ATTENTION = "1"
KOHYA_UNET_TARGETS = [*SDXL_LORA_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
KOHYA_CLIP_TARGETS = [*CLIP_LORA_TARGETS, "fc1", "fc2"]
KIJAI_WAN_TARGETS = [*WAN_LORA_TARGETS, "ffn.net.0.proj", "ffn.net.2"]
KIJAI_I2V_TARGETS = [*KIJAI_WAN_TARGETS, "add_k_proj", "add_v_proj"]
# diffusers' module names in WAN's transformer blocks → the original repo's, which ComfyUI's files use.
KIJAI_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def _lora_layers(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    """Adds a random (not zero-initialised) adapter to `model` and returns its weights in diffusers' naming.

    With peft's default init lora_B is zero and the adapter would change nothing: init_lora_weights=False gives
    random A and B, so a tiny LoRA at scale 1 visibly changes the output.
    """
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=targets)
    model.add_adapter(config)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def _adapter_pairs(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random adapter as {diffusers module path: (down, up)}, for files in the other layouts."""
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=targets)
    model.add_adapter(config)
    weights = get_peft_model_state_dict(model)
    return {
        key.removesuffix(".lora_A.weight"): (down, weights[key.replace(".lora_A.", ".lora_B.")])
        for key, down in weights.items()
        if key.endswith(".lora_A.weight")
    }


def _sgm_path(path: str, layers_per_block: int) -> str:
    """down_blocks.1.attentions.0.X → input_blocks.4.1.X; mid_block.attentions.0.X → middle_block.1.X;
    up_blocks.0.attentions.2.X → output_blocks.2.1.X."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", SGM_ATTENTION, *parts[3:]])
    block, layer = int(parts[1]), int(parts[3])
    # input_blocks.0 is conv_in; each down block holds its layers and then a downsampler, each up block one more layer.
    if parts[0] == "down_blocks":
        sgm = ("input_blocks", 1 + block * (layers_per_block + 1) + layer)
    else:
        sgm = ("output_blocks", block * (layers_per_block + 1) + layer)
    return ".".join([sgm[0], str(sgm[1]), SGM_ATTENTION, *parts[4:]])


def _kohya_entries(prefix: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """sd-scripts' layout: lora_<part>_<module path with _ for .>.lora_down/lora_up.weight and .alpha."""
    entries = {}
    for path, (down, up) in pairs.items():
        name = f"{prefix}_{path.replace('.', '_')}"
        entries |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(LORA_ALPHA),
        }
    return entries


def _write_sdxl_lora(path: Path, style: str) -> None:
    text_encoder = CLIPTextModel(clip_text_config("<|endoftext|>"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config("!"))
    if style == "diffusers":
        StableDiffusionXLPipeline.save_lora_weights(
            path.parent,
            unet_lora_layers=_lora_layers(sdxl_unet(), SDXL_LORA_TARGETS),
            text_encoder_lora_layers=_lora_layers(text_encoder, CLIP_LORA_TARGETS),
            text_encoder_2_lora_layers=_lora_layers(text_encoder_2, CLIP_LORA_TARGETS),
            weight_name=path.name,
        )
        return
    assert style == "kohya", f"no {style} layout for SDXL LoRAs"
    unet = sdxl_unet()
    pairs = _adapter_pairs(unet, KOHYA_UNET_TARGETS)
    per_block = unet.config.layers_per_block
    entries = _kohya_entries("lora_unet", {_sgm_path(name, per_block): pair for name, pair in pairs.items()})
    for prefix, encoder in (("lora_te1", text_encoder), ("lora_te2", text_encoder_2)):
        # Named as under transformers 4, where both encoders keep their layers in `text_model`; transformers 5's
        # CLIPTextModel holds them at its top.
        pairs = _adapter_pairs(encoder, KOHYA_CLIP_TARGETS)
        entries |= _kohya_entries(
            prefix, {f"text_model.{name.removeprefix('text_model.')}": p for name, p in pairs.items()}
        )
    save_file({name: tensor.contiguous() for name, tensor in entries.items()}, path)


def _write_wan_lora(path: Path, style: str, image_to_video: bool) -> None:
    transformer = wan_transformer(image_to_video)
    if style == "diffusers":
        layers = _lora_layers(transformer, WAN_LORA_TARGETS)
        WanPipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name)
        return
    assert style == "kijai", f"no {style} layout for WAN LoRAs"
    modules = dict(transformer.named_modules())
    entries = {}
    pairs = _adapter_pairs(transformer, KIJAI_I2V_TARGETS if image_to_video else KIJAI_WAN_TARGETS)
    for module_path, (down, up) in pairs.items():
        _, block, inner = module_path.split(".", 2)
        name = f"diffusion_model.blocks.{block}.{KIJAI_NAMES[inner]}"
        # diff_b: a change to the layer's bias, which diffusers loads as the adapter's bias.
        bias = torch.randn_like(modules[module_path].bias) * 0.1
        entries |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(LORA_ALPHA),
            f"{name}.diff_b": bias,
        }
    save_file({name: tensor.contiguous() for name, tensor in entries.items()}, path)


LORA_WRITERS: dict[str, Callable[[Path, str], None]] = {
    "sdxl": _write_sdxl_lora,
    "wan_t2v": functools.partial(_write_wan_lora, image_to_video=False),
    "wan_i2v": functools.partial(_write_wan_lora, image_to_video=True),
}


def write_lora(family: str, name: str, path: Path, style: str | None = None) -> None:
    """Writes a tiny LoRA for the `family` role's model to `path`, seeded from its name so that LoRAs differ, in
    `style` (one of LORA_STYLES; by default the layout of the manifest LoRA of that name, else diffusers')."""
    style = style or MANIFEST_LORA_STYLES.get(name, "diffusers")
    torch.manual_seed(zlib.crc32(name.encode()))
    with torch.no_grad():
        LORA_WRITERS[family](path, style)
