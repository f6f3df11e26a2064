"""PI-CLIP's training-free priors (VTP, PIR, VVP), extracted once per unique image."""
