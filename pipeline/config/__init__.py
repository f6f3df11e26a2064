"""``params.yaml`` as ``make repro`` needs it: presets written into it, the whole file checked."""
