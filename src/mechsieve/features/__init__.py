"""Features read out of a model: SAE latents, neurons, probe / concept directions."""
