"""Auto Seg-Loss: metric surrogates with Bézier-parameterised AND/OR, searched by PPO2."""
