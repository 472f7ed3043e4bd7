"""A DreamBooth LoRA training script in the structure of diffusers' examples/dreambooth scripts,
switched to T-LoRA the way README "Using tlora in your own training script" says: the adapter
from the script's LoraConfig, accelerate's save_state / load_state through tlora's hooks,
checkpoints every N steps, resume from the latest, validation through the stock pipeline, the
output folder written by tlora.save_pretrained, and the final inference in a fresh pipeline that
loads it with the stock `load_lora_weights`. With `train_text_encoder` (SD-XL), a PEFT LoRA in both
text encoders beside the tlora UNet, as the scripts' `--train_text_encoder` builds it. Written for
tests/adapter/test_dropin_script.py (tiny models, CPU, seconds); the noising and the denoiser call
are tlora's own recipes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

import tlora
from tlora.testing.tiny import IMAGE_SIZE, sample_kwargs
from tlora.train.families import family_of


@dataclass
class Args:
    pretrained_model_name_or_path: str
    output_dir: str
    kind: str  # "sdxl" or "flux"
    instance_prompt: str = "a photo of sks dog"
    rank: int = 4
    max_train_steps: int = 4
    checkpointing_steps: int = 2
    resume_from_checkpoint: str | None = None
    validation_epochs: int = 1  # every `validation_epochs` epochs of `steps_per_epoch` steps
    steps_per_epoch: int = 2
    learning_rate: float = 1e-2
    seed: int = 0
    mixed_precision: str = "no"
    train_text_encoder: bool = False  # SD-XL: a PEFT LoRA in text_encoder and text_encoder_2


@dataclass
class Outcome:
    adapter: dict[str, torch.Tensor]  # the trained factors at the end
    losses: list[float]  # one per step this run took
    validation_images: int
    final_images: list  # the fresh pipeline's (static LoRA) image
    pipeline: object  # the fresh pipeline, with the static LoRA loaded
    text_encoders: list  # the trained text encoders (train_text_encoder), else []


def main(args: Args) -> Outcome:
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
    )
    set_seed(args.seed)
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    denoiser = family.denoiser
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)

    # what the diffusers scripts build for add_adapter; tlora takes it as it is
    lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=None)
    tlora.register_accelerate_hooks(accelerator, tlora.inject(denoiser, lora_config))

    text_encoders = []
    if args.train_text_encoder:
        # The scripts call `text_encoder.add_adapter(config)`, which transformers >= 5.24 refuses
        # below peft 0.22 (not released); peft's own injection is what add_adapter runs.
        te_config = LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS
        )
        text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        for text_encoder in text_encoders:
            inject_adapter_in_model(te_config, text_encoder)

    params = [p for m in (denoiser, *text_encoders) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=1)
    denoiser, optimizer, lr_scheduler, *text_encoders = accelerator.prepare(
        denoiser, optimizer, lr_scheduler, *text_encoders
    )

    # one instance image: a fixed gradient, its latent distribution and the prompt's conditioning
    ramp = torch.linspace(-1, 1, IMAGE_SIZE)
    pixels = torch.stack(
        [
            ramp.view(1, -1).expand(IMAGE_SIZE, -1),
            ramp.view(-1, 1).expand(-1, IMAGE_SIZE),
            -ramp.view(1, -1).expand(IMAGE_SIZE, -1),
        ]
    )
    mean, std = family.encode_image(pixels[None])
    cond = None if args.train_text_encoder else family.encode_prompt(args.instance_prompt, IMAGE_SIZE)

    global_step = 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            dirs = sorted(
                (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                key=lambda d: int(d.split("-")[1]),
            )
            path = dirs[-1] if dirs else None
        if path is not None:
            accelerator.load_state(os.path.join(args.output_dir, path))
            global_step = int(path.split("-")[1])

    losses, validations = [], 0
    denoiser.train()
    while global_step < args.max_train_steps:
        latents = mean + std * torch.randn_like(mean)
        noise = torch.randn_like(latents)
        t = torch.randint(0, family.num_train_timesteps, (latents.shape[0],))
        noised = family.noise(latents, noise, t)
        with accelerator.accumulate(denoiser):
            step_cond = _encode_with_grad(pipe, args.instance_prompt) if args.train_text_encoder else cond
            pred = family.predict(denoiser, noised, step_cond)
            loss = torch.nn.functional.mse_loss(pred.float(), noised.target.float())
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.item())
        global_step += 1
        if global_step % args.checkpointing_steps == 0:
            # On every process, as accelerate asks (each writes its own random state; tlora's hook
            # and accelerate write the rest from the main process only). The diffusers scripts call
            # it on the main process alone, which loses the other processes' random states.
            accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
        if global_step % (args.validation_epochs * args.steps_per_epoch) == 0:
            # the stock pipeline around the training denoiser, the adapter's r(t) live
            trained_parts = {_slot(args.kind): accelerator.unwrap_model(denoiser)}
            for name, text_encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
                trained_parts[name] = accelerator.unwrap_model(text_encoder)
            validation = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **trained_parts)
            validation.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                validation(**sample_kwargs(args.kind, steps=2), generator=generator, output_type="np")
            validations += 1
            denoiser.train()
            for text_encoder in text_encoders:
                text_encoder.train()

    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(denoiser)
    final_adapter = {k: v.detach().clone() for k, v in tlora.adapter_of(trained).state_dict().items()}
    images, pipeline = [], None
    if accelerator.is_main_process:
        unet_lora_layers = tlora.save_pretrained(trained, args.output_dir)
        if text_encoders:  # the script's own save_lora_weights, with the text encoders' LoRA
            te_layers = [
                convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(m)))
                for m in text_encoders
            ]
            type(pipe).save_lora_weights(
                args.output_dir,
                unet_lora_layers=unet_lora_layers,
                text_encoder_lora_layers=te_layers[0],
                text_encoder_2_lora_layers=te_layers[1],
            )
        # final inference: a fresh pipeline, the output folder through diffusers' own loader
        pipeline = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.load_lora_weights(args.output_dir)
        generator = torch.Generator().manual_seed(args.seed)
        images = pipeline(**sample_kwargs(args.kind, steps=2), generator=generator, output_type="np").images
    accelerator.end_training()
    trained_text_encoders = [accelerator.unwrap_model(m) for m in text_encoders]
    return Outcome(final_adapter, losses, validations, images, pipeline, trained_text_encoders)


# The SD-XL script's text-encoder LoRA targets.
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _encode_with_grad(pipe, prompt: str) -> dict:
    """SD-XL's conditioning through the training text encoders, with their graph (the family's
    encode_prompt caches under no_grad: the scripts re-encode each step when the encoders train)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=pipe.device, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _slot(kind: str) -> str:
    return "transformer" if kind == "flux" else "unet"
