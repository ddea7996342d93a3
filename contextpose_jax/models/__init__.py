"""Flax modules of CA-PF: backbones, context sampler, lifter, full model."""
