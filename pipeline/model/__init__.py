"""The LFSS model: frozen backbones, DPS, CCM and the prior-fed decoder."""
