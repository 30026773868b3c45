"""Experiments built on the CLIs: ``python -m jdm_fast.experiments compare ...`` trains and
evaluates the paper's comparison (joint vs diffusion-only vs classifier-only, and
semi-supervised), see :mod:`jdm_fast.experiments.compare`."""
