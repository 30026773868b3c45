"""Model conversion CLIs: ``python -m jdm_fast.convert guided-diffusion ...`` (checkpoints of the
authors' JDM code or of an OpenAI guided-diffusion UNet in) and ``python -m jdm_fast.convert
to-diffusers ...`` (a diffusers UNet2DModel + DDPMScheduler out). Each subcommand is a module here
with ``add_arguments(parser)`` and ``run(args) -> int``."""
