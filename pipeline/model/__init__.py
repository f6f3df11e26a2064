"""The LFSS model: DPS, CCM and the prior-fed decoder, on frozen backbone features."""
