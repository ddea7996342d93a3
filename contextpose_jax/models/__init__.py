"""Flax modules of CA-PF: backbones, context sampler, lifter, full model."""

# The frozen 2D-pose backbones CA-PF was released with (the one list of them).
HRNET_WIDTHS = {'hrnet_32': 32, 'hrnet_48': 48}
BACKBONES = (*HRNET_WIDTHS, 'cpn')
