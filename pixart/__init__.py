"""pixart: PixArt-alpha-style text-to-image diffusion transformers."""
